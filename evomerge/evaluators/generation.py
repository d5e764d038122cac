"""Batched greedy decoding for evaluation: the search's fitness hot loop, written for speed.

Why not ``model.generate``: evaluation needs only greedy decoding with stop strings, and a hand-written loop
can (1) drop every finished sequence from the batch and its KV cache at once and refill the freed rows with
waiting prompts (continuous batching: a batch never waits for its longest answer, which is where
``generate``-per-batch loses most of its time: small models are per-step-overhead bound, so the number of
decoding steps is what counts), (2) skip logits processors and per-step generic bookkeeping, and (3) check stop
strings on a short token tail with one batched decode call per step. The answers are the same greedy
continuations as ``generate`` (same prompt tokens, per-sequence masks and position ids); only the order of work
changes. Caches that are not plain ``DynamicLayer`` stacks (sliding-window layers) are only compacted, not
refilled.

Semantics (kept identical to lm-eval's HF backend so our scores and theirs can be compared item by item):
- prompts are tokenized one by one with the tokenizer's own special-token default, except that a prompt that
  already starts with the BOS string (a chat template) gets no second BOS;
- prompts enter longest first (ties by text), at most ``batch_size`` at a time, left padded;
- a sequence stops at an EOS token (the tokenizer's or the model's generation config's), once any stop string
  appears in its decoded continuation, or after ``max_new_tokens``;
- the returned text is the decoded continuation (special tokens skipped) cut before the first occurrence of
  each stop string in turn.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode: greedy, at most ``max_new_tokens``, stop strings, batch size."""

    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    batch_size: int = 16

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if self.max_new_tokens < 0 or self.batch_size < 1:
            raise ValueError("max_new_tokens must be >= 0 and batch_size >= 1")


@dataclass
class Generation:
    """One decoded continuation: ``text`` (cut at stop strings) and ``new_tokens`` (tokens actually decoded)."""

    text: str
    new_tokens: int
    token_ids: list[int] = field(default_factory=list, repr=False)


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt (no padding); no extra BOS when the prompt text already starts with it."""
    bos = getattr(tokenizer, "bos_token", None)
    plain = [i for i, p in enumerate(prompts) if not (bos and p.startswith(bos))]
    result: list[list[int]] = [[] for _ in prompts]
    if plain:
        for i, ids in zip(plain, tokenizer([prompts[i] for i in plain])["input_ids"]):
            result[i] = list(ids)
    for i, p in enumerate(prompts):
        if bos and p.startswith(bos):
            result[i] = list(tokenizer(p, add_special_tokens=False)["input_ids"])
    return result


def cut_at_stop_strings(text: str, stop: tuple[str, ...]) -> str:
    """Text before the first occurrence of each stop string in turn (lm-eval's post-processing)."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids that end a sequence: the tokenizer's and the model's generation config's (which ``generate`` uses)."""
    ids: set[int] = set()
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    gen_config = getattr(model, "generation_config", None)
    candidates.append(getattr(gen_config, "eos_token_id", None) if gen_config is not None else None)
    for value in candidates:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


class _ForwardKwargs:
    """The keyword names this model's forward takes (transformers renamed past_key_values to cache in 5.x)."""

    def __init__(self, model) -> None:
        params = inspect.signature(model.forward).parameters
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        self.logits_to_keep = "logits_to_keep" in params


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()


def sort_for_batching(prompts: list[str], token_ids: list[list[int]]) -> list[int]:
    """Indices longest prompt first, ties by text (the order lm-eval batches in, so batches match)."""
    return sorted(range(len(prompts)), key=lambda i: (-len(token_ids[i]), prompts[i]))


@torch.inference_mode()
def greedy_generate(model, tokenizer, prompts: list[str], settings: GenerationSettings,
                    token_ids: list[list[int]] | None = None, progress: bool = False) -> list[Generation]:
    """Greedy continuations of ``prompts`` (returned in input order). ``token_ids``: pre-encoded prompts."""
    if token_ids is None:
        token_ids = encode_prompts(tokenizer, prompts)
    results: list[Generation | None] = [None] * len(prompts)
    if not prompts:
        return []
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    eos_ids = eos_token_ids(model, tokenizer)
    forward = _ForwardKwargs(model)
    stop = settings.stop
    tail_window = max((len(s) for s in stop), default=0) + 4

    order = sort_for_batching(prompts, token_ids)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(order), desc="generating", unit="item")
    decoder = _StreamDecoder(model, tokenizer, settings, device, pad_id, eos_ids, forward, tail_window)
    for index, generated in decoder.run(order, token_ids):
        visible = generated[:-1] if generated and generated[-1] in eos_ids else generated
        text = cut_at_stop_strings(tokenizer.decode(visible, skip_special_tokens=True), stop)
        results[index] = Generation(text=text, new_tokens=len(generated), token_ids=generated)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def _left_pad(tensor: torch.Tensor, columns: int, dim: int, value: float = 0) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([torch.full(shape, value, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


class _StreamDecoder:
    """Greedy decoding of a stream of prompts with a batch that is refilled as sequences finish.

    Prompts enter in the given order (longest first); whenever sequences stop, they leave the batch and its
    KV cache, and waiting prompts are prefilled and joined in (caches aligned by left padding), so the batch
    stays full and no step is spent on finished sequences. Left-padding columns that no remaining sequence
    needs are trimmed from the cache. Every sequence still gets exactly its own greedy continuation (its
    attention sees only its own tokens; position ids are per sequence).
    """

    def __init__(self, model, tokenizer, settings: GenerationSettings, device, pad_id: int, eos_ids: set[int],
                 forward: _ForwardKwargs, tail_window: int) -> None:
        self.model, self.tokenizer, self.settings, self.device = model, tokenizer, settings, device
        self.pad_id, self.eos_ids, self.forward, self.tail_window = pad_id, eos_ids, forward, tail_window

    def _call(self, input_ids, attention, positions, cache):
        kwargs = {self.forward.cache_name: cache, "use_cache": True}
        if self.forward.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        logits = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions, **kwargs).logits
        return logits[:, -1, :].argmax(dim=-1)

    def _prefill(self, seqs: list[list[int]]):
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            if seq:
                input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                attention[row, width - len(seq):] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        input_ids, attention, positions = (t.to(self.device) for t in (input_ids, attention, positions))
        cache = _new_cache(self.model)
        next_tokens = self._call(input_ids, attention, positions, cache)
        return cache, attention, positions[:, -1], next_tokens

    @staticmethod
    def _mergeable(cache) -> bool:
        return all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", [None]))

    def run(self, order: list[int], token_ids: list[list[int]]):
        """Yield (prompt index, generated token ids) as sequences finish."""
        settings = self.settings
        pending = list(reversed(order))  # pop() from the end = next in order
        rows: list[int] = []
        fresh: list[bool] = []  # fresh[k]: rows[k]'s next token is not recorded yet
        generated: dict[int, list[int]] = {}
        cache = attention = positions = next_tokens = None
        while pending or rows:
            free = settings.batch_size - len(rows)
            # refill in groups (a quarter of the batch) so each prefill call does a useful amount of work
            if (not rows or free >= max(1, settings.batch_size // 4)) and free > 0 and pending \
                    and (cache is None or not rows or self._mergeable(cache)):
                new = [pending.pop() for _ in range(min(free, len(pending)))]
                c2, a2, p2, n2 = self._prefill([token_ids[i] for i in new])
                for i in new:
                    generated[i] = []
                if not rows:
                    cache, attention, positions, next_tokens, rows, fresh = c2, a2, p2, n2, new, [True] * len(new)
                else:
                    cache, attention = self._merge(cache, attention, c2, a2)
                    positions = torch.cat([positions, p2])
                    next_tokens = torch.cat([next_tokens, n2])
                    rows, fresh = rows + new, fresh + [True] * len(new)
            if settings.max_new_tokens == 0:
                for i in rows:
                    yield i, generated.pop(i)
                rows, fresh, cache = [], [], None
                continue
            done = self._record(rows, next_tokens.tolist(), generated, fresh)
            fresh = [False] * len(rows)
            if any(done):
                for k, finished in enumerate(done):
                    if finished:
                        yield rows[k], generated.pop(rows[k])
                keep = [k for k, finished in enumerate(done) if not finished]
                if not keep:
                    rows, fresh, cache = [], [], None
                    continue
                keep_index = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(keep_index)
                attention = attention.index_select(0, keep_index)
                next_tokens = next_tokens.index_select(0, keep_index)
                positions = positions.index_select(0, keep_index)
                rows, fresh = [rows[k] for k in keep], [False] * len(keep)
                cache, attention = self._trim(cache, attention)
                if pending and self._mergeable(cache) and \
                        settings.batch_size - len(rows) >= max(1, settings.batch_size // 4):
                    continue  # refill the free rows (their first tokens get recorded) before the next step
            attention = torch.cat([attention, torch.ones((len(rows), 1), dtype=attention.dtype,
                                                         device=self.device)], dim=1)
            positions = positions + 1
            next_tokens = self._call(next_tokens[:, None], attention, positions[:, None], cache)
            fresh = [True] * len(rows)

    def _record(self, rows: list[int], tokens: list[int], generated: dict[int, list[int]],
                fresh: list[bool]) -> list[bool]:
        """Append each fresh row's new token; which rows are finished (EOS, max_new_tokens, stop string)."""
        settings = self.settings
        done = [False] * len(rows)
        for k, (row, token) in enumerate(zip(rows, tokens)):
            if not fresh[k]:
                continue
            generated[row].append(token)
            if token in self.eos_ids or len(generated[row]) >= settings.max_new_tokens:
                done[k] = True
        if settings.stop:
            check = [k for k in range(len(rows)) if not done[k]]
            if check:
                tails = self.tokenizer.batch_decode([generated[rows[k]][-self.tail_window:] for k in check],
                                                    skip_special_tokens=True)
                for k, tail in zip(check, tails):
                    if any(s in tail for s in settings.stop):
                        done[k] = True
        return done

    @staticmethod
    def _merge(cache, attention, new_cache, new_attention):
        """Join a freshly prefilled group into the running batch, left-padding the narrower side."""
        width = max(attention.shape[1], new_attention.shape[1])
        pad_old, pad_new = width - attention.shape[1], width - new_attention.shape[1]
        for layer, new_layer in zip(cache.layers, new_cache.layers):
            layer.keys = torch.cat([_left_pad(layer.keys, pad_old, 2), _left_pad(new_layer.keys, pad_new, 2)])
            layer.values = torch.cat([_left_pad(layer.values, pad_old, 2),
                                      _left_pad(new_layer.values, pad_new, 2)])
        merged = torch.cat([_left_pad(attention, pad_old, 1), _left_pad(new_attention, pad_new, 1)])
        return cache, merged

    def _trim(self, cache, attention):
        """Drop leading columns that are padding for every remaining row (less attention work)."""
        if not self._mergeable(cache):
            return cache, attention
        used = attention.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start == 0:
            return cache, attention
        for layer in cache.layers:
            layer.keys = layer.keys[:, :, start:, :]
            layer.values = layer.values[:, :, start:, :]
        return cache, attention[:, start:]
