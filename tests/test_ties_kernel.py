"""The chunked TIES kernel (hardshrink top-k, sign election by sign-bit flips) equals mergekit 0.1.5 exactly.

mergekit's ``ties`` merge of one tensor is the oracle; results must be equal element for element (``torch.equal``,
not a tolerance) on the cases where a shortcut could go wrong: magnitudes tied across the top-k cut (also when
the tensor spans several chunks), weighted sums that cancel to exactly zero, zero and negative weights, deltas
that are exactly zero, densities of 1 next to sparsified models, one to four models, bfloat16 and float64.
"""

from __future__ import annotations

import pytest
import torch

from evomerge.methods import METHODS, Workspace, prepare_inputs, run_method
from evomerge.methods.task_arithmetic import CHUNK


def _ours(tensors, weights, densities, normalize, lambda_, lazy=False):
    spec = METHODS["ties"]
    shared = {p.name: p.default for p in spec.global_params} | {"normalize": normalize, "lambda": lambda_}
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    out = torch.empty_like(tensors[0])
    run_method(spec, prepare_inputs(spec, tensors, 0, lazy=lazy), shared, per_model, out, ws=Workspace())
    return out


def _theirs(tensors, weights, densities, normalize, lambda_):
    pytest.importorskip("mergekit")
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors(tensors, base_index=0, name="t")
    params = {"weight": {i + 1: w for i, w in enumerate(weights)},
              "density": {i + 1: d for i, d in enumerate(densities)},
              "normalize": normalize, "lambda": lambda_}
    (result,) = merge_methods.get("ties")((group,), parameters=params)
    return result


def _assert_equal(tensors, weights, densities, label):
    for normalize in (True, False):
        for lambda_ in (1.0, 0.7):
            ours = _ours(tensors, weights, densities, normalize, lambda_)
            theirs = _theirs(tensors, weights, densities, normalize, lambda_)
            assert ours.dtype == theirs.dtype
            assert torch.equal(ours, theirs), (label, normalize, lambda_, (ours - theirs).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quantized_deltas_with_cancellations_and_odd_weights(dtype):
    """Deltas on a coarse grid: huge ties at every cut, many exact zeros, sums that cancel to exactly 0."""
    gen = torch.Generator().manual_seed(21)
    base = torch.randn(120, 90, generator=gen).to(dtype)
    steps = [torch.randint(-3, 4, base.shape, generator=gen) for _ in range(4)]
    steps[1] = -steps[0]  # model 2 cancels model 1 exactly wherever both are kept with equal weights
    tensors = [base] + [(base.double() + s.double() / 16).to(dtype) for s in steps]
    cases = {
        "equal weights, cancelling pair": ([0.5, 0.5, 0.25, 0.75], [0.4, 0.4, 0.7, 0.2]),
        "negative and zero weights": ([0.7, -0.4, 0.0, 1.3], [0.55, 0.3, 0.8, 0.15]),
        "density 1 next to sparsified, weight 1": ([0.3, 1.0, 0.6, 0.2], [1.0, 0.35, 1.0, 0.5]),
    }
    for label, (weights, densities) in cases.items():
        for count in (1, 2, 4):
            _assert_equal(tensors[:count + 1], weights[:count], densities[:count], f"{label}, {count} models")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_deltas_three_models(dtype):
    """Continuous deltas: the cut falls between distinct magnitudes (kept: ``|delta| >= value``); in bfloat16
    the rounded sum elects the sign and the agreeing sum is rounded once."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(200, 150, generator=gen).to(dtype)
    tensors = [base] + [(base.float() + 0.01 * torch.randn(base.shape, generator=gen)).to(dtype) for _ in range(3)]
    _assert_equal(tensors, [0.37, 0.71, 0.53], [0.5, 0.3, 0.8], f"{dtype} gaussian")


def test_ties_split_across_chunk_boundaries():
    """A tensor of several chunks whose cut splits runs of tied magnitudes, kept in different chunks; the
    engine's precomputed order and the one-shot selection path agree with mergekit and with each other."""
    gen = torch.Generator().manual_seed(9)
    numel = 2 * CHUNK + 12345
    base = torch.randn(numel, generator=gen)
    tensors = [base] + [base + torch.randint(-2, 3, (numel,), generator=gen).float() / 8 for _ in range(3)]
    weights, densities = [0.6, 0.9, 0.45], [0.31, 0.77, 0.5]
    _assert_equal(tensors, weights, densities, "multi-chunk")
    assert torch.equal(_ours(tensors, weights, densities, True, 1.0, lazy=True),
                       _ours(tensors, weights, densities, True, 1.0))


def test_zero_deltas_and_zero_base():
    """All-zero task vectors (nothing agrees: the divisor's 0 -> 1 case everywhere) and a base with zeros."""
    base = torch.zeros(64, 33)
    base[::2] = torch.linspace(-1, 1, 33)
    tensors = [base, base.clone(), base + 0.25, base.clone()]
    _assert_equal(tensors, [0.5, 0.8, 0.3], [0.5, 0.5, 0.9], "zero deltas")
    _assert_equal(tensors, [0.5, -0.8, 0.3], [0.2, 1.0, 0.6], "zero deltas, negative weight")


# ---------------------------------------------------------------------------------------------------------
# The fused C++ kernel (evomerge/methods/fused_ties.py) against the torch kernel, bit for bit.

def _merge(method, tensors, weights, densities, normalize, lambda_, seed):
    spec = METHODS[method]
    shared = {p.name: p.default for p in spec.global_params} | {"normalize": normalize, "lambda": lambda_}
    per_model = []
    for w, d in zip(weights, densities):
        params = {p.name: p.default for p in spec.per_model_params} | {"weight": w, "density": d}
        per_model.append(params)
    out = torch.empty_like(tensors[0])
    run_method(spec, prepare_inputs(spec, tensors, 0), shared, per_model, out, ws=Workspace(),
               generator=torch.Generator().manual_seed(seed))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_fused_kernel_equals_the_torch_kernel_bit_for_bit(method, dtype, monkeypatch):
    from evomerge.methods import fused_ties

    if not fused_ties.available():
        pytest.skip("no C++ toolchain here: the torch kernel does the work")
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3 * CHUNK // 256 + 7, 256, generator=gen).to(dtype)   # several chunks and a ragged end
    deltas = [torch.randn(base.shape, generator=gen).to(dtype) * s for s in (0.02, 0.05, 0.01, 0.03)]
    deltas[1][:40] = -deltas[0][:40]          # cancelling sums
    deltas[2][40:60] = 0                      # exact zeros
    tensors = [base] + [base + d for d in deltas]
    calls = []
    real = fused_ties.ties_combine
    monkeypatch.setattr(fused_ties, "ties_combine", lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = [([0.5, 0.5, 0.25, 0.75], [0.4, 0.4, 0.7, 0.2]), ([0.7, -0.4, 0.0, 1.3], [0.55, 0.3, 0.8, 0.15]),
             ([1.0, 1.0, 1.0, 1.0], [1.0, 0.35, 1.0, 0.5]), ([0.3, 0.9], [0.5, 0.6])]
    for weights, densities in cases:
        sources = tensors[:1 + len(weights)]
        for normalize in (True, False):
            for lambda_ in (1.0, 0.7):
                calls.clear()
                fused = _merge(method, sources, weights, densities, normalize, lambda_, seed=3)
                assert calls, "the fused kernel was not used"
                with monkeypatch.context() as off:
                    off.setattr(fused_ties, "ties_combine", lambda *a, **k: False)
                    reference = _merge(method, sources, weights, densities, normalize, lambda_, seed=3)
                bits = torch.int32 if dtype == torch.float32 else torch.int64
                assert torch.equal(fused.view(bits), reference.view(bits)), (method, weights, normalize, lambda_)


def test_fused_kernel_is_built_once_and_then_imported_without_locks():
    """A fresh process imports the cached library: no compile, no lock file a killed worker could leave behind."""
    import subprocess
    import sys

    from evomerge import native
    from evomerge.methods import fused_ties

    if not fused_ties.available():
        pytest.skip("no C++ toolchain here: the torch kernel does the work")
    code = "from evomerge.methods import fused_ties; print(fused_ties.available())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "True"
    assert "compiling" not in done.stderr
    cache = native.cache_dir()
    assert [p.name for p in cache.iterdir() if p.suffix == ".so"] and not list(cache.rglob("lock"))
