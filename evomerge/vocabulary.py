"""The output tokenizer and the re-indexing of every source's embedding rows to it (mergekit 0.1.5 semantics).

When a recipe names a tokenizer (``tokenizer_source`` or the ``tokenizer:`` block, see
evomerge/tokenizer_config.py), the output vocabulary ``V`` is built first:

- ``base``: the base model's tokenizer (the first model's when there is no base); ``PATH``: that model's;
- ``union``: the base tokenizer, then every token of the other sources that it lacks, in recipe order and
  each source's id order, added as added tokens (their added tokens keep their settings, the first source's
  when several define one). mergekit adds them in the order of a hash map that changes from run to run, so
  its ids for these tokens are not reproducible; ours are, and every token's row is the same as mergekit's;
- then the ``tokens:`` the recipe lists and ``V`` lacks are added. With ``pad_to_multiple_of`` the row count is
  rounded up.

Each source ``m`` gets a permutation ``p_m[v]``: its own row of token ``v`` (looked up by token string in its
tokenizer; a source without tokenizer files is taken to share the base's), or -1 when it lacks the token.
A vocabulary tensor (a non-layer 2-D tensor whose first dimension is the source's ``vocab_size``: input
embedding, output head) is rebuilt per source with ``|V|`` rows before it is merged:

- row ``v`` is the source's own row when it has the token and the recipe does not ``force`` another source;
- otherwise a default row, the same for every source: the row ``tokens[v].source`` names (a model's row of
  that token, ``{kind: zero}``, or ``{kind: model_token}``: a given row of a given model); for tokens the
  recipe does not configure: the only source that has it, zero when none has it, the base model's row when
  the base has it, else the mean of the rows of the sources that have it (summed in source order);
- rows added by ``pad_to_multiple_of`` are the mean of the source's first ``|V|`` rows.

The merge method then runs on these tensors as on any other, and the config's ``vocab_size`` becomes the row
count. Sources whose vocabulary is the output's, token for token, keep their tensors untouched (no copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.chat_templates import TEMPLATES
from evomerge.errors import EvomergeError
from evomerge.lora import model_folder
from evomerge.tokenizer_config import MODEL_TOKEN, ZERO, TokenizerSettings, TokenSetting, TokenSource, is_template_name

#: Files that define a vocabulary (two folders with the same ones share it, token for token).
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                "vocab.txt", "merges.txt", "added_tokens.json", "tokenizer_config.json")


@dataclass
class VocabularyPlan:
    """The output vocabulary and, per source key, the row each output token takes from that source.

    ``permutations[key]``: int64 ``[|V|]``, the source's row index or -1. ``size``: output rows (``|V|`` padded).
    """

    vocab: dict[str, int]
    size: int
    permutations: dict[Path, torch.Tensor]
    vocab_sizes: dict[Path, int]
    original_vocabs: dict[Path, dict[str, int]]
    settings: dict[str, TokenSetting] = field(default_factory=dict)
    base: Path | None = None
    resolve: Any = None  # recipe path resolver (model path as written -> source key)

    def is_identity(self, key: Path) -> bool:
        perm = self.permutations[key]
        return (self.size == self.vocab_sizes[key] == len(perm)
                and bool(torch.equal(perm, torch.arange(len(perm))))
                and not any(s.force for s in self.settings.values()))

    def align(self, keys: list[Path], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every source's vocabulary tensor ``[rows_m, *rest]`` re-indexed to ``[size, *rest]`` (see the module
        docstring); the compute dtype is kept. Raises EvomergeError when a configured source is not an input."""
        if all(self.is_identity(k) for k in keys):
            return tensors
        n_vocab = len(self.vocab)
        perms = torch.stack([self.permutations[k] for k in keys])  # [n_models, |V|]
        present = perms >= 0
        rows = [t.index_select(0, p.clamp(min=0)) for t, p in zip(tensors, perms)]  # [|V|, *rest] each
        forced = torch.zeros(n_vocab, dtype=torch.bool)
        defaults = self._automatic_defaults(keys, rows, present)
        for token, setting in self.settings.items():
            index = self.vocab[token]
            forced[index] = setting.force
            if setting.source is not None and (setting.force or not bool(present[:, index].all())):
                defaults[index] = self._configured_row(token, setting.source, keys, tensors, perms[:, index])
            elif setting.source is None and not bool(present[:, index].all()):
                raise EvomergeError(f"tokenizer.tokens[{token!r}] has no source, and "
                                    f"{keys[int((~present[:, index]).nonzero()[0])]} lacks that token")
        out = []
        for own, have in zip(rows, present):
            use_own = (have & ~forced).view(-1, *([1] * (own.dim() - 1)))
            merged = torch.where(use_own, own, defaults)
            if self.size > n_vocab:
                pad = merged.mean(dim=0, keepdim=True).expand(self.size - n_vocab, *merged.shape[1:])
                merged = torch.cat([merged, pad])
            out.append(merged)
        return out

    def _automatic_defaults(self, keys: list[Path], rows: list[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """Rows for tokens some source lacks: the only holder's, zero, the base's, or the holders' mean."""
        total = torch.zeros_like(rows[0])
        for own, have in zip(rows, present):
            total = total + torch.where(have.view(-1, *([1] * (own.dim() - 1))), own, torch.zeros_like(own))
        count = present.sum(dim=0)
        shape = (-1, *([1] * (total.dim() - 1)))
        mean = torch.where(count.view(shape) > 0, total / count.clamp(min=1).to(total.dtype).view(shape), total)
        if self.base in keys:
            b = keys.index(self.base)
            use_base = (present[b] & (count >= 2)).view(shape)
            mean = torch.where(use_base, rows[b], mean)
        return mean

    def _configured_row(self, token: str, source: TokenSource, keys: list[Path], tensors: list[torch.Tensor],
                        perm_column: torch.Tensor) -> torch.Tensor:
        if source.kind == ZERO:
            return tensors[0].new_zeros(tensors[0].shape[1:])
        key = self.resolve(source.model)
        if key not in keys:
            raise EvomergeError(f"tokenizer.tokens[{token!r}] takes its row from {source.model}, which is not "
                                f"among the models merged into this tensor")
        position = keys.index(key)
        if source.kind == MODEL_TOKEN:
            row = source.token_id
            if row is None:
                assert source.token is not None, f"{token}: model_token is validated to have token or token_id"
                if source.token not in self.original_vocabs[key]:
                    raise EvomergeError(f"tokenizer.tokens[{token!r}]: token {source.token!r} is not in the "
                                        f"vocabulary of {source.model}")
                row = self.original_vocabs[key][source.token]
            if row >= tensors[position].shape[0]:
                raise EvomergeError(f"tokenizer.tokens[{token!r}]: token_id {row} is out of range for "
                                    f"{source.model} ({tensors[position].shape[0]} rows)")
            return tensors[position][row]
        if int(perm_column[position]) < 0:
            raise EvomergeError(f"tokenizer.tokens[{token!r}] takes its row from {source.model}, which lacks "
                                f"that token")
        return tensors[position][int(perm_column[position])]


@dataclass
class TokenizerPlan:
    """What the merge writes as its tokenizer: ``tokenizer`` (a transformers tokenizer to save), or None to
    copy the files of ``folder``; and the vocabulary re-indexing (None when every source shares the output's)."""

    folder: Path
    tokenizer: Any = None
    vocabulary: VocabularyPlan | None = None


def vocab_size_of(config: dict[str, Any]) -> int | None:
    """A config's vocabulary size (top level, else its text_config)."""
    value = config.get("vocab_size")
    if not isinstance(value, int):
        text = config.get("text_config")
        value = text.get("vocab_size") if isinstance(text, dict) else None
    return value if isinstance(value, int) else None


def plan_tokenizer(recipe: Any, keys: list[Path], configs: list[dict[str, Any]]) -> TokenizerPlan:
    """The output tokenizer and vocabulary re-indexing of a recipe (see the module docstring).

    Args:
        recipe: the validated Recipe. keys: every source key (resolved paths, LoRA references included),
        first-mention order. configs: their config.json mappings.
    Returns: a TokenizerPlan. Raises: EvomergeError for tokenizers that cannot be loaded or built.
    """
    settings = recipe.tokenizer_settings()
    base_key = recipe.resolve_path(recipe.base_model) if recipe.base_model else keys[0]
    folder = recipe.tokenizer_path()
    if settings is None:
        tokenizer = _with_chat_template(_load_tokenizer(folder), recipe, keys) if recipe.chat_template else None
        return TokenizerPlan(folder=folder, tokenizer=tokenizer)
    sizes = {k: vocab_size_of(c) for k, c in zip(keys, configs)}
    if _shares_vocabulary(settings, keys, sizes, folder):
        tokenizer = _with_chat_template(_load_tokenizer(folder), recipe, keys) if recipe.chat_template else None
        return TokenizerPlan(folder=folder, tokenizer=tokenizer)
    tokenizers = {base_key: _load_tokenizer(model_folder(base_key))}
    for key in keys:
        if key not in tokenizers and _has_tokenizer(model_folder(key)):
            tokenizers[key] = _load_tokenizer(model_folder(key))
    vocab_sizes = {k: sizes[k] or len(tokenizers.get(k, tokenizers[base_key]).get_vocab()) for k in keys}
    _check_no_unused_tokens(tokenizers[base_key], vocab_sizes[base_key], base_key)
    if settings.source == "base":
        out = tokenizers[base_key]
    elif settings.source == "union":
        out = _union_tokenizer(tokenizers, base_key, keys, vocab_sizes)
    else:
        out = _load_tokenizer(model_folder(recipe.resolve_path(settings.source)))
    existing = set(out.get_vocab())
    for token in settings.tokens:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)
    vocab = out.get_vocab()
    size = len(vocab)
    if settings.pad_to_multiple_of and size % settings.pad_to_multiple_of:
        size += settings.pad_to_multiple_of - size % settings.pad_to_multiple_of
    originals = {k: tokenizers.get(k, tokenizers[base_key]).get_vocab() for k in keys}
    permutations = {k: _permutation(vocab, originals[k], vocab_sizes[k]) for k in keys}
    plan = VocabularyPlan(vocab=vocab, size=size, permutations=permutations, vocab_sizes=vocab_sizes,
                          original_vocabs=originals, settings=dict(settings.tokens),
                          base=recipe.resolve_path(recipe.base_model) if recipe.base_model else None,
                          resolve=recipe.resolve_path)
    _check_token_settings(plan, keys)
    vocabulary = None if all(plan.is_identity(k) for k in keys) else plan
    return TokenizerPlan(folder=folder, tokenizer=_with_chat_template(out, recipe, keys), vocabulary=vocabulary)


def _check_token_settings(plan: VocabularyPlan, keys: list[Path]) -> None:
    """The ``tokens:`` problems a merge would meet, found before any tensor is read (one line each)."""
    for token, setting in plan.settings.items():
        index = plan.vocab[token]
        lacking = [k for k in keys if int(plan.permutations[k][index]) < 0]
        source = setting.source
        if source is None:
            if lacking:
                raise EvomergeError(f"tokenizer.tokens[{token!r}] has no source, and {lacking[0]} lacks that token")
            continue
        if source.kind == ZERO or not (setting.force or lacking):
            continue
        key = plan.resolve(source.model)
        if key not in keys:
            raise EvomergeError(f"tokenizer.tokens[{token!r}] takes its row from {source.model}, which is not "
                                f"among the models merged")
        if source.kind == MODEL_TOKEN and source.token is not None and source.token not in plan.original_vocabs[key]:
            raise EvomergeError(f"tokenizer.tokens[{token!r}]: token {source.token!r} is not in the vocabulary "
                                f"of {source.model}")
        if source.kind == MODEL_TOKEN and source.token_id is not None and source.token_id >= plan.vocab_sizes[key]:
            raise EvomergeError(f"tokenizer.tokens[{token!r}]: token_id {source.token_id} is out of range for "
                                f"{source.model} ({plan.vocab_sizes[key]} rows)")
        if source.kind == "model" and key in lacking:
            raise EvomergeError(f"tokenizer.tokens[{token!r}] takes its row from {source.model}, which lacks "
                                f"that token")


def _permutation(vocab: dict[str, int], original: dict[str, int], rows: int) -> torch.Tensor:
    perm = torch.full((len(vocab),), -1, dtype=torch.int64)
    for token, index in vocab.items():
        old = original.get(token)
        if old is not None and old < rows:
            perm[index] = old
    return perm


def _union_tokenizer(tokenizers: dict[Path, Any], base_key: Path, keys: list[Path], sizes: dict[Path, int]):
    """The base tokenizer plus every other source's tokens it lacks (added tokens keep their settings)."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for key in [base_key] + [k for k in keys if k != base_key and k in tokenizers]:
        tok = tokenizers[key]
        decoder = {index: info for index, info in tok.added_tokens_decoder.items() if index < sizes[key]}
        added_contents = {info.content for info in tok.added_tokens_decoder.values()}
        for token, index in sorted(tok.get_vocab().items(), key=lambda item: item[1]):
            if index < sizes[key] and token not in added_contents:
                plain.setdefault(token, None)
        for _, info in sorted(decoder.items()):
            added.setdefault(info.content, info)
    out = _copy_tokenizer(tokenizers[base_key])
    base_vocab = tokenizers[base_key].get_vocab()
    for token in plain:
        if token not in added and token not in base_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _copy_tokenizer(tokenizer: Any):
    """An independent copy (saved and reloaded), so the base tokenizer object is never changed."""
    # deferred: transformers loads only when a tokenizer is built, not with the recipe layer
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _check_no_unused_tokens(tokenizer: Any, rows: int, key: Path) -> None:
    unused = [t for t, i in tokenizer.get_vocab().items() if i >= rows]
    if unused:
        raise EvomergeError(f"the tokenizer of {key} has {len(unused)} tokens beyond the model's {rows} embedding "
                            f"rows (e.g. {unused[0]!r}); evomerge cannot merge with such a tokenizer")


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _VOCAB_FILES)


def _load_tokenizer(folder: Path):
    # deferred: transformers loads only when a tokenizer is built, not with the recipe layer
    from transformers import AutoTokenizer

    if not _has_tokenizer(folder):
        raise EvomergeError(f"no tokenizer files in {folder}")
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; report one line
        raise EvomergeError(f"cannot load the tokenizer of {folder}: "
                            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None


def _digest(folder: Path) -> tuple:
    return tuple(hashlib.sha256((folder / n).read_bytes()).hexdigest() if (folder / n).is_file() else None
                 for n in _VOCAB_FILES)


def _shares_vocabulary(settings: TokenizerSettings, keys: list[Path], sizes: dict[Path, int | None],
                       folder: Path) -> bool:
    """True when re-indexing is certainly the identity: base/path source, nothing added or padded, equal
    vocabulary sizes and byte-identical tokenizer files (or none) in every source."""
    if settings.tokens or settings.pad_to_multiple_of or len(set(sizes.values())) != 1:
        return False
    reference = _digest(folder)
    if not all(_digest(model_folder(k)) in (reference, (None,) * len(_VOCAB_FILES)) for k in keys):
        return False
    # mergekit sizes the output by the tokenizer: a model with more rows than tokens is re-indexed (truncated).
    # A tokenizer with more tokens than rows keeps every row in place too (mergekit also strips those tokens
    # from the tokenizer it writes; evomerge copies the tokenizer files as they are).
    # No config stating its vocab_size: the identity is not certain, so the sizes are taken from the tokenizers.
    rows = next(iter(sizes.values()))
    return rows is not None and _has_tokenizer(folder) and len(_load_tokenizer(folder).get_vocab()) >= rows


def _with_chat_template(tokenizer: Any, recipe: Any, keys: list[Path]):
    """Set the recipe's chat_template on the tokenizer: a named one, ``auto`` (the sources' most common
    template; unchanged when none has one) or the literal Jinja string."""
    value = recipe.chat_template
    if not value:
        return tokenizer
    if value == "auto":
        found = []
        for key in keys:
            folder = model_folder(key)
            template = _load_tokenizer(folder).chat_template if _has_tokenizer(folder) else None
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        if not found:
            return tokenizer
        value = Counter(found).most_common(1)[0][0]
    elif is_template_name(value):
        value = TEMPLATES[value]
    tokenizer.chat_template = value
    return tokenizer


@contextlib.contextmanager
def tokenizer_folder(plan: TokenizerPlan) -> Iterator[Path]:
    """A folder holding the output tokenizer's files: the source folder, or the built tokenizer saved into a
    temporary folder (removed afterwards)."""
    if plan.tokenizer is None:
        yield plan.folder
        return
    with tempfile.TemporaryDirectory(prefix="evomerge-tokenizer-") as folder:
        plan.tokenizer.save_pretrained(folder)
        yield Path(folder)
