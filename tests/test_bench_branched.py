"""The headline benchmark (benchmarks/bench_branched.py) in --quick mode: it runs end to end, writes
its JSON and chart, and ends with the headline line. Counters that do not depend on timing are
checked against what the workload implies (prefill tokens, branch counts, the KV blocks sharing
predicts); timings are never asserted."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import bench_branched  # noqa: E402
import engine_forks  # noqa: E402
import hf_baseline  # noqa: E402
import workload  # noqa: E402
from workload import Workload  # noqa: E402

HEADLINE = re.compile(r"^fork-phase speedup vs transformers: ([0-9]+(?:\.[0-9]+)?)x$")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cache = tmp_path_factory.mktemp("models")
    env = dict(os.environ, MRT_BENCH_CACHE=str(cache))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_branched.py"), "--quick",
                           "--out-dir", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "branched.json") as f:
        report = json.load(f)
    return proc.stdout, report, out


def test_quick_run_prints_workload_machine_and_headline(quick_run):
    stdout, report, _ = quick_run
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("workload:") and lines[1].startswith("machine:")
    m = HEADLINE.match(lines[-1])
    assert m, f"last line is {lines[-1]!r}"
    assert float(m.group(1)) == report["speedup_vs_transformers"]


def test_quick_report_fields(quick_run):
    _, report, out = quick_run
    w = report["workload"]
    for key in ("traces", "trace_len", "positions", "suffix_len", "branches", "answer_len", "dtype",
                "fork_positions", "generated_tokens", "kv_bytes_per_token"):
        assert key in w
    for key in ("cpu", "logical_cores", "torch", "torch_threads"):
        assert key in report["machine"]
    res = report["results"]
    assert set(res) == {"mrt_engine", "mrt_engine_no_sharing", "transformers"}
    for name, r in res.items():
        for key in ("label", "wall_s", "all_walls_s", "gen_tokens", "gen_tok_s", "prefill_tokens",
                    "peak_kv_bytes", "peak_kv_mib", "speedup_vs_transformers"):
            assert key in r, (name, key)
        assert r["gen_tokens"] == w["generated_tokens"], name
        assert r["wall_s"] > 0 and r["peak_kv_bytes"] > 0
    hf = res["transformers"]
    assert hf["speedup_vs_transformers"] == 1.0
    assert res["mrt_engine"]["speedup_vs_transformers"] == pytest.approx(
        hf["wall_s"] / res["mrt_engine"]["wall_s"], rel=0.01, abs=0.01)
    with open(out / "branched.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quick_counters_match_the_workload(quick_run):
    """Sharing on prefills only the suffixes (plus the re-fed fork token) and holds the blocks the
    sharing model predicts; sharing off and transformers re-prefill every branch's prefix."""
    _, report, _ = quick_run
    w, res = report["workload"], report["results"]
    a, b, hf = res["mrt_engine"], res["mrt_engine_no_sharing"], res["transformers"]
    forks = w["traces"] * w["positions"]
    assert a["prefill_tokens"] == a["engine_prefill_tokens"] == forks * (w["suffix_len"] + 1)
    assert a["peak_kv_blocks"] == a["predicted_kv_blocks"]
    assert a["peak_kv_bytes"] == a["peak_kv_blocks"] * w["block_size"] * w["kv_bytes_per_token"]
    every_branch = w["branches"] * w["traces"] * sum(t + w["suffix_len"] for t in w["fork_positions"])
    assert b["prefill_tokens"] == b["engine_prefill_tokens"] == hf["prefill_tokens"] == every_branch
    assert b["peak_kv_blocks"] == b["predicted_kv_blocks"] > a["peak_kv_blocks"]
    assert a["distinct_branches"] > 1 and a["preemptions"] == 0


def test_predicted_blocks_by_hand():
    # bs 16, one trace of 64, forks at 32 and 64, F=16, K=4, A=8
    w = Workload(traces=1, trace_len=64, prompt_len=8, positions=2, suffix_len=16, branches=4, answer_len=8)
    # trace: 63 tokens of KV -> 4 blocks. Fork at 32: parent blocks [0,31) -> 1 full by reference,
    # prompt 48 tokens = 3 full blocks -> 2 new; each branch 55 tokens -> 1 private tail block.
    # Fork at 64: 3 by reference, prompt 80 = 5 full -> 2 new; branch 87 tokens -> 1 tail block.
    assert engine_forks.predicted_blocks(w, 16, True, "branch") == 4 + (2 + 4) + (2 + 4)
    # no sharing, a request per branch: 4 x (ceil(55/16) + ceil(87/16)) = 4 x (4 + 6)
    assert engine_forks.predicted_blocks(w, 16, False, "branch") == 40
    # no sharing, a request per fork: 3 + 4 x 1 and 5 + 4 x 1
    assert engine_forks.predicted_blocks(w, 16, False, "fork") == 7 + 9


def test_hf_batches_group_equal_lengths_within_max_rows():
    prompts = [[1] * n for n in (5, 3, 5, 3, 5, 7)]
    plan = hf_baseline.batches(prompts, branches=2, max_rows=4)   # at most 2 prompts per call
    assert sorted(i for call in plan for i in call) == list(range(6))
    for call in plan:
        assert len(call) <= 2 and len({len(prompts[i]) for i in call}) == 1
    assert [len(prompts[c[0]]) for c in plan] == [3, 5, 5, 7]
    with pytest.raises(ValueError, match="max_rows"):
        hf_baseline.batches(prompts, branches=8, max_rows=4)


def test_cli_rejects_bad_flags():
    with pytest.raises(SystemExit):
        bench_branched.parse_args(["--engines", "vllm"])            # needs --vllm-python
    with pytest.raises(SystemExit):
        bench_branched.parse_args(["--engines", "nonsense"])
    with pytest.raises(SystemExit):
        bench_branched.parse_args(["--reps", "0"])
    with pytest.raises(ValueError, match="prompt_len"):
        Workload(trace_len=16, prompt_len=16).validate(vocab=100, max_positions=1000)
    with pytest.raises(ValueError, match="max_position"):
        Workload().validate(vocab=8192, max_positions=512)
    args = bench_branched.parse_args(["--quick"])
    assert args.reps == 1 and args.traces == bench_branched.QUICK.traces
    assert args.engines == ["mrt_engine", "mrt_engine_no_sharing", "transformers"]


def test_quick_breakdown_accounts_for_the_profiled_call(quick_run):
    """The per-step breakdown of (a): exclusive categories that add up to the profiled wall time,
    with the GEMMs, attention parts, sampler and step building all present."""
    _, report, _ = quick_run
    a = report["results"]["mrt_engine"]
    bd = a["breakdown"]
    assert bd["steps"] == a["steps"] > 0
    secs = bd["seconds"]
    # decode attention: the C++ kernel in one call where it runs, else the PyTorch path's three parts
    from mrt_engine.attention import cpu_kernel
    attn = ("attn_decode",) if cpu_kernel.simd_available() else ("attn_own", "attn_shared", "attn_merge")
    for key in ("gemm", "gemm_lm_head", "attn_store", *attn, "sampler", "step_build", "norm", "layer_other",
                "scheduler_python"):
        assert key in secs, key
    assert all(v >= 0 for v in secs.values())
    assert sum(secs.values()) == pytest.approx(bd["wall_s"], rel=0.02, abs=0.01)
    assert sum(bd["share"].values()) == pytest.approx(1.0, abs=0.02)
    # every layer's 4 projections ran on every step; the LM head once per step
    layers = int(report["workload"]["model"].split("layers=")[1].split()[0])
    assert bd["calls"]["gemm"] == 4 * layers * bd["steps"]
    assert bd["calls"]["gemm_lm_head"] == bd["calls"]["sampler"] == bd["steps"]
    assert bd["gemm_flop"] > 0


def test_hf_subset_picks_forks_nearest_the_mean_length():
    w = Workload(traces=2, trace_len=64, prompt_len=8, positions=4)     # positions 16, 32, 48, 64
    assert bench_branched.hf_subset(w, 0) == list(range(8))
    assert bench_branched.hf_subset(w, 99) == list(range(8))
    pick = bench_branched.hf_subset(w, 2)                # mean 40: positions 32 and 48 of trace 0
    assert pick == [1, 2]
    assert len(bench_branched.hf_subset(w, 3)) == 3


def test_shape_flag_defaults():
    args = bench_branched.parse_args(["--shape", "qwen2.5-0.5b", "--trace-len", "3072"])
    assert args.trace_source == "prefill" and args.hf_forks == 1
    assert args.out_dir.endswith(os.path.join("results", "qwen0.5b-L3072-fp32"))
    args = bench_branched.parse_args([])
    assert args.shape == "small" and args.trace_source == "generate" and args.hf_forks == 0
    with pytest.raises(SystemExit):
        bench_branched.parse_args(["--shape", "qwen7b"])
    with pytest.raises(SystemExit):
        bench_branched.parse_args(["--hf-forks", "-1"])
    with pytest.raises(SystemExit):
        bench_branched.parse_args(["--vllm-threads", "0"])
    assert bench_branched.parse_args(["--vllm-threads", "1"]).vllm_threads == 1


def test_qwen_shape_is_qwen25_05b():
    q = workload.SHAPES["qwen2.5-0.5b"]
    assert (q.num_layers, q.hidden, q.num_heads, q.num_kv_heads, q.head_dim, q.intermediate, q.vocab) == \
        (24, 896, 14, 2, 64, 4864, 151936)
    assert q.arch == "qwen2" and q.tie_embeddings and q.save_dtype == "bfloat16" and q.rope_theta == 1e6
    # the default shape keeps the folder name it had before the new fields existed
    import hashlib
    import json
    from dataclasses import asdict

    legacy = {k: v for k, v in asdict(workload.ModelShape()).items() if k in workload._LEGACY_SHAPE_FIELDS}
    assert workload.ModelShape().cache_key() == hashlib.sha1(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:12]
    assert q.cache_key() != workload.ModelShape().cache_key()


def test_random_qwen2_model_loads_through_the_real_paths(tmp_path):
    """A small qwen2 shape saved like the 0.5B one (tied embeddings, bf16 weights) loads in the
    engine and in transformers, and both give the same greedy continuation."""
    import torch
    from transformers import AutoModelForCausalLM

    from mrt_engine import LLM, SamplingParams

    shape = workload.ModelShape(arch="qwen2", num_layers=2, hidden=64, num_heads=2, num_kv_heads=1,
                                head_dim=32, intermediate=96, vocab=300, max_positions=256,
                                tie_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, save_dtype="bfloat16")
    path = workload.random_model(shape, cache_root=str(tmp_path))
    cfg = workload.read_config(path)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert cfg["dtype"] == "bfloat16"
    assert workload.random_model(shape, cache_root=str(tmp_path)) == path      # cached
    prompt = [5, 17, 42, 99, 7]
    llm = LLM(path, dtype="float32", num_blocks=16, block_size=8)
    ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert list(ours) == ref[0, len(prompt):].tolist()
    with pytest.raises(ValueError, match="arch"):
        workload.random_model(workload.ModelShape(arch="gpt2"), cache_root=str(tmp_path))


def test_attention_flop_counts_every_row_key_pair():
    """Hand count: 1 trace, forks at 2 and 4, F=1, K=2, A=3. Fork at t feeds rows with contexts
    t, t+1 (prefill), then each branch contexts t+2, t+3: (2+3) + 2*(4+5) for t=2, (4+5) + 2*(6+7)
    for t=4 -> 23 + 35 = 58 pairs; 4 * heads 2 * dh 8 * layers 3 flops each."""
    import bounds

    w = Workload(traces=1, trace_len=4, prompt_len=1, positions=2, suffix_len=1, branches=2, answer_len=3)
    assert w.fork_positions() == [2, 4]
    cfg = {"num_attention_heads": 2, "hidden_size": 16, "num_hidden_layers": 3}
    assert bounds.attention_flop(cfg, w) == 58 * 4 * 2 * 8 * 3
    assert bounds.attention_flop(cfg, Workload(traces=3, trace_len=4, prompt_len=1, positions=2, suffix_len=1,
                                                branches=2, answer_len=3)) == 3 * 58 * 4 * 2 * 8 * 3


def test_quick_bounds_follow_from_the_report(quick_run):
    """The floor is the run's GEMM and attention flops at the best matmul rate it saw, and no
    engine is faster than its floor: ours (profiled) never beats it."""
    _, report, _ = quick_run
    b = report["bounds"]
    bd = report["results"]["mrt_engine"]["breakdown"]
    rate = b["rate_used_gflop_per_s"]
    assert rate >= b["matmul_gflop_per_s_measured"] > 0
    assert b["gemm_gflop"] == pytest.approx(bd["gemm_flop"] / 1e9, abs=0.01)
    assert b["floor_s"] == pytest.approx((b["gemm_gflop"] + b["attention_gflop"]) / rate, rel=0.01, abs=2e-3)
    assert b["ours_profiled_s"]["wall"] >= b["floor_s"]
    assert "ceiling_vs_vllm" not in b          # no vLLM in the quick run


def test_quick_attention_probe_counts_every_decode_attention_call(quick_run):
    """The probe's repetition: where the lean CPU decode step runs, one attention call per layer
    per decode step, both timings present, and the bounds carry them; elsewhere no probe."""
    _, report, _ = quick_run
    a = report["results"]["mrt_engine"]
    from mrt_engine.attention import cpu_kernel
    from mrt_engine.models import cpu_ops

    if not (cpu_kernel.simd_available() and cpu_ops._ok):
        assert "attention_probe" not in a
        return
    p = a["attention_probe"]
    layers = int(report["workload"]["model"].split("layers=")[1].split()[0])
    # every step but the first (the forks' suffix prefill) is a decode step on the lean path
    assert p["calls"] == layers * (a["steps"] - 1)
    assert p["in_place_s"] > 0 and p["again_at_once_s"] > 0
    assert report["bounds"]["attention_probe"] == {k: p[k] for k in ("calls", "in_place_s", "again_at_once_s", "ratio")}


def _fake_vllm_python(tmp_path) -> str:
    """An 'interpreter' that runs tests/fake_vllm_runner.py with the runner's arguments."""
    exe = tmp_path / "fake-vllm-python"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {os.path.join(ROOT, 'tests', 'fake_vllm_runner.py')} \"$@\"\n")
    exe.chmod(0o755)
    return str(exe)


def _run_with_fake_vllm(tmp_path, fail: str = "", spin: float = 0.0, extra=()):
    out, cache = tmp_path / "out", tmp_path / "models"
    env = dict(os.environ, MRT_BENCH_CACHE=str(cache), FAKE_VLLM_FAIL=fail, FAKE_VLLM_SPIN=str(spin))
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_branched.py"), "--quick", "--no-profile",
                           "--engines", "mrt_engine,vllm", "--vllm-python", _fake_vllm_python(tmp_path),
                           "--out-dir", str(out), *extra], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "branched.json") as f:
        return proc, json.load(f)


def test_interleaved_vllm_pairs_each_repetition_with_ours(tmp_path):
    """vLLM's repetitions come from the session (the fake's walls 0.25, 0.5, ...), one per
    repetition of ours, and the paired speedups are its walls over ours, pair by pair. The fake
    busy-loops 1 s after READY and after each repetition: the session waits that out each time."""
    proc, report = _run_with_fake_vllm(tmp_path, spin=1.0)
    a, v = report["results"]["mrt_engine"], report["results"]["vllm"]
    assert v["interleaved"] is True and v["vllm"] == "fake"
    assert v["logprobs"] is True     # vLLM is asked for the sampled tokens' logprobs, as ours returns them
    assert v["all_walls_s"] == [0.25 * (i + 1) for i in range(len(a["all_walls_s"]))]
    paired = report["speedup_vs_vllm_paired"]
    assert paired["per_rep"] == [round(y / x, 2) for x, y in zip(a["all_walls_s"], v["all_walls_s"])]
    assert "interleaved with vLLM" in proc.stdout and "paired (rep i of vLLM" in proc.stdout
    assert len(v["settle_s"]) == 1 + len(a["all_walls_s"]) and min(v["settle_s"]) >= 0.75


@pytest.mark.parametrize("fail", ["start", "rep"])
def test_a_failing_vllm_costs_ours_nothing(tmp_path, fail):
    """vLLM dying at start-up or mid-run is reported (with its output) and our run still completes."""
    proc, report = _run_with_fake_vllm(tmp_path, fail)
    assert "wall_s" in report["results"]["mrt_engine"]
    skipped = report["results"]["vllm"]["skipped"]
    assert ("fake startup failure" if fail == "start" else "fake failure mid-run") in skipped
    assert "speedup_vs_vllm_paired" not in report and report["speedup_vs_vllm"] is None


def test_session_close_ends_the_runners_children(tmp_path, monkeypatch):
    """vLLM runs its engine in child processes: closing a session (as an interrupted benchmark
    does) must end them too, not only the runner."""
    import argparse
    import time

    import vllm_baseline

    child_file = tmp_path / "child.pid"
    monkeypatch.setenv("FAKE_VLLM_CHILD", str(child_file))
    args = argparse.Namespace(dtype="float32", vllm_peak_pass=False, light_warmup=True, vllm_kv_gib=1,
                              vllm_threads=None, vllm_python=_fake_vllm_python(tmp_path))
    w = Workload(traces=1, trace_len=8, prompt_len=2, positions=2, suffix_len=1, branches=2, answer_len=2)
    session = vllm_baseline.VllmSession("unused", w, [[5] * 8], 64, args, reps=1)
    pid = int(child_file.read_text())

    def alive() -> bool:   # a zombie waiting for a reaper counts as ended
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    assert alive()                                    # running while the session is
    session.close()
    for _ in range(100):
        if not alive():
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the runner's child {pid} outlived session.close()")


def test_one_shot_vllm_runs_after_ours(tmp_path):
    """--no-interleave: vLLM's repetitions come from one runner call after our run; no pairs."""
    proc, report = _run_with_fake_vllm(tmp_path, extra=("--no-interleave",))
    v = report["results"]["vllm"]
    assert v["interleaved"] is False and v["all_walls_s"] == [0.25] and "settle_s" not in v
    assert "speedup_vs_vllm_paired" not in report
    assert report["speedup_vs_vllm"] == round(v["wall_s"] / report["results"]["mrt_engine"]["wall_s"], 2)
    assert "interleaved with vLLM" not in proc.stdout


def test_vllm_logprobs_can_be_left_out(tmp_path):
    """--no-vllm-logprobs: the baseline of rounds 1-8 (vLLM not asked for logprobs)."""
    _, report = _run_with_fake_vllm(tmp_path, extra=("--no-vllm-logprobs", "--no-interleave"))
    assert report["results"]["vllm"]["logprobs"] is False
