#!/usr/bin/env bash
# Issue 14's GPU checks, for a machine with a CUDA GPU (none is needed by the tests):
#   1. the 0.5B merge on CUDA: `evomerge merge --device cuda` vs `mergekit-yaml --cuda`, ties and dare_ties, bf16
#      and float32 compute, medians of $REPEATS (scale_merge.py part a);
#   2. the engine on CUDA at 0.5B: resident and streamed per-candidate time vs one copy of the candidate's bytes,
#      ties with and without the sort order, peak GPU memory (scale_merge.py part b);
#   3. `evomerge merge` memory at 1.5B on CUDA (part a, evomerge only).
# Usage (repository root):  bash experiments/benchmarks/gpu_check.sh [merge|engine|memory|all]   (default all)
# Environment: PYTHON (default: .venv/bin/python if present, else python3), REPEATS (default 3), OUT (where the
# logs go; default runs/gpu_check). The Python needs torch with CUDA, transformers, accelerate, safetensors and
# evomerge's other dependencies; mergekit 0.1.5 for the comparison (without it part 1 runs evomerge only).
# Nothing is downloaded: the models are built locally under .cache/scale_merge (0.5B: 3 GB, 1.5B: 9 GB of disk).
# Times on an otherwise idle 16-core H200 machine are expected to be a few minutes per stage; each stage runs
# under `timeout` ($STAGE_LIMIT seconds, default 540) so a slow one cannot take the whole device budget.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
REPEATS=${REPEATS:-3}
OUT=${OUT:-runs/gpu_check}
LIMIT=${STAGE_LIMIT:-540}
STAGE=${1:-all}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BENCH=experiments/benchmarks/scale_merge.py

"$PYTHON" - <<'PY' || { echo "gpu_check: no usable CUDA torch in $PYTHON" >&2; exit 2; }
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 1024**3:.0f} GiB")
PY
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>/dev/null || true
echo "load: $(cat /proc/loadavg)"
merge_only=""
mergekit_yaml=$("$PYTHON" -c "import sys, pathlib; print(pathlib.Path(sys.executable).parent / 'mergekit-yaml')")
"$PYTHON" -c "import mergekit" 2>/dev/null && [ -x "$mergekit_yaml" ] \
    || { merge_only="--merge-only"; echo "mergekit not installed: part 1 runs evomerge only"; }

run() {  # name, arguments...
    local name=$1; shift
    echo "== $name: $PYTHON $BENCH $*"
    local start=$SECONDS
    timeout "$LIMIT" nice -n 10 "$PYTHON" $BENCH "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s (log: $OUT/$name.log)"
}

case "$STAGE" in merge|all) run merge_0.5b --shape 0.5b --part a --device cuda --repeats "$REPEATS" $merge_only ;; esac
case "$STAGE" in engine|all) run engine_0.5b --shape 0.5b --part b --device cuda --candidates 5 ;; esac
case "$STAGE" in memory|all) run merge_1.5b --shape 1.5b --part a --device cuda --repeats 1 --merge-only ;; esac
