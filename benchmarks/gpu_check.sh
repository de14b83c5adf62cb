#!/usr/bin/env bash
# One-command GPU check for a lent CUDA machine (under 8 minutes, installs nothing):
#   1. build the C++ extension in place with the machine's own python3 (failure is recorded, not fatal:
#      the kernels and their tests do not need it; the KV bookkeeping falls back to its Python twin);
#   2. the GPU-marked tests (kernels compiled natively vs their torch twins, backend vs torch backend,
#      deterministic mode bitwise on hardware) — with pytest if the machine has it, else the file's runner;
#   3. benchmarks/bench_kernels.py (cascade vs per-sequence decode vs SDPA, bandwidth vs copy).
# Writes gpu_check.json (+ bench_kernels.json and logs) to $OUT when set, else benchmarks/results/.
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python3 to pick another interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DEST=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$DEST"
LOG=$DEST/gpu_check.log
: > "$LOG"
T0=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

# Without an install, mrt_engine.kernels / mrt_engine.trainer resolve through temporary links
# (setup.py maps them with package_dir); removed again on exit.
LINKS=()
for pkg in kernels trainer; do
  if [ ! -e "mrt_engine/$pkg" ]; then ln -s "../$pkg" "mrt_engine/$pkg" && LINKS+=("mrt_engine/$pkg"); fi
done
cleanup() { for l in "${LINKS[@]}"; do rm -f "$l"; done; }
trap cleanup EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET

say "environment"
$PY - <<'PY' 2>&1 | tee -a "$LOG"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton missing:", e)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY

say "1/3 build_ext --inplace"
timeout 120 $PY setup.py build_ext --inplace >> "$LOG" 2>&1
BUILD_RC=$?
say "build_ext rc=$BUILD_RC"

say "2/3 GPU tests"
GPU_FILES=$(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')
if $PY -c "import pytest" 2>/dev/null; then
  timeout 170 $PY -m pytest -m gpu -q -p no:cacheprovider $GPU_FILES --junitxml="$DEST/gpu_tests.xml" 2>&1 | tee -a "$LOG"
  TEST_RC=${PIPESTATUS[0]}
else
  say "pytest not installed: running tests/test_kernels_gpu.py directly"
  timeout 170 $PY tests/test_kernels_gpu.py 2>&1 | tee -a "$LOG"
  TEST_RC=${PIPESTATUS[0]}
fi
say "tests rc=$TEST_RC"

say "3/3 bench_kernels"
OUT="$DEST" timeout 150 $PY benchmarks/bench_kernels.py --results-dir "$DEST" 2>&1 | tee -a "$LOG"
BENCH_RC=${PIPESTATUS[0]}
say "bench rc=$BENCH_RC"

$PY - "$DEST" "$BUILD_RC" "$TEST_RC" "$BENCH_RC" "$(( $(date +%s) - T0 ))" <<'PY'
import json, os, sys
dest, build, tests, bench, secs = sys.argv[1], *map(int, sys.argv[2:])
report = {"build_ext_rc": build, "gpu_tests_rc": tests, "bench_rc": bench, "seconds": secs,
          "ok": tests == 0 and bench == 0}
path = os.path.join(dest, "bench_kernels.json")
if os.path.exists(path):
    with open(path) as f:
        report["bench_kernels"] = json.load(f)
with open(os.path.join(dest, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1)
print(json.dumps({k: v for k, v in report.items() if k != "bench_kernels"}))
PY
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
