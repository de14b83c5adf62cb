"""benchmarks/bench_kernels.py is runnable: a CPU smoke run of one tiny configuration (interpreter)
checks its workload construction and that all methods agree; without CUDA, main() exits 0."""
from __future__ import annotations

import importlib.util
import os

import torch

import kernels_helpers  # noqa: F401  (interpreter switch)

PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_kernels.py")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_configuration_runs_and_methods_agree():
    bench = _bench()
    r = bench.run_config(2, 3, 64, 5, iters=1, copy_gbps=1.0, check=True, device="cpu", hq=4, hkv=2, dh=64,
                         bs=16, dtype=torch.float32)
    assert r["unique_kv_bytes"] == 2 * 2 * (64 + 3 * 5) * 2 * 64 * 4
    assert r["per_sequence_kv_bytes"] == 2 * 6 * (64 + 5) * 2 * 64 * 4
    for m in ("cascade", "cascade_det", "paged", "sdpa"):
        assert r[m]["ms"] > 0
    assert r["max_abs_diff_cascade_vs_paged"] < 1e-5
    assert r["max_abs_diff_det_vs_paged"] < 1e-5
    assert r["max_abs_diff_cascade_vs_sdpa"] < 1e-5
    assert r["max_abs_diff_tree_vs_paged"] < 1e-5
    assert r["tree_cascade"]["ms"] > 0 and r["tree_paged"]["ms"] > 0


def test_main_without_cuda_exits_cleanly(capsys):
    if torch.cuda.is_available():
        return
    assert _bench().main([]) == 0
    assert "no CUDA" in capsys.readouterr().out


def test_sweep_covers_the_grid_and_restores_the_environment(monkeypatch):
    from mrt_engine.kernels.tuning import NUM_STAGES_ENV, PROGRAMS_PER_SM_ENV

    monkeypatch.setenv(NUM_STAGES_ENV, "2")
    monkeypatch.delenv(PROGRAMS_PER_SM_ENV, raising=False)
    r = _bench().sweep(2, 2, 64, 5, 1, 1.0, [1, 3], [1, 2], device="cpu", hq=4, hkv=2, dh=64, bs=16,
                       dtype=torch.float32)
    assert [(row["num_stages"], row["programs_per_sm"]) for row in r["rows"]] == [(1, 1), (1, 2), (3, 1), (3, 2)]
    assert all(row[m]["ms"] > 0 for row in r["rows"] for m in ("cascade", "paged", "tree_cascade"))
    assert set(r["best"]) == {"cascade", "paged", "tree_cascade"}
    assert os.environ[NUM_STAGES_ENV] == "2" and PROGRAMS_PER_SM_ENV not in os.environ
