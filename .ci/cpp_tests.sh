#!/usr/bin/env bash
# C++ unit tests of the core: a normal build run by ctest, then a separate AddressSanitizer +
# UndefinedBehaviorSanitizer build whose tests abort (nonzero exit) on the first sanitizer report.
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
echo "== C++ core: all tests passed (plain and sanitized)"
