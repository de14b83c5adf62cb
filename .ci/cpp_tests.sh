#!/usr/bin/env bash
# C++ unit tests of the core: a normal build run by ctest, then a separate AddressSanitizer +
# UndefinedBehaviorSanitizer build whose tests abort (nonzero exit) on the first sanitizer report.
# MRT_ASAN_PYTEST=1 adds the Python KV tests against a sanitized extension (needs pybind11, pytest).
# Works from a clean clone; needs cmake >= 3.18 and a C++17 compiler; uses ninja when available.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${MRT_CPP_BUILD_DIR:-build/cpp}
gen=()
if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
jobs=$(nproc 2>/dev/null || echo 2)

echo "== C++ core: plain build + ctest"
cmake -S . -B "$out/plain" "${gen[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$out/plain" -j "$jobs"
ctest --test-dir "$out/plain" --output-on-failure -j "$jobs"

echo "== C++ core: ASan + UBSan build + ctest"
cmake -S . -B "$out/asan" "${gen[@]}" -DCMAKE_BUILD_TYPE=Debug -DMRT_SANITIZE=ON >/dev/null
cmake --build "$out/asan" -j "$jobs"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --test-dir "$out/asan" --output-on-failure -j "$jobs"

# Opt-in (slow to compile on 2 cores): the Python differential tests against a sanitized _C.
if [ "${MRT_ASAN_PYTEST:-0}" = "1" ]; then
  echo "== Python KV tests against an ASan + UBSan build of mrt_engine._C"
  mkdir -p "$out/asan-py"
  pkg=$(cd "$out/asan-py" && pwd)
  g++ -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
    -shared -fPIC -std=c++17 $(python3 -m pybind11 --includes) -Icsrc csrc/*.cpp \
    -o "$pkg/_C$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  LD_PRELOAD="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libubsan.so)" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 python3 - "$pkg" <<'PY'
import sys
import mrt_engine
mrt_engine.__path__.insert(0, sys.argv[1])   # this _C shadows the regular build
import pytest
from mrt_engine import _C
assert _C.__file__.startswith(sys.argv[1]), _C.__file__
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_kv_core.py",
                      "tests/test_kv_core_diff.py", "tests/test_step_plan.py"]))
PY
fi
echo "== C++ core: all tests passed (plain and sanitized)"
