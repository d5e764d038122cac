"""The lean decoding step (Llama, Mistral, Qwen2) and its attention kernel.

- With SDPA attention the lean step's logits equal the model's own forward bit for bit, on the same buffers.
- The C++ attention kernel equals a float64 reference within float32 rounding, for ragged windows, several
  query heads per key/value head, head sizes that are not a multiple of its vector width, and one-column
  windows.
- The step is chosen only for the exact supported classes without hooks (greedy generation through it is
  checked against generate() in test_generation_paths.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from evomerge import tiny
from evomerge.evaluators import decode_attention, generation, lean_decode
from evomerge.evaluators.decode_attention import DecodeWindow

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(arch: str, vocab_size: int = 97):
    return tiny.make_model(arch, seed=0, vocab_size=vocab_size, hidden_size=48, num_layers=2, num_heads=6,
                           num_kv_heads=2, intermediate_size=64).eval()


def prefilled(model, lengths: list[int], hi: int, seed: int):
    """Buffers holding a prefill of random prompts of ``lengths`` that end at column ``hi`` (as the slot
    decoder leaves them), their starts, and each row's next token."""
    n_layers = model.config.num_hidden_layers
    buffers = generation._KVBuffers(len(lengths), hi + 8, n_layers)
    region = generation._Region()
    cache = generation._region_cache(buffers, region, n_layers)
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    ids, attention, positions = generation.left_padded_batch(seqs, 0, "cpu")
    width = ids.shape[1]
    region.row0, region.row1, region.lo, region.hi = 0, len(seqs), hi - width, hi - width
    with torch.inference_mode():
        first = generation._ForwardKwargs(model).next_tokens(model, ids, attention, positions, cache)
    starts = torch.tensor([hi - n for n in lengths])
    return buffers, region, cache, starts, first


def model_forward_logits(model, buffers, region, cache, starts, tokens, hi):
    """The model's own forward for one decoding step through the region cache (as the slot decoder calls it)."""
    lo = int(starts.min())
    region.row0, region.row1, region.lo, region.hi = 0, len(tokens), lo, hi
    attention = (torch.arange(lo, hi + 1)[None, :] >= starts[:, None]).long()
    with torch.inference_mode():
        return model(input_ids=tokens[:, None], attention_mask=attention, position_ids=(hi - starts)[:, None],
                     cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1, :]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_lean_step_with_sdpa_equals_the_model_forward_bit_for_bit(arch, monkeypatch):
    model = make_model(arch)
    step = lean_decode.lean_step_for(model)
    assert step is not None
    lengths, hi = [5, 17, 1, 11], 20
    ours_state = prefilled(model, lengths, hi, seed=1)
    theirs_state = prefilled(model, lengths, hi, seed=1)
    monkeypatch.setattr(DecodeWindow, "use_kernel", lambda self, query: False)
    buffers, _, _, starts, tokens = ours_state
    for step_index in range(3):  # several steps: each reads the keys/values the previous one wrote
        column = hi + step_index
        with torch.inference_mode():
            ours = step.logits(tokens, (column - starts)[:, None], buffers,
                               DecodeWindow(starts, int(starts.min()), column))
        theirs = model_forward_logits(model, *theirs_state[:4], tokens, column)
        assert torch.equal(ours, theirs), (arch, step_index, (ours - theirs).abs().max())
        for layer in range(model.config.num_hidden_layers):
            assert torch.equal(buffers.keys[layer][:, :, :column + 1], theirs_state[0].keys[layer][:, :, :column + 1])
        tokens = ours.argmax(dim=-1)


def reference_attention(query, keys, values, starts, hi, scale):
    """softmax(q.k * scale) . v per row over columns [start, hi], in float64."""
    n, heads, group, dim = query.shape
    out = torch.empty(query.shape, dtype=torch.float64)
    for b in range(n):
        k = keys[b, :, starts[b]:hi + 1].double()          # [heads, columns, dim]
        v = values[b, :, starts[b]:hi + 1].double()
        weights = torch.softmax(query[b].double() @ k.transpose(1, 2) * scale, dim=-1)  # [heads, group, cols]
        out[b] = weights @ v
    return out


@pytest.mark.parametrize("group, dim", [(1, 64), (3, 40), (2, 8)])
def test_attention_kernel_equals_a_float64_reference(group, dim):
    if not decode_attention.available():
        pytest.skip("no C++ toolchain here: SDPA does the work")
    gen = torch.Generator().manual_seed(group * 100 + dim)
    rows, heads, columns, hi = 7, 3, 90, 70
    starts = torch.tensor([0, 70, 69, 12, 40, 3, 55])  # a one-column and a two-column window among them
    keys = torch.randn(rows + 2, heads, columns, dim, generator=gen)   # more rows than live ones, as in the decoder
    values = torch.randn(rows + 2, heads, columns, dim, generator=gen)
    for b, start in enumerate(starts.tolist()):  # huge padding left of each start: it must not leak in
        keys[b, :, :start] = 1e4
        values[b, :, :start] = -1e4
    query = torch.randn(rows, heads, group, dim, generator=gen) * 3  # peaked softmax weights too
    scale = 1 / math.sqrt(dim)
    window = DecodeWindow(starts, int(starts.min()), hi)
    assert window.use_kernel(query)
    ours = window.attend(query, keys, values, scale)
    expected = reference_attention(query, keys, values, starts, hi, scale)
    assert (ours.double() - expected).abs().max() < 2e-6 * expected.abs().max()
    # and SDPA over the padded window (the other path) agrees as closely
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        query, keys[:rows, :, :hi + 1], values[:rows, :, :hi + 1], scale=scale,
        attn_mask=(torch.arange(hi + 1)[None, :] >= starts[:, None])[:, None, None, :])
    assert (sdpa.double() - expected).abs().max() < 2e-6 * expected.abs().max()
    one = starts.tolist().index(70)
    assert torch.allclose(ours[one], values[one, :, 70:71].expand(heads, group, dim), atol=0, rtol=0)
    torch.set_num_threads(2)  # the kernel is serial: with more torch threads SDPA's parallel kernel runs
    assert not window.use_kernel(query)


def test_lean_step_is_chosen_only_where_it_computes_the_model_forward(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    assert lean_decode.lean_step_for(make_model("llama")) is not None
    assert lean_decode.lean_step_for(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2))) is None

    class Custom(LlamaForCausalLM):
        pass

    custom = Custom(make_model("llama").config)
    assert lean_decode.lean_step_for(custom) is None
    hooked = make_model("llama")
    hooked.model.layers[1].self_attn.register_forward_hook(lambda module, args, output: None)
    assert lean_decode.lean_step_for(hooked) is None
    monkeypatch.setenv("EVOMERGE_LEAN_DECODE", "0")
    assert lean_decode.lean_step_for(make_model("llama")) is None

