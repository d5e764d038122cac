"""The memory plan's kernel scratch for the methods outside the task-arithmetic family (arcee_fusion, karcher,
multislerp, nearswap, nuslerp, ram, ramplus_tl, sce, and linear / slerp / model_stock) is at least what their
kernels allocate: the peak resident memory of a real merge on a 512 x 512 bf16 tensor, measured in a child
process by experiments/benchmarks/method_scratch.py (Linux: /proc/self/clear_refs and VmHWM)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.memory_plan import kernel_scratch
from evomerge.methods import METHODS

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "method_scratch.py"
NEW = ["arcee_fusion", "karcher", "multislerp", "nearswap", "nuslerp", "ram", "ramplus_tl", "sce", "sce:0.5",
       "linear", "slerp", "model_stock"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_planned_scratch_covers_the_measured_peak():
    done = subprocess.run([sys.executable, str(SCRIPT), "--rows", "512", "--cols", "512", "--dtypes", "bfloat16",
                           "--methods", ",".join(NEW), "--check"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines()[2:]]
    assert [r[0] for r in rows] == NEW
    for method, _, _, measured, planned in rows:
        assert float(measured) > 0 and float(planned) >= float(measured) - 1.0, method


def test_every_method_outside_task_arithmetic_has_a_scratch_entry():
    for name, spec in METHODS.items():
        if spec.family in ("task_arithmetic", "passthrough"):
            continue
        assert kernel_scratch(spec, 3, 2, 2) > 0, name
