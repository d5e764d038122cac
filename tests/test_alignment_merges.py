"""RegMean, Fisher, REPAIR and calibration data on plain torch modules."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from evomerge.alignment.calibration import load_texts, tensor_batches
from evomerge.alignment.fisher import classifier_fisher, fisher_merge
from evomerge.alignment.regmean import linear_input_grams, regmean_merge, with_task_head
from evomerge.alignment.repair import channel_stats, repair
from evomerge.errors import EvomergeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest here


def net(seed: int, d_in: int = 6, hidden: int = 8, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).eval()


# ------------------------------------------------------------------------------------------------ RegMean


def test_regmean_equals_least_squares_on_concatenated_inputs():
    models = [net(s) for s in range(3)]
    inputs = [torch.randn(40 + 10 * i, 6) for i in range(3)]
    grams = [linear_input_grams(m, [x[:20], x[20:]]) for m, x in zip(models, inputs)]
    assert set(grams[0]) == {"0", "2"}
    states = [m.state_dict() for m in models]
    merged = regmean_merge(states, grams, alpha=1.0)

    # first layer: inputs are the raw x; the target outputs are each model's own x W_i^T
    X = torch.cat(inputs).double()
    Y = torch.cat([x.double() @ s["0.weight"].double().T for x, s in zip(inputs, states)])
    expected = torch.linalg.lstsq(X, Y).solution.T
    torch.testing.assert_close(merged["0.weight"].double(), expected, rtol=1e-5, atol=1e-6)
    # second layer: each model's inputs are its own hidden activations
    with torch.no_grad():
        H = [torch.tanh(m[0](x)).double() for m, x in zip(models, inputs)]
    Y2 = torch.cat([h @ s["2.weight"].double().T for h, s in zip(H, states)])
    expected2 = torch.linalg.lstsq(torch.cat(H), Y2).solution.T
    torch.testing.assert_close(merged["2.weight"].double(), expected2, rtol=1e-5, atol=1e-6)
    # biases (and everything that is not a linear weight) are averaged
    torch.testing.assert_close(merged["0.bias"], sum(s["0.bias"] for s in states) / 3)


def test_regmean_alpha_zero_is_a_per_input_feature_weighted_average():
    models = [net(s) for s in range(2)]
    inputs = [torch.randn(30, 6) * (i + 1) for i in range(2)]
    grams = [linear_input_grams(m, [x]) for m, x in zip(models, inputs)]
    states = [m.state_dict() for m in models]
    merged = regmean_merge(states, grams, alpha=0.0)
    d = [g["0"].diagonal() for g in grams]
    expected = (states[0]["0.weight"].double() * d[0] + states[1]["0.weight"].double() * d[1]) / (d[0] + d[1])
    torch.testing.assert_close(merged["0.weight"].double(), expected, rtol=1e-6, atol=1e-7)


def test_regmean_singular_gram_gets_a_ridge_towards_the_average_and_identical_models_merge_to_themselves():
    a = net(0, d_in=10)
    x = torch.randn(4, 10)  # 4 samples in 10 dims: the Gram is singular
    g = linear_input_grams(a, [x])
    assert torch.linalg.matrix_rank(g["0"]) == 4
    merged = regmean_merge([a.state_dict(), a.state_dict()], [g, g], alpha=1.0)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)
    b = net(1, d_in=10)
    merged = regmean_merge([a.state_dict(), b.state_dict()], [g, linear_input_grams(b, [x])])
    assert all(torch.isfinite(v).all() for v in merged.values())


def test_regmean_task_heads_merge_average_or_keep():
    models = [net(s) for s in range(2)]
    x = torch.randn(50, 6)
    grams = [linear_input_grams(m, [x]) for m in models]
    states = [m.state_dict() for m in models]
    merged_all = regmean_merge(states, grams, alpha=1.0, heads="merge", head_names=["2"])
    averaged = regmean_merge(states, grams, alpha=1.0, heads="average", head_names=["2"])
    kept = regmean_merge(states, grams, alpha=1.0, heads="keep", head_names=["2"], head_source=1)
    torch.testing.assert_close(averaged["2.weight"], (states[0]["2.weight"] + states[1]["2.weight"]) / 2)
    assert torch.equal(kept["2.weight"], states[1]["2.weight"]) and torch.equal(kept["2.bias"], states[1]["2.bias"])
    assert not torch.allclose(merged_all["2.weight"], averaged["2.weight"])
    torch.testing.assert_close(merged_all["0.weight"], kept["0.weight"])  # the body does not depend on heads
    own = with_task_head(kept, states[0], ["2"])
    assert torch.equal(own["2.weight"], states[0]["2.weight"]) and torch.equal(own["0.weight"], kept["0.weight"])


# ------------------------------------------------------------------------------------------------ Fisher


def brute_force_fisher(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """sum_c p(c|x) (d log p(c|x) / d theta)^2, one backward pass per (example, class)."""
    fisher = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for xi in x:
        logp = torch.log_softmax(model(xi[None]), dim=-1)[0]
        for c in range(logp.shape[0]):
            model.zero_grad()
            logp[c].backward(retain_graph=True)
            for k, p in model.named_parameters():
                fisher[k] += logp[c].exp().detach() * p.grad ** 2
    return {k: v / len(x) for k, v in fisher.items()}


def test_exact_fisher_matches_the_definition():
    model = net(0)
    x = torch.randn(10, 6)
    expected = brute_force_fisher(model, x)
    got = classifier_fisher(model, [x[:4], x[4:]], mode="exact", chunk_size=3)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=1e-8)


def test_sampled_fisher_converges_to_exact_and_empirical_uses_labels():
    model = net(0)
    x = torch.randn(8, 6)
    exact = classifier_fisher(model, [x], mode="exact")
    sampled = classifier_fisher(model, [x], mode="sampled", n_samples=2000, seed=1)
    rel = sum(float((sampled[k] - exact[k]).abs().sum()) for k in exact) / sum(float(v.sum()) for v in exact.values())
    assert rel < 0.1
    y = torch.randint(0, 3, (8,))
    emp = classifier_fisher(model, [(x, y)], mode="empirical")
    model.zero_grad()
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for xi, yi in zip(x, y):
        model.zero_grad()
        torch.log_softmax(model(xi[None]), -1)[0, yi].backward()
        for k, p in model.named_parameters():
            total[k] += p.grad ** 2 / len(x)
    for k in total:
        torch.testing.assert_close(emp[k], total[k], rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="labels"):
        classifier_fisher(model, [x], mode="empirical")


def test_fisher_merge_of_identical_models_returns_the_model():
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model[1].running_mean.normal_()
    x = torch.randn(16, 6)
    f = classifier_fisher(model, [x])
    assert "1.running_mean" not in f
    merged = fisher_merge([model.state_dict()] * 2, [f, f], weights=[0.3, 0.7])
    for k, v in model.state_dict().items():
        torch.testing.assert_close(merged[k], v, rtol=1e-6, atol=1e-7)
    assert torch.equal(merged["1.num_batches_tracked"], model.state_dict()["1.num_batches_tracked"])


def test_fisher_merge_weights_by_fisher_floor_and_normalize():
    sa = {"w": torch.tensor([1.0, 1.0, 1.0])}
    sb = {"w": torch.tensor([3.0, 3.0, 3.0])}
    fa = {"w": torch.tensor([1.0, 0.0, 0.0])}
    fb = {"w": torch.tensor([1.0, 1.0, 0.0])}
    merged = fisher_merge([sa, sb], [fa, fb], floor=1e-12)
    torch.testing.assert_close(merged["w"], torch.tensor([2.0, 3.0, 2.0]))  # 0/0 -> floor -> plain average
    big = {"w": torch.tensor([100.0, 100.0, 0.0])}
    merged = fisher_merge([sa, sb], [big, fb], floor=1e-12, normalize=True)
    # normalized: A's Fisher /66.7 -> [1.5, 1.5, 0], B's /0.667 -> [1.5, 1.5, 0]
    torch.testing.assert_close(merged["w"], torch.tensor([2.0, 2.0, 2.0]))


# ------------------------------------------------------------------------------------------------ REPAIR


def test_repair_sets_channel_statistics_to_the_interpolation_of_the_endpoints():
    a, b = net(0, hidden=16), net(1, hidden=16)
    merged = net(2, hidden=16)
    merged.load_state_dict({k: 0.5 * a.state_dict()[k] + 0.5 * b.state_dict()[k] for k in a.state_dict()})
    batches = [torch.randn(64, 6) for _ in range(2)]
    repair(merged, [a, b], [0.5, 0.5], ["0", "2"], batches, eps=1e-12)  # eps: BN-style sqrt(var + eps)
    sa, sb, sm = (channel_stats(m, ["0", "2"], batches) for m in (a, b, merged))
    for name in ("0", "2"):
        torch.testing.assert_close(sm[name][0], 0.5 * sa[name][0] + 0.5 * sb[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sm[name][1], 0.5 * sa[name][1] + 0.5 * sb[name][1], rtol=1e-4, atol=1e-5)


def test_repair_with_batchnorm_resets_the_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model[1].running_mean.fill_(5.0)
    model[1].running_var.fill_(9.0)
    batches = [torch.randn(32, 6) + 1 for _ in range(3)]
    repair(model, [model], [1.0], ["1"], batches)
    with torch.no_grad():
        h = torch.cat([model[0](x) for x in batches])
    torch.testing.assert_close(model[1].running_mean, h.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, h.var(0), rtol=1e-4, atol=1e-5)
    assert not model.training and model[1].momentum == 0.1


# ------------------------------------------------------------------------------------------------ calibration


def test_calibration_texts_jsonl_text_and_errors(tmp_path):
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"t{i}", "other": i}) for i in range(10)) + "\n")
    assert load_texts(jl) == [f"t{i}" for i in range(10)]
    five = load_texts(jl, samples=5, seed=3)
    assert len(five) == 5 and five == load_texts(jl, samples=5, seed=3) and set(five) < {f"t{i}" for i in range(10)}
    txt = tmp_path / "c.txt"
    txt.write_text("one\n\ntwo\n")
    assert load_texts(txt) == ["one", "two"]
    for path, kwargs, msg in ((tmp_path / "missing.jsonl", {}, "not found"), (jl, {"field": "body"}, "no field"),
                              (jl, {"samples": 0}, "at least 1")):
        with pytest.raises(EvomergeError, match=msg) as err:
            load_texts(path, **kwargs)
        assert "\n" not in str(err.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(EvomergeError, match=r"bad.jsonl:2"):
        load_texts(bad)


def test_tensor_batches_subsample():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    batches = tensor_batches(x, y, batch_size=4, samples=6, seed=0)
    assert [len(b[0]) for b in batches] == [4, 2]
    assert torch.equal(torch.cat([b[0] for b in batches])[:, 0].long(), torch.cat([b[1] for b in batches]))
