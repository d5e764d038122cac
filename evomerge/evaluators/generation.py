"""Batched greedy decoding for evaluation: the search's fitness hot loop, written for speed.

Why not ``model.generate``: evaluation needs only greedy decoding with stop strings, and a hand-written loop
can (1) drop every finished sequence from the batch and its KV cache at once, so the remaining ones do not pay
for it, (2) skip logits processors and per-step generic bookkeeping, and (3) check stop strings on a short
token tail with one batched decode call per step. The answers are the same as ``generate`` (greedy, same prompt
tokens, same left padding and position ids); only the work after a sequence has stopped is saved.

Semantics (kept identical to lm-eval's HF backend so our scores and theirs can be compared item by item):
- prompts are tokenized one by one with the tokenizer's own special-token default, except that a prompt that
  already starts with the BOS string (a chat template) gets no second BOS;
- prompts are sorted longest first (ties by text) and cut into batches of ``batch_size``, left padded;
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
    batches = [order[i:i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    iterator = batches
    if progress:
        from tqdm import tqdm

        iterator = tqdm(batches, desc="generating", unit="batch")
    for batch in iterator:
        seqs = [token_ids[i] for i in batch]
        for index, generated in zip(batch, _generate_batch(model, seqs, settings, device, pad_id, eos_ids,
                                                           forward, tokenizer, tail_window)):
            new_tokens = len(generated)
            visible = generated[:-1] if generated and generated[-1] in eos_ids else generated
            text = cut_at_stop_strings(tokenizer.decode(visible, skip_special_tokens=True), stop)
            results[index] = Generation(text=text, new_tokens=new_tokens, token_ids=generated)
    return results  # type: ignore[return-value]


def _generate_batch(model, seqs: list[list[int]], settings: GenerationSettings, device, pad_id: int,
                    eos_ids: set[int], forward: _ForwardKwargs, tokenizer, tail_window: int) -> list[list[int]]:
    """Greedy-decode one left-padded batch; finished rows leave the batch (and the KV cache) at once."""
    n_rows = len(seqs)
    generated: list[list[int]] = [[] for _ in range(n_rows)]
    if settings.max_new_tokens == 0:
        return generated
    width = max(len(s) for s in seqs)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n_rows, width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention[row, width - len(seq):] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    input_ids, attention, position_ids = input_ids.to(device), attention.to(device), position_ids.to(device)

    cache = _new_cache(model)
    kwargs = {forward.cache_name: cache, "use_cache": True}
    if forward.logits_to_keep:
        kwargs["logits_to_keep"] = 1
    logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, **kwargs).logits
    next_tokens = logits[:, -1, :].argmax(dim=-1)
    positions = position_ids[:, -1]
    active = list(range(n_rows))  # batch row -> original row
    stop = settings.stop
    ones = torch.ones((n_rows, 1), dtype=attention.dtype, device=device)

    for step in range(settings.max_new_tokens):
        tokens = next_tokens.tolist()
        done = [False] * len(active)
        for k, (row, token) in enumerate(zip(active, tokens)):
            generated[row].append(token)
            if token in eos_ids or step + 1 == settings.max_new_tokens:
                done[k] = True
        if stop:
            check = [k for k in range(len(active)) if not done[k]]
            if check:
                tails = tokenizer.batch_decode([generated[active[k]][-tail_window:] for k in check],
                                               skip_special_tokens=True)
                for k, tail in zip(check, tails):
                    if any(s in tail for s in stop):
                        done[k] = True
        if all(done):
            break
        if any(done):
            keep = [k for k in range(len(active)) if not done[k]]
            keep_index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(keep_index)
            attention = attention.index_select(0, keep_index)
            next_tokens = next_tokens.index_select(0, keep_index)
            positions = positions.index_select(0, keep_index)
            active = [active[k] for k in keep]
        attention = torch.cat([attention, ones[: len(active)]], dim=1)
        positions = positions + 1
        logits = model(input_ids=next_tokens[:, None], attention_mask=attention, position_ids=positions[:, None],
                       **kwargs).logits
        next_tokens = logits[:, -1, :].argmax(dim=-1)
    return generated
