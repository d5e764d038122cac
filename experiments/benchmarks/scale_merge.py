"""Users' scale: a Qwen2.5-0.5B-shaped bfloat16 family (or ~1.5B), `evomerge merge` vs mergekit 0.1.5, and the
in-memory engine's bf16 candidates vs the time to copy their bytes once.

Models: base + 2 dense fine-tunes (every tensor perturbed), Qwen2 architecture, tied embeddings, bfloat16,
sharded safetensors, written tensor by tensor with seeded random values under ``.cache/scale_merge/SHAPE``
(gitignored; built once, reused). Shapes: 0.5b = hidden 896, 24 layers, intermediate 4864, 14 heads / 2 kv
heads, vocab 151936 (494M parameters); 1.5b = hidden 1536, 28 layers, intermediate 8960, 12 / 2 heads (1.54B).

a) merge: `evomerge merge` vs `mergekit-yaml`, each a separate process (alternating which goes first), ties and
   dare_ties, bf16 compute (no ``dtype:``) and float32 compute (``dtype: float32``); wall time, peak RSS
   (``ru_maxrss`` of that child from ``os.wait4``) and peak anonymous memory (``RssAnon`` of /proc/PID/status
   sampled every 20 ms: the process's own allocations, without the page cache of the memory-mapped inputs);
   medians of ``--repeats``; ratios evomerge / mergekit. Targets: time <= 0.5x, peak RSS <= 1.0x.
b) engine, one fresh process per configuration (2 threads): construction time, resident bytes per parameter
   (sources + statistics) and the process's anonymous memory, per-candidate ``materialize`` time (median of
   ``--candidates`` random candidates) vs the time to copy the candidate's bytes once (interleaved with the
   candidates, same process; median): ties with and without the int32 sort order, dare_ties, and streamed
   sources (read per candidate). Wall times on 2 threads, and CPU times (the candidate's process CPU time, the
   copy's on one torch thread: idle intra-op threads spin, and a shared machine's other jobs stretch the wall
   clock but not these). Targets: ties <= 3x the copy, dare_ties <= 5x.
c) ``--merge-only``: only evomerge's side of a) (used for the 1.5B memory measurement).
d) ``--device cuda``: a) merges on the GPU (``evomerge merge --device cuda``, ``mergekit-yaml --cuda``) and b)'s
   engine lives there (times after ``torch.cuda.synchronize``; the peak GPU memory of each configuration is
   printed as well). experiments/benchmarks/gpu_check.sh runs it.

Last measured (docs/MEMORY.md, 2026-11-29, the 2-core machine otherwise idle): b) ties 0.27 s per candidate,
5.8-9.6x the wall time of one copy of its 0.99 GB (9.4-10.0x in CPU time; target 3x); dare_ties 0.47 s, 9.2x
wall, 17.1x CPU (target 5x; 55x before the Mersenne Twister kernel). a) against mergekit: ties 0.90x (bf16)
and 0.91x (float32) its wall time (target 0.5x: both tools' time is the sort that reproduces mergekit's
tie-break), dare_ties 0.34x / 0.36x; peak RSS 0.62-0.85x.

Usage:
    python experiments/benchmarks/scale_merge.py                          # 0.5b, a) and b)
    python experiments/benchmarks/scale_merge.py --shape 1.5b --part a --merge-only --methods ties,dare_ties
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
CACHE = REPO / ".cache" / "scale_merge"
SHAPES = {
    "0.5b": {"hidden": 896, "layers": 24, "intermediate": 4864, "heads": 14, "kv_heads": 2, "vocab": 151936},
    "1.5b": {"hidden": 1536, "layers": 28, "intermediate": 8960, "heads": 12, "kv_heads": 2, "vocab": 151936},
}
GB = 1024**3


# --------------------------------------------------------------------------------------------------- models


def tensor_shapes(s: dict[str, int]) -> dict[str, tuple[int, ...]]:
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], h)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                       p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (s["intermediate"], h),
                       p + "mlp.up_proj.weight": (s["intermediate"], h),
                       p + "mlp.down_proj.weight": (h, s["intermediate"])})
    shapes["model.norm.weight"] = (h,)
    return shapes


def qwen2_config(s: dict[str, int]) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": s["hidden"],
            "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "vocab_size": s["vocab"],
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
            "bos_token_id": 1, "eos_token_id": 2}


def build_family(shape: str) -> dict[str, Path]:
    """base, model_1, model_2 under .cache/scale_merge/SHAPE (built once, tensor by tensor)."""
    import torch
    from safetensors.torch import save_file

    from evomerge import tiny

    root = CACHE / shape
    paths = {name: root / name for name in ("base", "model_1", "model_2")}
    if (root / "done").is_file():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    spec = SHAPES[shape]
    shapes = tensor_shapes(spec)
    tok = tiny.make_tokenizer()
    print(f"building 3 x {sum(int(torch.Size(v).numel()) for v in shapes.values()) / 1e9:.2f}B bf16 models in "
          f"{root} (once) ...", flush=True)
    for m, path in enumerate(paths.values()):
        path.mkdir(parents=True)
        shards: list[dict[str, torch.Tensor]] = [{}]
        shard_bytes, index = 0, {}
        for t, (tname, tshape) in enumerate(shapes.items()):
            gen = torch.Generator().manual_seed(1000 + t)
            base = torch.randn(tshape, generator=gen) * (0.02 if len(tshape) == 2 else 0.1) + (len(tshape) == 1)
            if m:
                gen.manual_seed(1000 * m + 7 + t * 13)
                base += torch.randn(tshape, generator=gen) * (0.002 if len(tshape) == 2 else 0.01)
            value = base.to(torch.bfloat16)
            if shard_bytes + value.numel() * 2 > 600 * 1024**2 and shards[-1]:
                shards.append({})
                shard_bytes = 0
            shards[-1][tname] = value
            shard_bytes += value.numel() * 2
        for i, tensors in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(tensors, str(path / file), metadata={"format": "pt"})
            index.update({k: file for k in tensors})
        total = sum(v.numel() * 2 for s in shards for v in s.values())
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": index}))
        (path / "config.json").write_text(json.dumps(qwen2_config(spec), indent=1))
        tok.save_pretrained(path)
        shards.clear()  # free this model's tensors before building the next
    (root / "done").write_text("ok\n")
    return paths


def recipe(method: str, paths: dict[str, Path], compute: str, rng: random.Random | None = None) -> dict:
    """ties / dare_ties over the two fine-tunes; ``compute`` bf16 (the sources' dtype) or float32."""
    weights, densities = [0.6, 0.4], [0.5, 0.5]
    models = []
    for i, name in enumerate(("model_1", "model_2")):
        w = round(rng.uniform(0.1, 1.0), 4) if rng else weights[i]
        d = round(rng.uniform(0.2, 0.9), 4) if rng else densities[i]
        models.append({"model": str(paths[name]), "parameters": {"weight": w, "density": d}})
    data = {"merge_method": method, "base_model": str(paths["base"]), "models": models}
    if compute == "float32":
        data["dtype"] = "float32"
    return data


# --------------------------------------------------------------------------------------------------- a) merge


def rss_anon(pid: int | str = "self") -> int:
    """RssAnon of a process in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], log: Path, env: dict[str, str]) -> dict:
    """Run ``cmd``; wall time, its peak RSS (``ru_maxrss`` of exactly this child) and sampled peak RssAnon."""
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak_anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_anon = max(peak_anon, rss_anon(proc.pid))
            time.sleep(0.02)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gb": usage.ru_maxrss * 1024 / GB,
            "peak_anon_gb": peak_anon / GB}


def part_a(paths: dict[str, Path], args) -> list[dict]:
    import yaml

    work = CACHE / "work"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TQDM_DISABLE="1")
    cuda = args.device.startswith("cuda")
    # the installed commands, else the modules (a checkout on PYTHONPATH, e.g. on a lent GPU machine)
    evomerge = ([str(VENV_BIN / "evomerge")] if (VENV_BIN / "evomerge").exists()
                else [sys.executable, "-c", "import sys; from evomerge.cli import main; sys.exit(main())"])
    tools = {"evomerge": lambda r, o: [*evomerge, "merge", str(r), str(o), "--no-progress", "--device", args.device]}
    if not args.merge_only:
        tools["mergekit"] = lambda r, o: [str(VENV_BIN / "mergekit-yaml"), str(r), str(o),
                                          *(["--cuda"] if cuda else [])]
    rows = []
    for method in args.methods:
        for compute in args.computes:
            path = work / f"{method}-{compute}.yaml"
            path.write_text(yaml.safe_dump(recipe(method, paths, compute), sort_keys=False))
            results: dict[str, list[dict]] = {tool: [] for tool in tools}
            for rep in range(args.repeats):
                for tool in (list(tools) if rep % 2 == 0 else list(reversed(tools))):
                    out = work / f"out-{tool}"
                    shutil.rmtree(out, ignore_errors=True)
                    res = measure(tools[tool](path, out), work / f"{tool}.log", env)
                    shutil.rmtree(out, ignore_errors=True)
                    print(f"  a) {method:9s} {compute:8s} {tool:9s} {rep + 1}/{args.repeats}: {res['wall_s']:7.1f} s"
                          f" (cpu {res['cpu_s']:6.1f} s)  peak RSS {res['peak_rss_gb']:5.2f} GB"
                          f"  anon {res['peak_anon_gb']:5.2f} GB", flush=True)
                    results[tool].append(res)
            row = {"method": method, "compute": compute}
            for tool, res in results.items():
                for key in ("wall_s", "cpu_s", "peak_rss_gb", "peak_anon_gb"):
                    row[f"{tool}_{key}"] = statistics.median(r[key] for r in res)
            rows.append(row)
    return rows


def print_a(rows: list[dict], shape: str, repeats: int) -> None:
    print(f"\na) merge, {shape}, 3 x bf16 sources, medians of {repeats}; targets: time <= 0.5x, peak RSS <= 1.0x")
    both = "mergekit_wall_s" in rows[0]
    head = f"{'method':9s} {'compute':8s} {'evo s':>7s} {'evo cpu':>7s} {'evo RSS':>8s} {'evo anon':>8s}"
    if both:
        head += (f" {'mk s':>7s} {'mk cpu':>7s} {'mk RSS':>7s} {'mk anon':>7s} {'time x':>7s} {'cpu x':>6s}"
                 f" {'RSS x':>6s}")
    print(head)
    for r in rows:
        line = (f"{r['method']:9s} {r['compute']:8s} {r['evomerge_wall_s']:7.1f} {r['evomerge_cpu_s']:7.1f} "
                f"{r['evomerge_peak_rss_gb']:8.2f} {r['evomerge_peak_anon_gb']:8.2f}")
        if both:
            tx = r["evomerge_wall_s"] / r["mergekit_wall_s"]
            mx = r["evomerge_peak_rss_gb"] / r["mergekit_peak_rss_gb"]
            cx = r["evomerge_cpu_s"] / r["mergekit_cpu_s"]
            line += (f" {r['mergekit_wall_s']:7.1f} {r['mergekit_cpu_s']:7.1f} {r['mergekit_peak_rss_gb']:7.2f}"
                     f" {r['mergekit_peak_anon_gb']:7.2f} {tx:7.2f} {cx:6.2f} {mx:6.2f}"
                     f"  {'met' if tx <= 0.5 and mx <= 1.0 else 'MISSED'}")
        print(line)


# --------------------------------------------------------------------------------------------------- b) engine

ENGINE_CASES = [  # (label, method, sources mode, keep the int32 sort order)
    ("dare_ties", "dare_ties", "resident", True),
    ("dare_ties, streamed", "dare_ties", "streamed", True),
    ("ties", "ties", "resident", True),
    ("ties, no sort order", "ties", "resident", False),
    ("ties, streamed", "ties", "streamed", False),
]


def engine_child(spec: dict) -> dict:
    """One engine configuration in this (fresh) process: construction, memory, candidate and copy times."""
    import torch

    from evomerge.engine import MergeEngine
    from evomerge.memory_plan import MemoryOptions

    torch.set_num_threads(2)
    device = spec.get("device", "cpu")
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    paths = {k: Path(v) for k, v in spec["paths"].items()}
    anon0 = rss_anon()
    start = time.perf_counter()
    engine = MergeEngine(recipe(spec["method"], paths, "bf16"), device=device, threads=2,
                         memory=MemoryOptions(sources=spec["mode"], keep_order=spec["keep_order"]))
    sync()
    construct = time.perf_counter() - start
    rng = random.Random(11)
    targets = [t for _, t in engine.tensors()]
    copies = [torch.empty_like(t) for t in targets]

    def copy_once() -> None:  # the candidate's bytes, copied once
        for dst, src in zip(copies, targets):
            dst.copy_(src)
        sync()

    times, cpu_times, copy_times, copy_cpu = [], [], [], []
    for _ in range(spec["candidates"]):  # a candidate, then a copy of its bytes: interleaved, same load
        cand = recipe(spec["method"], paths, "bf16", rng)
        start, cpu = time.perf_counter(), time.process_time()
        engine.materialize(cand)
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
        start = time.perf_counter()
        copy_once()
        copy_times.append(time.perf_counter() - start)
        # the copy's CPU time on one torch thread: idle intra-op threads spin, which would count as work
        torch.set_num_threads(1)
        cpu = time.thread_time()
        copy_once()
        copy_cpu.append(time.thread_time() - cpu)
        torch.set_num_threads(2)
    params = engine.memory.params
    return {"construct_s": construct, "candidate_s": statistics.median(times), "copy_s": statistics.median(copy_times),
            "candidate_cpu_s": statistics.median(cpu_times), "copy_cpu_s": statistics.median(copy_cpu),
            "candidate_gb": sum(t.numel() * t.element_size() for t in targets) / GB,
            "source_b_per_param": engine.source_bytes / params, "planned_b_per_param": engine.memory.total / params,
            "anon_b_per_param": (rss_anon() - anon0) / params, "params": params,
            "gpu_peak_gb": torch.cuda.max_memory_allocated() / GB if device.startswith("cuda") else 0.0}


def part_b(paths: dict[str, Path], args) -> list[dict]:
    rows = []
    for label, method, mode, keep in ENGINE_CASES:
        if method not in args.methods or (mode == "streamed" and args.no_streamed) or label in args.skip:
            continue
        spec = {"paths": {k: str(v) for k, v in paths.items()}, "method": method, "mode": mode, "keep_order": keep,
                "device": args.device,
                "candidates": args.candidates}
        done = subprocess.run([sys.executable, __file__, "--engine-child", json.dumps(spec)], capture_output=True,
                              text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        if done.returncode != 0:
            sys.exit(f"engine child failed:\n{done.stderr[-3000:]}")
        row = {"label": label, **json.loads(done.stdout.strip().splitlines()[-1])}
        print(f"  b) {label:22s} candidate {row['candidate_s']:7.2f} s (cpu {row['candidate_cpu_s']:6.2f} s)  "
              f"copy {row['copy_s']:.3f} s (cpu {row['copy_cpu_s']:.3f} s)  "
              f"construction {row['construct_s']:6.1f} s  sources {row['source_b_per_param']:5.1f} B/param  "
              f"anon {row['anon_b_per_param']:5.1f} B/param  GPU peak {row['gpu_peak_gb']:5.2f} GB", flush=True)
        rows.append(row)
    return rows


def print_b(rows: list[dict], shape: str) -> None:
    print(f"\nb) engine, {shape}, bf16 sources, 2 threads; candidate vs copying its bytes once (same process); "
          f"targets: ties <= 3x, dare_ties <= 5x (resident)")
    print(f"{'configuration':22s} {'cand s':>7s} {'copy s':>7s} {'ratio':>7s} {'cpu rat':>7s} {'build s':>8s} "
          f"{'src B/p':>8s} {'plan B/p':>8s} {'anon B/p':>8s} {'GPU GB':>7s}")
    for r in rows:
        cpu_ratio = r["candidate_cpu_s"] / r["copy_cpu_s"] if r.get("copy_cpu_s") else float("nan")
        print(f"{r['label']:22s} {r['candidate_s']:7.2f} {r['copy_s']:7.3f} {r['candidate_s'] / r['copy_s']:7.1f} "
              f"{cpu_ratio:7.1f} "
              f"{r['construct_s']:8.1f} {r['source_b_per_param']:8.1f} {r['planned_b_per_param']:8.1f} "
              f"{r['anon_b_per_param']:8.1f} {r.get('gpu_peak_gb', 0.0):7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    parser.add_argument("--part", choices=["a", "b", "ab"], default="ab")
    parser.add_argument("--methods", default="ties,dare_ties")
    parser.add_argument("--computes", default="bf16,float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--merge-only", action="store_true", help="a): evomerge only (no mergekit runs)")
    parser.add_argument("--no-streamed", action="store_true", help="b): skip the streamed configurations")
    parser.add_argument("--skip", default="", help="b): configurations to leave out, labels separated by semicolons")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where a) merges and b)'s engine runs")
    parser.add_argument("--engine-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine_child:
        print(json.dumps(engine_child(json.loads(args.engine_child))))
        return
    args.methods, args.computes = args.methods.split(","), args.computes.split(",")
    args.skip = [label.strip() for label in args.skip.split(";") if label.strip()]
    paths = build_family(args.shape)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    rows_a = part_a(paths, args) if "a" in args.part else []
    rows_b = part_b(paths, args) if "b" in args.part else []
    if rows_a:
        print_a(rows_a, args.shape, args.repeats)
    if rows_b:
        print_b(rows_b, args.shape)


if __name__ == "__main__":
    main()
