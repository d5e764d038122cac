"""bfloat16 and float16 sources take the fused C++ TIES kernel (evomerge/methods/fused_ties.py), and stay
bit-identical: to the torch kernel on adversarial tensors (ties at the cut, cancelling sums, exact zeros, zero and
negative weights, several chunks), and to mergekit 0.1.5 through ``evomerge merge`` and the in-memory engine on a
small bf16/fp16 family (the fast path asserted used, the compile counted once per machine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.methods import METHODS, Workspace, fused_ties, prepare_inputs, run_method

REDUCED = [torch.bfloat16, torch.float16]


def _merge(method, tensors, weights, densities, normalize, lambda_, seed):
    spec = METHODS[method]
    shared = {p.name: p.default for p in spec.global_params} | {"normalize": normalize, "lambda": lambda_}
    per_model = [{p.name: p.default for p in spec.per_model_params} | {"weight": w, "density": d}
                 for w, d in zip(weights, densities)]
    out = torch.empty_like(tensors[0])
    run_method(spec, prepare_inputs(spec, tensors, 0), shared, per_model, out, ws=Workspace(),
               generator=torch.Generator().manual_seed(seed))
    return out


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that the fused kernel handled (returned True)."""
    if not fused_ties.available():
        pytest.skip("no C++ toolchain here: the torch kernel does the work")
    calls = []
    real = fused_ties.ties_combine

    def counting(*args, **kwargs):
        handled = real(*args, **kwargs)
        calls.append(handled)
        return handled

    monkeypatch.setattr(fused_ties, "ties_combine", counting)
    return calls


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_fused_reduced_precision_equals_the_torch_kernel_bit_for_bit(method, dtype, fused_calls, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(131, 257, generator=gen).to(dtype)   # many kernel blocks and a ragged end
    deltas = [(torch.randn(base.shape, generator=gen) * s).to(dtype) for s in (0.02, 0.05, 0.01, 0.03)]
    deltas[1][:40] = -deltas[0][:40]          # cancelling sums
    deltas[2][40:60] = 0                      # exact zeros
    deltas[3][60:90] = torch.randint(-2, 3, (30, 257), generator=gen).to(dtype) / 64   # ties at every cut
    tensors = [base] + [(base.float() + d.float()).to(dtype) for d in deltas]
    cases = [([0.7, -0.4, 0.0, 1.3], [0.55, 0.3, 0.8, 0.15]), ([1.0, 0.5, 1.0], [1.0, 0.35, 0.5])]
    for weights, densities in cases:
        sources = tensors[:1 + len(weights)]
        for normalize in (True, False):
            for lambda_ in (1.0, 0.7):
                fused_calls.clear()
                fused = _merge(method, sources, weights, densities, normalize, lambda_, seed=3)
                assert fused_calls and all(fused_calls), "the fused kernel was not used"
                with monkeypatch.context() as off:
                    off.setattr(fused_ties, "ties_combine", lambda *a, **k: False)
                    reference = _merge(method, sources, weights, densities, normalize, lambda_, seed=3)
                assert torch.equal(fused.view(torch.int16), reference.view(torch.int16)), \
                    (method, weights, normalize, lambda_)


@pytest.mark.parametrize("dtype", REDUCED)
def test_fused_reduced_precision_special_values_equal_the_torch_kernel(dtype, fused_calls, monkeypatch):
    """Subnormals (common in float16 task vectors: below 6.1e-5), sums that overflow to infinity, infinities
    and NaNs in the inputs: the vectorized conversions (F16C for float16) round them as torch does. (A NaN's
    encoding may differ: torch's own kernels do not agree on one, 0xFFFF from a cast and 0x7FC0 from arithmetic.)"""
    gen = torch.Generator().manual_seed(9)
    info = torch.finfo(dtype)
    base = torch.randn(67, 129, generator=gen).to(dtype)
    deltas = [(torch.randn(base.shape, generator=gen) * s).to(dtype) for s in (3e-6, 2e-5, 0.02)]
    deltas[0][:5] = torch.tensor([info.tiny, -info.tiny, info.smallest_normal / 3, 0.0, -0.0], dtype=dtype)[:, None]
    deltas[1][5:10] = info.max                    # weighted sums past the largest finite value
    deltas[2][5:10] = info.max
    deltas[2][10, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")], dtype=dtype)
    base[11, :2] = torch.tensor([float("nan"), float("inf")], dtype=dtype)
    tensors = [base] + [(base.float() + d.float()).to(dtype) for d in deltas]
    for method in ("ties", "dare_ties"):
        for normalize, lambda_ in ((True, 1.0), (False, 1.7)):
            fused_calls.clear()
            fused = _merge(method, tensors, [0.9, 1.4, 0.6], [0.6, 0.9, 1.0], normalize, lambda_, seed=4)
            assert fused_calls and all(fused_calls), "the fused kernel was not used"
            with monkeypatch.context() as off:
                off.setattr(fused_ties, "ties_combine", lambda *a, **k: False)
                reference = _merge(method, tensors, [0.9, 1.4, 0.6], [0.6, 0.9, 1.0], normalize, lambda_, seed=4)
            same = (fused.view(torch.int16) == reference.view(torch.int16)) | (fused.isnan() & reference.isnan())
            assert same.all(), (method, normalize, lambda_)  # every bit, except which NaN encoding a NaN has
            assert fused.isnan().sum() < fused.numel() or method == "dare_ties"  # (an infinite L1 norm: all NaN)


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def reduced_family(request, tmp_path_factory):
    from evomerge import tiny

    return tiny.make_family(tmp_path_factory.mktemp(str(request.param)), n_variants=2, arch="qwen2", seed=6,
                            dtype=request.param, max_shard_size="60KB")


def _mergekit(recipe: dict, out: Path) -> None:
    config = pytest.importorskip("mergekit.config")
    merge = pytest.importorskip("mergekit.merge")
    options = pytest.importorskip("mergekit.options")
    merge.run_merge(config.MergeConfiguration.model_validate(recipe), str(out),
                    options.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))


def _folder(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_merge_and_engine_equal_mergekit_through_the_fast_path(reduced_family, method, fused_calls, tmp_path):
    """No ``dtype:``: computed in the sources' bf16/fp16 by the fused kernel, equal to mergekit bit for bit."""
    from evomerge.engine import MergeEngine
    from evomerge.merge import run_merge
    from evomerge.recipe import Recipe

    fam = reduced_family
    recipe = {"merge_method": method, "base_model": str(fam["base"]),
              "models": [{"model": str(fam["model_1"]), "parameters": {"weight": 0.7, "density": [0.3, 0.8]}},
                         {"model": str(fam["model_2"]), "parameters": {"weight": 0.45, "density": 0.6}}]}
    if method == "breadcrumbs_ties":
        recipe["parameters"] = {"gamma": 0.05}
    _mergekit(recipe, tmp_path / "mk")
    theirs = _folder(tmp_path / "mk")
    run_merge(Recipe.from_dict(recipe), tmp_path / "ours", progress=False)
    assert fused_calls and all(fused_calls), "evomerge merge did not take the fused kernel"
    ours = _folder(tmp_path / "ours")
    fused_calls.clear()
    engine = {name: t.detach().clone() for name, t in MergeEngine(recipe, threads=2).tensors()}
    assert fused_calls and all(fused_calls), "the engine did not take the fused kernel"
    assert set(ours) == set(theirs) == set(engine)
    for name, want in theirs.items():
        assert ours[name].dtype == engine[name].dtype == want.dtype, name
        assert torch.equal(ours[name], want), name
        assert torch.equal(engine[name], want), name


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_in_reduced_precision_equals_mergekit_bit_for_bit(method, dtype, fused_calls, mergekit_api):
    """DARE's masks drawn by our Mersenne Twister kernel (mt_draws.py), its L1 rescale and the weights applied
    in the fused kernel: every bit equals mergekit 0.1.5's merge of the same bf16/fp16 tensors and seed."""
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    gen = torch.Generator().manual_seed(21)
    base = torch.randn(173, 211, generator=gen).to(dtype)   # draws across many 624-word blocks, ragged end
    tensors = [base] + [(base.float() + torch.randn(base.shape, generator=gen) * s).to(dtype) for s in (0.02, 0.04)]
    for weights, densities in (([0.7, 0.45], [0.3, 0.8]), ([1.0, -0.6], [0.55, 0.55])):
        seed = 5
        ours = _merge(method, tensors, weights, densities, normalize=True, lambda_=1.0, seed=seed)
        group = TensorGroup.from_tensors(tensors, base_index=0, name="t")
        params = {"weight": {i + 1: w for i, w in enumerate(weights)},
                  "density": {i + 1: d for i, d in enumerate(densities)}, "normalize": True}
        torch.manual_seed(seed)
        (theirs,) = merge_methods.get(method)((group,), parameters=params)
        assert theirs.dtype == ours.dtype
        assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16)), (method, weights)
    assert bool(fused_calls) == (method == "dare_ties") and all(fused_calls)  # the sign-consensus merge fused
