"""Alignment and data-aware merging on scikit-learn's bundled digits (8x8 images, 1797 samples, no download).

Three experiments, each over 3 seeds, written to RESULTS.md next to this file:

1. Loss barrier at the midpoint of two 3x128 MLPs trained from different seeds: naive averaging vs
   Git Re-Basin weight matching vs activation matching (evomerge.alignment).
2. A deep narrow MLP (8 hidden layers of 64): barrier after activation matching, without and with REPAIR.
3. Two fine-tunes of one random init (one hidden layer of 512), trained on classes 0-4 and on 5-9 (shared
   10-way head): 10-class test accuracy of
   RegMean, Fisher, plain average, TIES and task arithmetic (the last two from evomerge.methods, applied tensor
   by tensor with base = the shared init).

Barrier = test loss of the midpoint model minus the mean test loss of the two endpoints. Everything that uses
data for merging (activation matching, REPAIR, RegMean's Grams, the Fisher) sees only the training split; the
TIES density and task-arithmetic lambda are picked on the training split too (their best of a small grid).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from evomerge.alignment.activation_matching import activation_matching
from evomerge.alignment.calibration import tensor_batches
from evomerge.alignment.fisher import classifier_fisher, fisher_merge
from evomerge.alignment.permutation_spec import apply_permutation, sequential_permutation_spec
from evomerge.alignment.regmean import linear_input_grams, regmean_merge
from evomerge.alignment.repair import repair
from evomerge.alignment.weight_matching import weight_matching
from evomerge.method_registry import get_method
from evomerge.methods import Workspace, prepare_inputs, run_method

HERE = Path(__file__).resolve().parent

# targets from the issue (measured with independent code over 3 seeds)
TARGET_WM_BARRIER = 0.05
TARGET_REPAIR_CUT = 0.60
TARGET_REGMEAN_ACC = 0.94


def load_data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def mlp(width: int, depth: int, seed: int, kaiming: bool = False) -> nn.Sequential:
    """``depth`` hidden ReLU layers of ``width``; ``kaiming``: He-normal weights and zero biases (deep nets
    do not train from PyTorch's default init with SGD)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d_in = 64
    for _ in range(depth):
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    layers.append(nn.Linear(d_in, 10))
    if kaiming:
        for layer in layers:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int,
          batch_size: int = 64, optimizer: str = "adam") -> nn.Module:
    """Adam at a constant ``lr``, or SGD (momentum 0.9) with a one-cycle schedule peaking at ``lr``."""
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = (len(y) + batch_size - 1) // batch_size
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = None
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            sel = order[i:i + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[sel]), y[sel]).backward()
            opt.step()
            if sched is not None:
                sched.step()
    return model.eval()


@torch.no_grad()
def loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def interpolate(state_a: dict, state_b: dict, t: float = 0.5) -> dict:
    return {k: (1 - t) * state_a[k] + t * state_b[k] for k in state_a}


def with_state(template: nn.Module, state: dict) -> nn.Module:
    import copy

    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model.eval()


def barrier(template: nn.Module, state_a: dict, state_b: dict, x, y) -> tuple[float, float]:
    la, _ = loss_acc(with_state(template, state_a), x, y)
    lb, _ = loss_acc(with_state(template, state_b), x, y)
    lm, am = loss_acc(with_state(template, interpolate(state_a, state_b)), x, y)
    return lm - (la + lb) / 2, am


def experiment_alignment(seed: int, data) -> dict[str, float]:
    xtr, ytr, xte, yte = data
    a = train(mlp(128, 3, seed=1000 + seed), xtr, ytr, epochs=40, lr=1e-3, seed=seed)
    b = train(mlp(128, 3, seed=2000 + seed), xtr, ytr, epochs=40, lr=1e-3, seed=seed + 1)
    spec = sequential_permutation_spec(a)
    sa, sb = a.state_dict(), b.state_dict()
    out: dict[str, float] = {"acc_a": loss_acc(a, xte, yte)[1], "acc_b": loss_acc(b, xte, yte)[1]}
    out["naive_barrier"], out["naive_acc"] = barrier(a, sa, sb, xte, yte)
    wm = apply_permutation(spec, weight_matching(spec, sa, sb, seed=seed), sb)
    out["wm_barrier"], out["wm_acc"] = barrier(a, sa, wm, xte, yte)
    am = apply_permutation(spec, activation_matching(spec, a, b, tensor_batches(xtr, batch_size=512)), sb)
    out["am_barrier"], out["am_acc"] = barrier(a, sa, am, xte, yte)
    # the permuted models compute the same function as B
    with torch.no_grad():
        out["wm_func_err"] = float((with_state(a, wm)(xte) - b(xte)).abs().max())
    return out


def experiment_repair(seed: int, data) -> dict[str, float]:
    xtr, ytr, xte, yte = data
    a = train(mlp(64, 8, seed=3000 + seed, kaiming=True), xtr, ytr, epochs=20, lr=0.05, seed=seed, optimizer="sgd")
    b = train(mlp(64, 8, seed=4000 + seed, kaiming=True), xtr, ytr, epochs=20, lr=0.05, seed=seed + 1,
              optimizer="sgd")
    spec = sequential_permutation_spec(a)
    sa, sb = a.state_dict(), b.state_dict()
    batches = tensor_batches(xtr, batch_size=512)
    aligned = apply_permutation(spec, activation_matching(spec, a, b, batches), sb)
    out: dict[str, float] = {"acc_a": loss_acc(a, xte, yte)[1], "acc_b": loss_acc(b, xte, yte)[1]}
    out["naive_barrier"], out["naive_acc"] = barrier(a, sa, sb, xte, yte)
    out["am_barrier"], out["am_acc"] = barrier(a, sa, aligned, xte, yte)
    b_aligned = with_state(a, aligned)
    merged = with_state(a, interpolate(sa, aligned))
    hidden_linears = [name for name, m in a.named_children() if isinstance(m, nn.Linear)][:-1]
    repair(merged, [a, b_aligned], [0.5, 0.5], hidden_linears, batches)
    la, lb = loss_acc(a, xte, yte)[0], loss_acc(b, xte, yte)[0]
    lm, am = loss_acc(merged, xte, yte)
    out["repair_barrier"], out["repair_acc"] = lm - (la + lb) / 2, am
    out["cut"] = 1 - out["repair_barrier"] / out["am_barrier"]
    return out


def merge_with_method(method: str, base: dict, states: list[dict], weights: list[float],
                      shared: dict, per_model: dict) -> dict:
    """A state dict merged tensor by tensor with one of evomerge.methods' methods (base = the shared init)."""
    spec = get_method(method)
    shared_params = {p.name: p.default for p in spec.global_params} | shared
    per_model_params = [{p.name: p.default for p in spec.per_model_params} | per_model | {"weight": w}
                        for w in weights]
    ws = Workspace()
    merged = {}
    for name, tensor in base.items():
        inputs = prepare_inputs(spec, [tensor] + [s[name] for s in states], base_pos=0)
        out = torch.empty_like(tensor)
        merged[name] = run_method(spec, inputs, shared_params, per_model_params, out, ws=ws).clone()
    return merged


def experiment_data_aware(seed: int, data) -> dict[str, float]:
    xtr, ytr, xte, yte = data
    init = mlp(512, 1, seed=5000 + seed)
    base = {k: v.clone() for k, v in init.state_dict().items()}
    tasks = [ytr < 5, ytr >= 5]
    models = []
    for i, task in enumerate(tasks):
        m = with_state(init, base)
        models.append(train(m, xtr[task], ytr[task], epochs=30, lr=1e-3, seed=seed * 10 + i))
    states = [m.state_dict() for m in models]
    acc = lambda state: loss_acc(with_state(init, state), xte, yte)[1]  # noqa: E731
    train_acc = lambda state: loss_acc(with_state(init, state), xtr, ytr)[1]  # noqa: E731
    out: dict[str, float] = {"task0_model": acc(states[0]), "task1_model": acc(states[1])}
    task_batches = [tensor_batches(xtr[t], ytr[t], batch_size=256) for t in tasks]
    grams = [linear_input_grams(m, bs) for m, bs in zip(models, task_batches)]
    out["regmean"] = acc(regmean_merge(states, grams, alpha=0.9))
    fishers = [classifier_fisher(m, bs, mode="exact") for m, bs in zip(models, task_batches)]
    out["fisher"] = acc(fisher_merge(states, fishers, floor=1e-6))
    out["average"] = acc(interpolate(states[0], states[1]))
    ta = {lam: merge_with_method("task_arithmetic", base, states, [1.0, 1.0], {"lambda": lam}, {})
          for lam in (0.5, 0.75, 1.0)}
    best_lam = max(ta, key=lambda lam: train_acc(ta[lam]))
    out["task_arithmetic"], out["ta_lambda"] = acc(ta[best_lam]), best_lam
    ties = {d: merge_with_method("ties", base, states, [1.0, 1.0], {}, {"density": d}) for d in (0.2, 0.5, 0.8)}
    best_d = max(ties, key=lambda d: train_acc(ties[d]))
    out["ties"], out["ties_density"] = acc(ties[best_d]), best_d
    return out


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _pct(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def write_results(rows: dict[str, list[dict[str, float]]], seeds: list[int], seconds: float, path: Path) -> bool:
    col = lambda exp, key: [r[key] for r in rows[exp]]  # noqa: E731
    mean = lambda exp, key: statistics.mean(col(exp, key))  # noqa: E731
    ok_wm = mean("align", "wm_barrier") <= TARGET_WM_BARRIER
    ok_repair = mean("repair", "cut") >= TARGET_REPAIR_CUT
    others = ("fisher", "average", "ties", "task_arithmetic")
    ok_regmean = mean("data", "regmean") >= TARGET_REGMEAN_ACC and all(
        mean("data", "regmean") > mean("data", o) for o in others)
    mark = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    lines = [
        "# Alignment and data-aware merges on digits",
        "",
        f"Written by `python experiments/alignment_digits/run.py` ({len(seeds)} seeds: {seeds}; "
        f"{seconds:.0f} s on this machine, torch threads = 1). Mean ± std over seeds. "
        "Test split: 20% of the 1797 images, stratified; merges see only the training split.",
        "",
        "## 1. Loss barrier at the midpoint, two 3x128 MLPs from different seeds",
        "",
        "| merge | barrier (test loss) | midpoint accuracy (%) |",
        "|---|---|---|",
        f"| naive average | {_mean_std(col('align', 'naive_barrier'))} | {_pct(col('align', 'naive_acc'))} |",
        f"| weight matching | {_mean_std(col('align', 'wm_barrier'))} | {_pct(col('align', 'wm_acc'))} |",
        f"| activation matching | {_mean_std(col('align', 'am_barrier'))} | {_pct(col('align', 'am_acc'))} |",
        "",
        f"Endpoints: {_pct(col('align', 'acc_a'))} % and {_pct(col('align', 'acc_b'))} %. "
        f"Weight-matched B vs B, max |logit difference|: {max(col('align', 'wm_func_err')):.2e} "
        "(the permuted model computes the same function).",
        "",
        "## 2. REPAIR on a deep narrow MLP (8 hidden layers of 64), activation matching",
        "",
        "| merge | barrier (test loss) | midpoint accuracy (%) |",
        "|---|---|---|",
        f"| naive average | {_mean_std(col('repair', 'naive_barrier'))} | {_pct(col('repair', 'naive_acc'))} |",
        f"| activation matching | {_mean_std(col('repair', 'am_barrier'))} | {_pct(col('repair', 'am_acc'))} |",
        f"| + REPAIR | {_mean_std(col('repair', 'repair_barrier'))} | {_pct(col('repair', 'repair_acc'))} |",
        "",
        f"Endpoints: {_pct(col('repair', 'acc_a'))} % and {_pct(col('repair', 'acc_b'))} % (He-normal init, SGD "
        "with momentum, one-cycle schedule). REPAIR corrects the pre-activation mean and std of the 8 hidden "
        f"Linear layers, folded into their weights. It cuts the barrier by {_pct(col('repair', 'cut'))} %.",
        "",
        "## 3. Merging two fine-tunes of one init (classes 0-4 and 5-9), 10-class test accuracy (%)",
        "",
        "An MLP with one hidden layer of 512 from one random init, trained (Adam, 30 epochs) on the images of "
        "classes 0-4 and, separately, of 5-9, both with the 10-way head. RegMean's Grams and the Fisher come "
        "from each model's own training images; TIES and task arithmetic use the init as base.",
        "",
        "| method | accuracy (%) |",
        "|---|---|",
        f"| model trained on 0-4 | {_pct(col('data', 'task0_model'))} |",
        f"| model trained on 5-9 | {_pct(col('data', 'task1_model'))} |",
        f"| RegMean (alpha 0.9) | {_pct(col('data', 'regmean'))} |",
        f"| Fisher (exact diagonal, own data) | {_pct(col('data', 'fisher'))} |",
        f"| average | {_pct(col('data', 'average'))} |",
        f"| TIES (evomerge.methods; density picked on train: {col('data', 'ties_density')}) "
        f"| {_pct(col('data', 'ties'))} |",
        f"| task arithmetic (evomerge.methods; lambda picked on train: {col('data', 'ta_lambda')}) "
        f"| {_pct(col('data', 'task_arithmetic'))} |",
        "",
        "## Targets",
        "",
        f"- weight-matching barrier <= {TARGET_WM_BARRIER}: {mean('align', 'wm_barrier'):.3f} "
        f"(naive {mean('align', 'naive_barrier'):.3f}) -> {mark(ok_wm)}",
        f"- REPAIR cuts the barrier by >= {TARGET_REPAIR_CUT:.0%}: {mean('repair', 'cut'):.0%} -> {mark(ok_repair)}",
        f"- RegMean >= {TARGET_REGMEAN_ACC:.0%} and above every other method: {mean('data', 'regmean'):.1%} "
        f"-> {mark(ok_regmean)}",
        "",
        "## Per seed",
        "",
    ]
    for exp, label in (("align", "alignment"), ("repair", "REPAIR"), ("data", "data-aware")):
        for seed, r in zip(seeds, rows[exp]):
            lines.append(f"- {label}, seed {seed}: " + ", ".join(f"{k}={v:.4g}" for k, v in r.items()))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ok_wm and ok_repair and ok_regmean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="where to write the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny MLPs: ~20x faster than the default on this machine
    start = time.time()
    seeds = list(range(args.seeds))
    rows: dict[str, list[dict[str, float]]] = {"align": [], "repair": [], "data": []}
    for seed in seeds:
        data = load_data(seed)
        for exp, fn in (("align", experiment_alignment), ("repair", experiment_repair),
                        ("data", experiment_data_aware)):
            t = time.time()
            rows[exp].append(fn(seed, data))
            print(f"seed {seed} {exp}: {time.time() - t:.1f}s " +
                  ", ".join(f"{k}={v:.4g}" for k, v in rows[exp][-1].items()), flush=True)
    ok = write_results(rows, seeds, time.time() - start, args.out)
    print(args.out.read_text(encoding="utf-8"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
