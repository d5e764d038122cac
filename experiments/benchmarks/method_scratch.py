"""Measured kernel scratch per method vs the memory plan's (``memory_plan.job_bytes(...).scratch``), bytes per element.

For each per-tensor method (base + 2 models where the method takes them; nearswap and arcee_fusion take 2
inputs), on one ROWS x COLS tensor in bfloat16 and float32: the inputs are prepared as the engine keeps them
(``prepare_inputs``), one warm-up merge fills the workspace, then the peak resident memory of this process is
reset (``/proc/self/clear_refs`` 5) and one more merge runs; its scratch is the rise of the peak (``VmHWM``)
above the resident memory before it (``VmRSS``). glibc is told to give every allocation of 128 KiB or more its
own mapping (``MALLOC_MMAP_THRESHOLD_``, set by re-running this script in a child) so freed temporaries return to
the system and do not hide the next ones. Linux only; CPU.

Usage:
    python experiments/benchmarks/method_scratch.py                 # 4096 x 4096, prints the table
    python experiments/benchmarks/method_scratch.py --rows 1024 --check   # exit 1 when a plan is below its measure
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "della", "slerp", "model_stock", "nearswap",
           "arcee_fusion", "karcher", "multislerp", "nuslerp", "ram", "ramplus_tl", "sce", "sce:0.5"]
REQUIRED = {"weight": 0.5, "density": 0.5, "t": 0.3}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def measure(label: str, dtype_name: str, rows: int, cols: int) -> dict:
    """One method's measured and planned scratch (bytes per element) in this process."""
    import torch

    from evomerge.memory_plan import job_bytes
    from evomerge.merge import TensorJob
    from evomerge.methods import METHODS as SPECS
    from evomerge.methods import Workspace, prepare_inputs, run_method

    torch.set_num_threads(1)
    name, _, topk = label.partition(":")
    spec = SPECS[name]
    dtype = getattr(torch, dtype_name)
    count = 2 if name in ("nearswap", "arcee_fusion", "slerp") else 3
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=gen).to(dtype)
    tensors = [base] + [(base.float() + 0.01 * torch.randn(rows, cols, generator=gen)).to(dtype)
                        for _ in range(count - 1)]
    base_pos = 0 if (spec.needs_base or spec.base_optional) else None
    others = count - (1 if base_pos is not None else 0)
    shared = {p.name: p.default for p in spec.global_params}
    shared.update({k: v for k, v in REQUIRED.items() if spec.param(k) is not None and not spec.param(k).per_model
                   and spec.param(k).required})
    if topk:
        shared["select_topk"] = float(topk)
    per_model = [{p.name: (REQUIRED.get(p.name) if p.required else p.default) for p in spec.per_model_params}
                 for _ in range(others if spec.per_model_scope == "non_base" else count)]
    job = TensorJob(name="x", slice_index=0, sources=[(i, "x") for i in range(count)],
                    param_refs=[None if i == base_pos else i for i in range(count)], base_pos=base_pos, t=0.0,
                    shape=(rows, cols), compute_dtype=dtype)
    prepared = prepare_inputs(spec, tensors, base_pos)
    out = torch.empty(rows, cols, dtype=dtype)
    ws = Workspace(torch.device("cpu"))
    generator = torch.Generator().manual_seed(1) if spec.random else None
    with torch.no_grad():
        run_method(spec, prepared, shared, per_model, out, generator=generator, ws=ws)  # warm-up: workspace
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status("VmRSS")
        if generator is not None:
            generator.manual_seed(1)
        run_method(spec, prepared, shared, per_model, out, generator=generator, ws=ws)
        peak = _status("VmHWM")
    n = rows * cols
    planned = job_bytes(spec, job, dtype).scratch
    return {"method": label, "dtype": dtype_name, "inputs": count, "measured": (peak - before + ws.nbytes) / n,
            "planned": planned / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--check", action="store_true", help="exit 1 when a plan is below its measured scratch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # every case in this one process (the peak is reset before each)
        for case in args.child.split(";"):
            label, dtype = case.split("/")
            print(json.dumps(measure(label, dtype, args.rows, args.cols)), flush=True)
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    print(f"kernel scratch per element, {args.rows} x {args.cols} tensor, one thread (bytes per element; the "
          f"workspace counted once filled)")
    print(f"{'method':16s} {'dtype':9s} {'inputs':>6s} {'measured':>9s} {'planned':>8s}", flush=True)
    cases = [f"{label}/{dtype}" for label in args.methods.split(",") for dtype in args.dtypes.split(",")]
    child = subprocess.Popen([sys.executable, __file__, "--rows", str(args.rows), "--cols", str(args.cols),
                              "--child", ";".join(cases)], stdout=subprocess.PIPE, text=True, env=env)
    low = []
    assert child.stdout is not None
    for line in child.stdout:
        r = json.loads(line)
        # 1 B/element of slack: the chunked kernels' fixed-size buffers (a few MB, not per element)
        flag = "" if r["planned"] + 1.0 >= r["measured"] else "  PLAN BELOW MEASURE"
        if flag:
            low.append(f"{r['method']} {r['dtype']}")
        print(f"{r['method']:16s} {r['dtype']:9s} {r['inputs']:6d} {r['measured']:9.1f} {r['planned']:8.1f}{flag}",
              flush=True)
    if child.wait() != 0:
        sys.exit("the measuring child failed")
    if args.check and low:
        sys.exit(f"planned scratch below the measured peak: {', '.join(low)}")


if __name__ == "__main__":
    main()
