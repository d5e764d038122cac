"""The random-draw kernel (evomerge/methods/mt_draws.py) reproduces torch's CPU stream exactly.

Each case runs the kernel and torch on two generators with the same state, then checks the draws AND the state
left behind (the next draws from both generators agree), for lengths that end anywhere in the engine's
624-word blocks and generators already part-way through one.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.methods import mt_draws

pytestmark = pytest.mark.skipif(not mt_draws.available(), reason="no C++ compiler for the draw kernel")

LENGTHS = (1, 2, 623, 624, 625, 1248, 1249, 100_003)
ALREADY_DRAWN = (0, 1, 623, 624, 5000)


def _twins(seed: int, drawn: int) -> tuple[torch.Generator, torch.Generator]:
    first = torch.Generator()
    first.manual_seed(seed)
    if drawn:
        torch.rand(drawn, generator=first)
    second = torch.Generator()
    second.set_state(first.get_state())
    return first, second


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("drawn", ALREADY_DRAWN)
def test_uniform_equals_torch_rand_and_leaves_the_same_state(n, drawn):
    ours, theirs = _twins(1000 + n, drawn)
    out = torch.empty(n)
    assert mt_draws.uniform_into(out, ours)
    assert torch.equal(out, torch.rand(n, generator=theirs))
    assert torch.equal(torch.rand(1000, generator=ours), torch.rand(1000, generator=theirs))
    assert ours.get_state().equal(theirs.get_state())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [0.0, 2.0 ** -24, 0.3, 0.5, float(torch.tensor(0.37, dtype=torch.bfloat16)), 1.0, 1.5])
def test_keep_mask_equals_torch_rand_below_p(dtype, p):
    for n, drawn in ((625, 0), (100_003, 623), (1249, 5000)):
        ours, theirs = _twins(7 * n + drawn, drawn)
        mask = torch.full((n,), 7.0, dtype=dtype)
        assert mt_draws.keep_mask_into(mask, p, ours)
        assert torch.equal(mask, (torch.rand(n, generator=theirs) < p).to(dtype))
        assert ours.get_state().equal(theirs.get_state())


def test_keep_mask_equals_bernoulli_of_a_bf16_probability():
    """mergekit's DARE on bf16 CPU tensors: torch.bernoulli(full_like(delta, density)) in bf16."""
    density = torch.tensor(0.53, dtype=torch.bfloat16)
    ours, theirs = _twins(11, 0)
    mask = torch.empty(70_000, dtype=torch.bfloat16)
    assert mt_draws.keep_mask_into(mask, float(density), ours)
    assert torch.equal(mask, torch.bernoulli(torch.full((70_000,), float(density), dtype=torch.bfloat16),
                                             generator=theirs))


def test_the_kernel_steps_aside_where_it_does_not_apply():
    gen = torch.Generator()
    gen.manual_seed(3)
    before = gen.get_state()
    assert not mt_draws.keep_mask_into(torch.empty(10), 0.5, None)  # torch's shared default generator
    assert not mt_draws.uniform_into(torch.empty(10, dtype=torch.float64), gen)
    assert not mt_draws.keep_mask_into(torch.empty(10, 2).t(), 0.5, gen)  # not contiguous
    assert gen.get_state().equal(before)


@pytest.mark.parametrize("p, k", [(0.0, 0), (1.0, 2 ** 24), (0.5, 2 ** 23), (2.0 ** -24, 1), (0.3, None)])
def test_threshold_24_is_the_exact_integer_cut(p, k):
    p32 = float(torch.tensor(p, dtype=torch.float32))
    cut = mt_draws.threshold_24(p32)
    if k is not None:
        assert cut == k
    # every 24-bit value below the cut draws a float below p, none at or above it
    assert (cut - 1) * 2.0 ** -24 < p32 <= cut * 2.0 ** -24 or cut == 0
