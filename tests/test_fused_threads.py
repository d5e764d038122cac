"""The fused TIES kernel split over torch's intra-op threads (``at::parallel_for`` over blocks) and its bitmap of
the elements tied at the top-k cut (unsorted positions, no per-candidate sort) stay bit-identical: to the
kernel on one thread, to the chunked torch kernel and to mergekit 0.1.5's ``ties``, in bfloat16, float16 and
float32, on tensors whose every cut splits a run of tied magnitudes, with the engine's kept sort order and with
the one-shot selection of ``evomerge merge``."""

from __future__ import annotations

import pytest
import torch

from evomerge.methods import METHODS, Workspace, fused_ties, prepare_inputs, run_method
from evomerge.methods.sparsify import magnitude_threshold

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPE = (773, 257)  # 198661 elements: several of the kernel's parallel tasks (65536 elements) and a ragged end


def _family(dtype: torch.dtype, count: int) -> list[torch.Tensor]:
    """A base and ``count`` fine-tunes whose deltas lie on a coarse grid: huge runs of equal magnitudes, so
    the top-k cut splits a tie for every density, plus cancelling pairs and exact zeros."""
    gen = torch.Generator().manual_seed(17)
    base = (torch.randn(SHAPE, generator=gen) * 0.5).to(dtype)
    steps = [torch.randint(-4, 5, SHAPE, generator=gen).float() / 32 for _ in range(count)]
    steps[1][:50] = -steps[0][:50]
    steps[-1][50:90] = 0
    return [base] + [(base.float() + s).to(dtype) for s in steps]


def _ours(tensors, weights, densities, normalize, lambda_, *, lazy: bool, threads: int) -> torch.Tensor:
    spec = METHODS["ties"]
    shared = {p.name: p.default for p in spec.global_params} | {"normalize": normalize, "lambda": lambda_}
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    out = torch.empty_like(tensors[0])
    inputs = prepare_inputs(spec, tensors, 0, lazy=lazy)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run_method(spec, inputs, shared, per_model, out, ws=Workspace())
    finally:
        torch.set_num_threads(previous)
    return out


def _mergekit(tensors, weights, densities, normalize, lambda_) -> torch.Tensor:
    pytest.importorskip("mergekit")
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors(tensors, base_index=0, name="t")
    params = {"weight": {i + 1: w for i, w in enumerate(weights)},
              "density": {i + 1: d for i, d in enumerate(densities)}, "normalize": normalize, "lambda": lambda_}
    (result,) = merge_methods.get("ties")((group,), parameters=params)
    return result


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16", "fp32"])
def test_threaded_kernel_with_tied_cuts_equals_one_thread_torch_and_mergekit(dtype, monkeypatch):
    if not fused_ties.available():
        pytest.skip("no C++ toolchain here: the torch kernel does the work")
    tensors = _family(dtype, 3)
    cases = [([0.6, 0.9, 0.45], [0.31, 0.77, 0.5]), ([0.7, -0.4, 1.0], [0.55, 0.3, 0.8]), ([1.0, 0.5], [0.5, 0.2])]
    for weights, densities in cases:
        sources = tensors[:1 + len(weights)]
        inputs = prepare_inputs(METHODS["ties"], sources, 0, lazy=False)
        tied = [magnitude_threshold(d, s, density) for d, s, density in zip(inputs.deltas, inputs.stats, densities)]
        assert all(t is not None and t.extra is not None and t.extra.numel() > 1000 for t in tied), \
            "every cut splits a run of tied magnitudes"
        for normalize, lambda_ in ((True, 1.0), (False, 0.7), (True, 0.7)):
            args = (sources, weights, densities, normalize, lambda_)
            two = _ours(*args, lazy=False, threads=2)
            assert torch.equal(_bits(two), _bits(_ours(*args, lazy=False, threads=1))), (weights, normalize)
            assert torch.equal(_bits(two), _bits(_ours(*args, lazy=True, threads=2))), "one-shot selection"
            with monkeypatch.context() as off:
                off.setattr(fused_ties, "ties_combine", lambda *a, **k: False)
                torch_kernel = _ours(*args, lazy=False, threads=1)
            assert torch.equal(_bits(two), _bits(torch_kernel)), (weights, normalize, lambda_)
            theirs = _mergekit(*args)
            assert theirs.dtype == two.dtype
            assert torch.equal(two, theirs), (weights, normalize, lambda_, (two - theirs).abs().max().item())


def test_tied_positions_are_a_view_of_the_kept_order_and_a_copy_of_a_one_shot_one():
    """The engine keeps the sort order: the tied positions are a slice of it (nothing sorted or copied per
    candidate); a one-shot merge drops its order after use, so the slice is copied (the order is freed)."""
    tensors = _family(torch.bfloat16, 2)
    inputs = prepare_inputs(METHODS["ties"], tensors, 0, lazy=False)
    delta, kept = inputs.deltas[0], inputs.stats[0]
    assert kept is not None and kept.order is not None
    threshold = magnitude_threshold(delta, kept, 0.4)
    assert threshold is not None and threshold.extra is not None
    assert threshold.extra.untyped_storage().data_ptr() == kept.order.untyped_storage().data_ptr()
    one_shot = prepare_inputs(METHODS["ties"], tensors, 0, lazy=True).stats[0]
    assert one_shot is not None
    copied = magnitude_threshold(delta, one_shot, 0.4)
    assert copied is not None and copied.extra is not None and one_shot.order is None
    assert torch.equal(torch.sort(copied.extra.long()).values, threshold.sorted_extra())
    assert copied.extra.untyped_storage().nbytes() == copied.extra.numel() * copied.extra.element_size()
