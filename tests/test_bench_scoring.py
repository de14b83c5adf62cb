"""bench_scoring.py smoke run (ours only; vLLM is not installed in CI): fork scores equal to the
plain prompts' (the benchmark refuses to report otherwise), the fork path computing only the
suffixes and the re-fed tokens, and the JSON it writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_scoring_benchmark(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_scoring.py"), "--quick",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, cwd=str(tmp_path),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rep = json.loads((tmp_path / "scoring.json").read_text())
    w, ours = rep["workload"], rep["ours"]
    points = w["traces"] * w["points_per_trace"]
    assert len(ours["fork"]["token_logprobs"]) == len(ours["plain"]["token_logprobs"]) == points
    assert all(len(p) == w["suffix_len"] for p in ours["fork"]["token_logprobs"])
    assert rep["fork_vs_plain_max_abs_diff"] <= 1e-3
    # forks prefill the suffix plus the re-fed token at each cut; plain prompts the whole prefix too
    assert ours["fork"]["prefill_tokens"] == points * (w["suffix_len"] + 1)
    assert ours["plain"]["prefill_tokens"] == sum(t + w["suffix_len"] for t in w["fork_positions"]) * w["traces"]
    assert len(ours["fork"]["walls_s"]) == w["reps"] and "vllm" not in rep
    assert "(a) ours, Fork prompts" in proc.stdout and "cpu" in rep["machine"]
