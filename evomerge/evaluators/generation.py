"""Batched greedy decoding for evaluation: the search's fitness hot loop, written for speed.

Why not ``model.generate``: evaluation needs only greedy decoding with stop strings, and a hand-written loop
can (1) drop every finished sequence from the batch and its KV cache at once and refill the freed rows with
waiting prompts (continuous batching: a batch never waits for its longest answer, which is where
``generate``-per-batch loses most of its time: small models are per-step-overhead bound, so the number of
decoding steps is what counts), (2) skip logits processors and per-step generic bookkeeping, and (3) check stop
strings on a short token tail, decoding only rows whose newest token could end a stop string. The answers are
the same greedy continuations as ``generate`` (same prompt tokens, per-sequence masks and position ids); only
the order of work changes.

Two paths: models whose cache is a plain stack of full-attention layers (Llama, Qwen2, Mistral, GPT-2, ...)
keep keys/values in preallocated buffers written in place (``_SlotDecoder``: no per-step concatenation of the
cache, refills written straight into free rows); any other cache (sliding windows that a sequence can reach,
linear attention, ...) takes the generic ``DynamicCache`` path (``_StreamDecoder``), which refills only
mergeable caches. On the first path, Llama, Mistral and Qwen2 models decode through ``lean_decode.py``: the same
operations without transformers' per-call glue, with attention that reads each sequence's own columns only
(``decode_attention.py``).

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
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from evomerge.evaluators.decode_attention import DecodeWindow
from evomerge.evaluators.lean_decode import lean_step_for


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

    def next_tokens(self, model, input_ids, attention, positions, cache) -> torch.Tensor:
        """One forward call through ``cache``: each row's greedy next token (only the last position's logits)."""
        kwargs = {self.cache_name: cache, "use_cache": True}
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, **kwargs).logits
        return logits[:, -1, :].argmax(dim=-1)


def _new_cache(model):
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
        bar = tqdm(total=len(order), desc="generating", unit="item")
    if settings.max_new_tokens == 0:
        finished: Iterator[tuple[int, list[int]]] = ((i, []) for i in order)
    else:
        capacity = max(len(t) for t in token_ids) + settings.max_new_tokens
        capacity += max(16, capacity // 4)  # slack: the window slides right this far before it is moved back
        generic = _StreamDecoder(model, tokenizer, settings, device, pad_id, eos_ids, forward, tail_window)
        n_layers = _slot_layer_count(model, capacity)
        if n_layers:
            fast = _SlotDecoder(model, tokenizer, settings, device, pad_id, eos_ids, forward, tail_window,
                                n_layers, capacity, len(prompts))
            finished = _with_fallback(fast.run(order, token_ids), lambda: generic.run(order, token_ids))
        else:
            finished = generic.run(order, token_ids)
    for index, generated in finished:
        visible = generated[:-1] if generated and generated[-1] in eos_ids else generated
        text = cut_at_stop_strings(tokenizer.decode(visible, skip_special_tokens=True), stop)
        results[index] = Generation(text=text, new_tokens=len(generated), token_ids=generated)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def _with_fallback(fast, generic):
    """Yield from the fast decoder, or from ``generic()`` if the fast one finds (on its first forward call,
    before yielding anything) that the model does not fit it."""
    try:
        first = next(fast)
    except StopIteration:
        return
    except _Unsupported:
        yield from generic()
        return
    yield first
    yield from fast


_STOP_TOKEN_FLAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokens_that_may_end_a_stop_string(tokenizer, stop: tuple[str, ...]) -> list[bool] | None:
    """Per token id: could appending this token make a stop string appear in the decoded text (None: any can).

    A stop string that first appears when token ``t`` is appended ends inside ``t``'s own text, so its last
    character is in ``t``'s text. That reasoning needs ``t``'s text on its own to be its text in context, which
    fails for partial UTF-8 bytes (decoded alone as U+FFFD) and tokens that decode to nothing (special
    tokens): such tokens are always checked. A lone decode may also drop a word-initial space (SentencePiece),
    so when a stop string ends with a space every token is checked. Computed once per tokenizer and stop
    strings (the search decodes with the same tokenizer thousands of times)."""
    if any(s.endswith(" ") for s in stop):
        return None
    try:
        per_tokenizer = _STOP_TOKEN_FLAGS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable or not hashable: compute for this call only
        per_tokenizer = {}
    if stop not in per_tokenizer:
        last_chars = {s[-1] for s in stop}
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        per_tokenizer[stop] = [not piece or "\ufffd" in piece or any(c in piece for c in last_chars)
                               for piece in pieces]
    return per_tokenizer[stop]


def _stop_check(tokenizer, settings: GenerationSettings, tail_window: int):
    """A function (sequences) -> finished flags: does a stop string appear in each sequence's decoded tail.

    Decoding only the last ``tail_window`` tokens suffices: a stop string that appears in the decoded
    continuation first appears when its last character is decoded, which lies in the newest tokens. Sequences
    whose newest token cannot end a stop string are not decoded at all."""
    stop = settings.stop
    may_end = _tokens_that_may_end_a_stop_string(tokenizer, stop)

    def finished(sequences: list[list[int]]) -> list[bool]:
        """Per sequence (token ids), whether a stop string appears in its decoded tail."""
        hits = [False] * len(sequences)
        check = [k for k, seq in enumerate(sequences)
                 if may_end is None or not 0 <= seq[-1] < len(may_end) or may_end[seq[-1]]]
        if check:
            tails = tokenizer.batch_decode([sequences[k][-tail_window:] for k in check], skip_special_tokens=True)
            for k, tail in zip(check, tails):
                hits[k] = any(s in tail for s in stop)
        return hits

    return finished


def _slot_layer_count(model, capacity: int) -> int:
    """Number of cache layers if the model's default cache is a plain stack of full-attention layers (so its
    keys/values may live in our preallocated buffers), else 0 (the generic path is used)."""
    try:
        layers = _new_cache(model).layers
    except Exception:  # noqa: BLE001 - an unusual cache: take the generic path
        return 0
    if not layers:
        return 0
    for layer in layers:
        if type(layer) is DynamicSlidingWindowLayer:
            # a window no sequence reaches is full attention (as in ``generate``); columns never exceed capacity
            if getattr(layer, "sliding_window", 0) < capacity:
                return 0
        elif type(layer) is not DynamicLayer:
            return 0
    return len(layers)


class _Region:
    """The rows ``[row0, row1)`` and columns ``[lo, hi)`` of the key/value buffers one forward call sees; new
    keys/values are written from column ``hi`` on."""

    __slots__ = ("row0", "row1", "lo", "hi")

    def __init__(self) -> None:
        self.row0 = self.row1 = self.lo = self.hi = 0


class _KVBuffers:
    """Preallocated keys and values of every layer, ``[rows, kv heads, columns, head dim]``, zero-initialised
    (masked columns must hold finite numbers: a zero attention weight times NaN is NaN), allocated on the
    layer's first write (head counts and sizes come from the model's own key states)."""

    def __init__(self, rows: int, columns: int, n_layers: int) -> None:
        self.rows, self.columns = rows, columns
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def layer(self, index: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Layer ``index``'s key and value buffers, allocated on its first call."""
        if self.keys[index] is None:
            self.keys[index] = key_states.new_zeros((self.rows, key_states.shape[1], self.columns,
                                                     key_states.shape[3]))
            self.values[index] = value_states.new_zeros((self.rows, value_states.shape[1], self.columns,
                                                         value_states.shape[3]))
        return self.keys[index], self.values[index]

    def allocated(self) -> bool:
        """Whether every layer's buffers exist."""
        return all(k is not None for k in self.keys)

    def buffers(self) -> list[torch.Tensor]:
        """Every allocated key and value buffer (all of them once ``allocated()``)."""
        return [b for b in self.keys + self.values if b is not None]

    def move_rows(self, sources: list[int], targets: list[int], lo: int, hi: int) -> None:
        """Copy rows ``sources`` to rows ``targets`` (columns ``[lo, hi)`` only: the rest is masked)."""
        buffers = self.buffers()
        src: slice | torch.Tensor
        dst: slice | torch.Tensor
        if len(sources) == 1:
            src, dst = slice(sources[0], sources[0] + 1), slice(targets[0], targets[0] + 1)
        else:
            src = torch.tensor(sources, device=buffers[0].device)
            dst = torch.tensor(targets, device=buffers[0].device)
        for buffer in buffers:  # a model placed across devices keeps each layer's buffers on its own device
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device != buffer.device:
                src, dst = src.to(buffer.device), dst.to(buffer.device)
            buffer[dst, :, lo:hi] = buffer[src, :, lo:hi]

    def move_columns(self, rows: int, lo: int, hi: int, new_lo: int) -> None:
        """Move columns ``[lo, hi)`` of the first ``rows`` rows to start at ``new_lo``."""
        for buffer in self.buffers():
            buffer[:rows, :, new_lo:new_lo + hi - lo] = buffer[:rows, :, lo:hi].clone()


def _region_cache(buffers: _KVBuffers, region: _Region, n_layers: int):
    """A transformers ``Cache`` whose layers read and write ``region`` of ``buffers`` in place."""
    class RegionLayer(DynamicLayer):
        """Keys/values in a region of preallocated buffers: ``update`` writes the new states in place (no
        growing concatenation) and returns a view of the region."""

        def __init__(self, index: int) -> None:
            super().__init__()
            self.index = index
            self.is_initialized = True

        def lazy_initialization(self, key_states, value_states) -> None:
            """Nothing to allocate: the buffers are shared and preallocated."""
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            """Write the new keys/values at the region's end; return the region's keys and values."""
            keys, values = buffers.layer(self.index, key_states, value_states)
            end = region.hi + key_states.shape[-2]
            keys[region.row0:region.row1, :, region.hi:end] = key_states
            values[region.row0:region.row1, :, region.hi:end] = value_states
            if region.lo == region.hi:  # nothing before (a prefill): the new states themselves are contiguous
                return key_states, value_states
            self.keys = keys[region.row0:region.row1, :, region.lo:end]
            self.values = values[region.row0:region.row1, :, region.lo:end]
            return self.keys, self.values

        def get_seq_length(self) -> int:
            """Tokens cached in the region."""
            return region.hi - region.lo

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            """(key length, offset) of the attention mask for ``query_length`` new tokens."""
            return region.hi - region.lo + query_length, 0

    cache = DynamicCache()  # a DynamicCache (models may check the type) whose layers are ours
    cache.layers, cache.layer_class_to_replicate = [RegionLayer(i) for i in range(n_layers)], None
    return cache


class _SlotDecoder:
    """Greedy decoding of a stream of prompts in a batch of fixed slots over preallocated key/value buffers.

    Why: with transformers' ``DynamicCache`` every step concatenates (copies, reallocates) the whole cache,
    and joining or dropping sequences copies it again: work that grows with the context length (measured:
    about 10% of the CPU time with 400-token prompts, a few % with 50-token ones). Here each layer's
    keys/values live in one buffer ``[batch_size, heads, columns, dim]`` written in place. All sequences share
    the write column ``hi``; a sequence occupies columns ``[start, hi)`` of its slot (left padding = columns
    before ``start``, masked). A finished sequence frees its slot: the last slots are moved into the holes
    (only those rows are copied) so the live slots stay ``[0, n)``;
    waiting prompts are prefilled straight into free slots, right-aligned at ``hi``. Columns that no live
    sequence uses are skipped (``lo`` = the smallest start). When ``hi`` reaches the buffer's end, the live
    window is moved back to the left (rarely: once per quarter of a window).
    """

    refill_divisor = 4  # refill once a quarter of the batch is free: each prefill call joins several prompts

    def __init__(self, model, tokenizer, settings: GenerationSettings, device, pad_id: int, eos_ids: set[int],
                 forward: _ForwardKwargs, tail_window: int, n_layers: int, capacity: int, n_prompts: int) -> None:
        self.model, self.settings, self.device = model, settings, device
        self.lean = lean_step_for(model)  # decoding steps without transformers' glue (Llama family), or None
        self.pad_id, self.eos_ids, self.forward = pad_id, eos_ids, forward
        self.stop_hit = _stop_check(tokenizer, settings, tail_window) if settings.stop else None
        self.buffers = _KVBuffers(min(settings.batch_size, n_prompts), capacity, n_layers)
        self.capacity = capacity
        self.step_region, self.fill_region = _Region(), _Region()
        self.step_cache = _region_cache(self.buffers, self.step_region, n_layers)
        self.fill_cache = _region_cache(self.buffers, self.fill_region, n_layers)

    def _call(self, input_ids, attention, positions, cache) -> list[int]:
        return self.forward.next_tokens(self.model, input_ids, attention, positions, cache).tolist()

    def run(self, order: list[int], token_ids: list[list[int]]):
        """Yield (prompt index, generated token ids) as sequences finish."""
        settings = self.settings
        refill_at = max(1, settings.batch_size // self.refill_divisor)
        pending = list(reversed(order))  # pop() from the end = next in order
        # waiting[j]: the longest prompt among pending[:j + 1] (what the free columns left of hi must fit)
        waiting: list[int] = []
        for i in pending:
            waiting.append(max(len(token_ids[i]), waiting[-1] if waiting else 0))
        rows: list[int] = []  # prompt index in each live slot
        starts: list[int] = []  # first column of each live slot's sequence
        last: list[int] = []  # each live slot's newest token (recorded, not yet fed to the model)
        generated: dict[int, list[int]] = {}
        hi = max(1, waiting[-1])
        lo = hi
        while pending or rows:
            free = settings.batch_size - len(rows)
            if pending and free and (not rows or free >= refill_at):
                new = [pending.pop() for _ in range(min(free, len(pending)))]
                del waiting[len(pending):]
                first = self._prefill(new, token_ids, len(rows), hi)
                for i in new:
                    starts.append(hi - len(token_ids[i]))
                    generated[i] = []
                lo = min(starts)
                rows, last = rows + new, last + first
                done = self._record(rows, first, generated, len(rows) - len(new))
            else:
                if hi + 1 > self.capacity:  # move the live window back to the left
                    new_hi = max(hi - lo, waiting[-1] if waiting else 0)
                    self.buffers.move_columns(len(rows), lo, hi, new_hi - (hi - lo))
                    starts = [s - hi + new_hi for s in starts]
                    lo, hi = new_hi - (hi - lo), new_hi
                starts_t = torch.tensor(starts, device=self.device)
                positions = (hi - starts_t)[:, None]
                tokens = torch.tensor(last, device=self.device)
                window = DecodeWindow(starts_t, lo, hi)
                if self.lean is not None:
                    last = self.lean.next_tokens(tokens, positions, self.buffers, window).tolist()
                else:
                    region = self.step_region
                    region.row0, region.row1, region.lo, region.hi = 0, len(rows), lo, hi
                    last = self._call(tokens[:, None], window.visible().long(), positions, self.step_cache)
                hi += 1
                done = self._record(rows, last, generated, 0)
            if any(done):
                keep = [k for k, finished in enumerate(done) if not finished]
                for k, finished in enumerate(done):
                    if finished:
                        yield rows[k], generated.pop(rows[k])
                n = len(keep)
                holes = [k for k in range(n) if done[k]]
                movers = [k for k in keep if k >= n]
                if holes:
                    self.buffers.move_rows(movers, holes, lo, hi)
                order_ = list(range(n))
                for h, m in zip(holes, movers):
                    order_[h] = m
                rows = [rows[k] for k in order_]
                starts = [starts[k] for k in order_]
                last = [last[k] for k in order_]
            lo = min(starts) if starts else hi

    def _prefill(self, new: list[int], token_ids: list[list[int]], row0: int, hi: int) -> list[int]:
        """Run the prompts ``new`` into slots ``row0...``, right-aligned to end at column ``hi``; their first
        tokens."""
        seqs = [token_ids[i] for i in new]
        input_ids, attention, positions = left_padded_batch(seqs, self.pad_id, self.device)
        width = input_ids.shape[1]
        region = self.fill_region
        region.row0, region.row1, region.lo, region.hi = row0, row0 + len(seqs), hi - width, hi - width
        first = self._call(input_ids, attention, positions, self.fill_cache)
        if not self.buffers.allocated():
            raise _Unsupported("a cache layer was never written")
        return first

    def _record(self, rows: list[int], tokens: list[int], generated: dict[int, list[int]],
                offset: int) -> list[bool]:
        """Append ``tokens`` to the sequences of slots ``offset...``; which live slots are finished."""
        settings = self.settings
        done = [False] * len(rows)
        check = []
        for k, token in enumerate(tokens, start=offset):
            seq = generated[rows[k]]
            seq.append(token)
            if token in self.eos_ids or len(seq) >= settings.max_new_tokens:
                done[k] = True
            else:
                check.append(k)
        if self.stop_hit is not None and check:
            for k, hit in zip(check, self.stop_hit([generated[rows[k]] for k in check])):
                done[k] = hit
        return done


class _Unsupported(Exception):
    """The model does not write every layer's keys/values through the cache: use the generic path."""


def left_padded_batch(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts right-aligned in one batch (width >= 1): input ids, attention mask and per-sequence position ids
    (0 at each sequence's first real token, as ``generate`` numbers them)."""
    width = max(1, max(len(s) for s in seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention[row, width - len(seq):] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention.to(device), positions.to(device)


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
        self.pad_id, self.eos_ids, self.forward = pad_id, eos_ids, forward
        self.stop_hit = _stop_check(tokenizer, settings, tail_window) if settings.stop else None

    def _call(self, input_ids, attention, positions, cache):
        return self.forward.next_tokens(self.model, input_ids, attention, positions, cache)

    def _prefill(self, seqs: list[list[int]]):
        input_ids, attention, positions = left_padded_batch(seqs, self.pad_id, self.device)
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
        # the live batch: its KV cache, attention mask, positions and next tokens (None before the first prefill)
        cache: Any = None
        attention: Any = None
        positions: Any = None
        next_tokens: Any = None
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
        if self.stop_hit is not None:
            check = [k for k in range(len(rows)) if fresh[k] and not done[k]]
            if check:
                for k, hit in zip(check, self.stop_hit([generated[rows[k]] for k in check])):
                    done[k] = hit
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
