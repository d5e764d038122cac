"""Merge speed: `evomerge merge` vs `mergekit-yaml`, and in-memory materialization vs the memory-bandwidth floor.

Models: three ~100M-parameter Llama-architecture fine-tunes sharing a base (float32, built locally with
evomerge.tiny; cached under --cache so later runs reuse them).

a) Whole-process wall time and peak memory (the child's peak RSS from getrusage, which includes the pages of
   memory-mapped inputs it touched) of `evomerge merge` and `mergekit-yaml` on the same ties and dare_ties
   recipes, inputs in the page cache; runs alternate which tool goes first so drift on a shared machine hits
   both; medians and ratios.
   Target: evomerge at most 0.5x mergekit's time at no more than its peak memory.
b) `MergeEngine.materialize` of one candidate (a fresh random candidate each time, so nothing is reused between
   timed calls) vs the memory-bandwidth floor: the bytes a merge must move (read the base and every task vector,
   write the output) divided by the copy bandwidth measured here with torch copy_ on buffers of the model's size.
   Target: ties and task_arithmetic at most 3x the floor; dare_ties reported too; candidates per second.

Usage:
    python experiments/benchmarks/merge_speed.py                 # both parts, CPU
    python experiments/benchmarks/merge_speed.py --part b --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

MODEL_SPEC = {  # ~106M parameters: 2 x 24.6M embeddings + 8 x 7.1M decoder layers
    "arch": "llama", "vocab_size": 32000, "hidden_size": 768, "num_layers": 8, "num_heads": 12,
    "num_kv_heads": 12, "intermediate_size": 2048, "max_position_embeddings": 2048, "n_variants": 3,
    "seed": 7, "scale": 0.05,
}

# Run in a fresh interpreter around each timed command: RUSAGE_CHILDREN's ru_maxrss is a high-water mark over
# every child ever waited for, so it must be read in a process that has run exactly one command.
_MEASURE = r"""
import json, resource, subprocess, sys, time
log = open(sys.argv[1], "wb")
start = time.perf_counter()
rc = subprocess.run(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT).returncode
wall = time.perf_counter() - start
peak_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss_mb": peak_rss_mb}))
"""


# --------------------------------------------------------------------------------------------------- models


def build_models(cache: Path) -> dict[str, Path]:
    """base, model_1..3 under cache/ (reused when the spec matches and every folder opens cleanly)."""
    from evomerge.checkpoint import Checkpoint
    from evomerge.errors import EvomergeError

    names = ["base"] + [f"model_{i}" for i in range(1, MODEL_SPEC["n_variants"] + 1)]
    paths = {name: cache / name for name in names}
    spec_file = cache / "spec.json"
    if spec_file.is_file() and json.loads(spec_file.read_text()) == MODEL_SPEC:
        try:
            for path in paths.values():
                Checkpoint(path)
            return paths
        except EvomergeError as exc:
            print(f"rebuilding the benchmark models: {exc}")
    import torch

    from evomerge import tiny

    print(f"building {len(names)} models of ~100M parameters in {cache} (once) ...", flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    spec = dict(MODEL_SPEC)
    built = tiny.make_family(cache, n_variants=spec.pop("n_variants"), arch=spec.pop("arch"),
                             seed=spec.pop("seed"), scale=spec.pop("scale"), dtype=torch.float32, **spec)
    assert set(built) == set(paths)
    spec_file.write_text(json.dumps(MODEL_SPEC, indent=2))
    return paths


def recipe_yaml(method: str, paths: dict[str, Path], rng: random.Random | None = None) -> str:
    """A merge recipe over the three fine-tunes; with ``rng``, a random candidate (as a search would propose)."""
    import yaml

    models = [p for name, p in paths.items() if name != "base"]
    fixed_weights, fixed_densities = [0.5, 0.3, 0.2], [0.5, 0.6, 0.7]
    entries = []
    for i, path in enumerate(models):
        weight = round(rng.uniform(0.1, 1.0), 4) if rng else fixed_weights[i]
        params = {"weight": weight}
        if method != "task_arithmetic":
            params["density"] = round(rng.uniform(0.2, 0.9), 4) if rng else fixed_densities[i]
        entries.append({"model": str(path), "parameters": params})
    recipe = {"merge_method": method, "base_model": str(paths["base"]), "models": entries, "dtype": "float32"}
    return yaml.safe_dump(recipe, sort_keys=False)


# --------------------------------------------------------------------------------------------------- part a


def measure(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(log), *cmd], capture_output=True, text=True,
                         env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        sys.exit(f"command failed (exit {result['rc']}): {' '.join(cmd)}\n--- log {log}:\n{log.read_text()[-3000:]}")
    return result


def part_a(paths: dict[str, Path], work: Path, runs: int, methods: list[str]) -> list[dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TQDM_DISABLE="1")
    tools = {
        "evomerge": lambda recipe, out: [str(VENV_BIN / "evomerge"), "merge", str(recipe), str(out), "--seed", "0"],
        "mergekit": lambda recipe, out: [str(VENV_BIN / "mergekit-yaml"), str(recipe), str(out),
                                         "--random-seed", "0"],
    }
    rows = []
    for method in methods:
        recipe = work / f"{method}.yaml"
        recipe.write_text(recipe_yaml(method, paths))
        results: dict[str, list[dict]] = {tool: [] for tool in tools}
        warm_page_cache(paths)
        for repetition in range(1, runs + 1):
            order = list(tools) if repetition % 2 else list(reversed(tools))
            for tool in order:
                out = work / f"out_{tool}_{method}"
                shutil.rmtree(out, ignore_errors=True)
                result = measure(tools[tool](recipe, out), work / f"{tool}_{method}.log", env)
                print(f"  a) {method:10s} {tool:9s} run {repetition}/{runs} {result['wall_s']:7.2f} s  "
                      f"peak {result['peak_rss_mb']:7.0f} MB", flush=True)
                results[tool].append(result)
        diff = max_abs_diff(work / f"out_evomerge_{method}", work / f"out_mergekit_{method}")
        row = {"method": method, "max_abs_diff_vs_mergekit": diff}
        for tool, res in results.items():
            row[f"{tool}_s"] = statistics.median(r["wall_s"] for r in res)
            row[f"{tool}_peak_mb"] = statistics.median(r["peak_rss_mb"] for r in res)
        row["time_ratio"] = row["evomerge_s"] / row["mergekit_s"]
        row["memory_ratio"] = row["evomerge_peak_mb"] / row["mergekit_peak_mb"]
        rows.append(row)
    return rows


def warm_page_cache(paths: dict[str, Path]) -> None:
    """Read every model file once so neither tool pays for (or benefits from) a cold disk."""
    for folder in paths.values():
        for file in folder.iterdir():
            with open(file, "rb") as f:
                while f.read(64 << 20):
                    pass


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest element-wise difference between two output checkpoints (a sanity check that both did the same)."""
    from evomerge.checkpoint import Checkpoint

    left, right = Checkpoint(a), Checkpoint(b)
    if sorted(left.tensor_names) != sorted(right.tensor_names):
        return float("nan")
    return max(float((left.get(n).double() - right.get(n).double()).abs().max()) for n in left.tensor_names)


def print_part_a(rows: list[dict]) -> None:
    print("\na) whole-process merge, medians (float32, 3 fine-tunes + base, ~106M parameters each)")
    print(f"{'method':11s} {'evomerge s':>10s} {'mergekit s':>10s} {'time x':>7s} {'evo MB':>8s} {'mk MB':>8s} "
          f"{'mem x':>6s} {'max|diff|':>10s}  target (time <= 0.5x, mem <= 1x)")
    for r in rows:
        ok = r["time_ratio"] <= 0.5 and r["memory_ratio"] <= 1.0
        print(f"{r['method']:11s} {r['evomerge_s']:10.2f} {r['mergekit_s']:10.2f} {r['time_ratio']:7.2f} "
              f"{r['evomerge_peak_mb']:8.0f} {r['mergekit_peak_mb']:8.0f} {r['memory_ratio']:6.2f} "
              f"{r['max_abs_diff_vs_mergekit']:10.2e}  {'met' if ok else 'MISSED'}")
    if any(r["method"].startswith(("dare", "della")) for r in rows):
        print("(max|diff|: random-drop methods draw different masks in the two tools, so a difference is expected "
              "there; deterministic methods should show ~0)")


# --------------------------------------------------------------------------------------------------- part b


def copy_bandwidth(numel: int, device: str, repeats: int = 7) -> float:
    """Bytes moved per second (read + write) by torch copy_ between two float32 buffers of ``numel`` elements."""
    import torch

    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * numel * 4 / statistics.median(times[1:])


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def part_b(paths: dict[str, Path], work: Path, runs: int, methods: list[str], device: str) -> list[dict]:
    import gc

    import torch

    from evomerge.checkpoint import Checkpoint
    from evomerge.engine import MergeEngine
    from evomerge.recipe import Recipe

    base = Checkpoint(paths["base"])
    model_numel = sum(_numel(base.shape(n)) for n in base.tensor_names)
    n_models = len(paths) - 1
    moved_bytes = (n_models + 2) * model_numel * 4  # read base + each task vector, write the output
    bandwidth = copy_bandwidth(model_numel, device)
    floor_s = moved_bytes / bandwidth
    print(f"\n  b) copy bandwidth {bandwidth / 1e9:.1f} GB/s on {device} ({model_numel / 1e6:.0f}M float32 "
          f"buffers); floor = {moved_bytes / 1e9:.2f} GB moved -> {floor_s * 1e3:.0f} ms", flush=True)
    rows = []
    for method in methods:
        recipe_path = work / f"engine_{method}.yaml"
        recipe_path.write_text(recipe_yaml(method, paths))
        start = time.perf_counter()
        engine = MergeEngine(Recipe.load(recipe_path), device=device)
        setup_s = time.perf_counter() - start
        rng = random.Random(0)
        candidates = []
        for i in range(runs + 1):
            path = work / f"engine_{method}_{i}.yaml"
            path.write_text(recipe_yaml(method, paths, rng))
            candidates.append(Recipe.load(path))
        times = []
        for i, candidate in enumerate(candidates):
            _sync(device)
            start = time.perf_counter()
            engine.materialize(candidate)
            _sync(device)
            elapsed = time.perf_counter() - start
            if i:  # the first call is a warm-up
                times.append(elapsed)
            print(f"  b) {method:16s} candidate {i} {elapsed * 1e3:8.0f} ms{'  (warm-up)' if i == 0 else ''}",
                  flush=True)
        median = statistics.median(times)
        rows.append({"method": method, "setup_s": setup_s, "materialize_s": median, "floor_s": floor_s,
                     "ratio": median / floor_s, "candidates_per_s": 1 / median,
                     "bandwidth_gbps": bandwidth / 1e9, "device": device})
        del engine
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def print_part_b(rows: list[dict], runs: int) -> None:
    device = rows[0]["device"] if rows else "?"
    print(f"\nb) in-memory materialization on {device}, median of {runs} candidates "
          f"(copy bandwidth {rows[0]['bandwidth_gbps']:.1f} GB/s)" if rows else "")
    print(f"{'method':16s} {'setup s':>8s} {'ms/cand':>9s} {'floor ms':>9s} {'x floor':>8s} {'cand/s':>7s}  "
          f"target (<= 3x floor for ties, task_arithmetic)")
    for r in rows:
        target = r["method"] in ("ties", "task_arithmetic")
        verdict = ("met" if r["ratio"] <= 3 else "MISSED") if target else "(reported)"
        print(f"{r['method']:16s} {r['setup_s']:8.1f} {r['materialize_s'] * 1e3:9.0f} {r['floor_s'] * 1e3:9.0f} "
              f"{r['ratio']:8.2f} {r['candidates_per_s']:7.2f}  {verdict}")


# --------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["a", "b", "both"], default="both")
    parser.add_argument("--device", default="cpu", help="device for part b (cpu or cuda)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench_models")
    parser.add_argument("--methods-a", default="ties,dare_ties")
    parser.add_argument("--methods-b", default="task_arithmetic,ties,dare_ties")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.runs < 3:
        print("note: fewer than 3 runs; the targets are defined on medians of at least 3")

    paths = build_models(args.cache)
    results: dict[str, object] = {"device": args.device}
    with tempfile.TemporaryDirectory(prefix="merge_speed-", dir=args.cache.parent) as tmp:
        work = Path(tmp)
        if args.part in ("a", "both"):
            results["a"] = part_a(paths, work, args.runs, args.methods_a.split(","))
        if args.part in ("b", "both"):
            results["b"] = part_b(paths, work, args.runs, args.methods_b.split(","), args.device)
    if "a" in results:
        print_part_a(results["a"])
    if "b" in results:
        print_part_b(results["b"], args.runs)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
