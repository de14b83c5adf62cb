"""bench_progress.py (bench_branched --mode mrt) smoke run: the headline line, the JSON, and the
engine's prefill equal to the suffixes only (one per point, never a prefix or an answer)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_progress_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_progress.py"),
                           "--quick", "--out-dir", str(tmp_path)], capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"progress estimation: ([\d.]+)x of trace generation time, ([\d.]+)x faster "
                     r"than transformers", last)
    assert m, last
    rep = json.loads((tmp_path / "progress.json").read_text())
    assert float(m.group(1)) == round(rep["progress_over_trace_time"], 2)
    eng, w = rep["engine"], rep["workload"]
    assert eng["points"] == w["traces"] * (w["positions"] + 2) == rep["transformers"]["points"]
    assert eng["prefill_tokens"] == eng["expected_prefill_tokens"]
    assert eng["preemptions"] == 0 and "cpu" in rep["machine"]
