"""benchmarks/bench_branched_gpu.py on the CPU (tiny shape): the JSON a lent GPU run writes.

The GPU run itself is in benchmarks/gpu_check.sh; this keeps its code paths (the transformers
baseline, the teacher-forced greedy check, --profile and --skip-transformers) working between GPU sessions.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_branched_gpu  # noqa: E402


def _run(tmp_path, *extra):
    rc = bench_branched_gpu.main(["--device", "cpu", "--shape", "tiny", "--quick", "--results-dir", str(tmp_path),
                                  *extra])
    assert rc == 0
    with open(tmp_path / "bench_branched_gpu.json") as f:
        return json.load(f)


def test_profiled_run_against_transformers(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    r = _run(tmp_path, "--profile")
    eng = r["mrt_engine"]
    w = r["workload"]
    assert eng["gen_tokens"] == w["traces"] * w["positions"] * w["branches"] * w["answer_len"]
    assert r["transformers"]["gen_tokens"] == eng["gen_tokens"]
    # float32 on the CPU: the engine's greedy tokens are transformers' argmax, all of them, and
    # its logprobs are transformers' to float32 rounding
    check = r["greedy_check"]
    assert check["tokens"] > 0 and check["argmax_equal"] == check["tokens"]
    assert check["max_gap_to_argmax"] == 0.0 and check["max_abs_logprob_diff"] < 1e-4
    assert r["headline"]["speedup_vs_transformers"] > 0
    p = eng["profile"]
    assert p["steps"] >= w["answer_len"] and p["wall_s"] > 0
    assert p["device_busy_fraction"] is None and p["kernel_launches"] == 0   # no CUDA kernels on a CPU
    assert p["top_kernels"] == [] and p["top_host_ops"] and p["host_ops_s"] > 0
    for ab in (p["layer_ops_ab"], p["graphs_ab"]):
        assert ab["pairs"] == 3 and len(ab["on_all_s"]) == len(ab["off_all_s"]) == 3 and ab["speedup"] > 0
    assert p["graphs_ab"]["mode"] == "eager" and p["graphs_ab"]["buckets"]   # the pieces served decode steps
    sections = p["host_sections"]
    assert {"gemm", "sampler", "step_build"} <= set(sections)
    assert sum(v["s"] for k, v in sections.items() if k != "wall_s") <= sections["wall_s"] * 1.01


def test_engine_only_run(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    r = _run(tmp_path, "--skip-transformers")
    assert r["transformers"] is None and r["greedy_check"] is None
    assert r["headline"]["speedup_vs_transformers"] is None and r["headline"]["engine_s"] > 0
    assert "profile" not in r["mrt_engine"]
