"""Deterministic mode: a decode row's attention output does not depend on the rest of the batch or
on prefix sharing — bitwise, under the Triton interpreter.

One target row (a 100-token context whose first 5 blocks are shared with three siblings) is
computed (A) alone, (B) in a mixed batch with a prefill sequence, an unrelated longer row and its
siblings sharing the prefix through the cascade kernel, (C) in the same batch without sharing.
The property itself lives in kernels_helpers.check_bitwise_independence, shared with the GPU run.
"""
from __future__ import annotations

import pytest
import torch
from kernels_helpers import DET_DH, DET_GRP, DET_HKV, DET_ROWS, check_bitwise_independence, det_meta, det_run

from mrt_engine.attention import TorchAttentionBackend
from mrt_engine.attention.triton_backend import TritonAttentionBackend


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    q = {r: torch.randn(DET_HKV * DET_GRP, DET_DH, generator=g) for r in DET_ROWS}
    kv = {r: (torch.randn(DET_HKV, DET_DH, generator=g), torch.randn(DET_HKV, DET_DH, generator=g)) for r in DET_ROWS}
    return q, kv


def test_row_output_is_bitwise_independent_of_batch_and_sharing(inputs):
    q, kv = inputs
    alone = check_bitwise_independence(q, kv)
    # and it is the right answer
    oracle = det_run(TorchAttentionBackend(), det_meta(["T"], [([0], 5)]), q, kv, ["T"])["T"]
    torch.testing.assert_close(alone, oracle, rtol=1e-5, atol=1e-5)


def test_fast_mode_matches_deterministic_mode_closely(inputs):
    q, kv = inputs
    batch = ["U", "S1", "T", "S2", "S3"]
    groups = [([0], 0), ([2, 1, 3, 4], 5)]
    fast = det_run(TritonAttentionBackend(deterministic=False), det_meta(batch, groups), q, kv, batch)
    det = det_run(TritonAttentionBackend(deterministic=True, det_chunk=32), det_meta(batch, groups), q, kv, batch)
    for r in batch:
        torch.testing.assert_close(fast[r], det[r], rtol=1e-5, atol=1e-5)


def test_environment_switches_deterministic_mode(monkeypatch):
    monkeypatch.setenv("MRT_ENGINE_DETERMINISTIC", "1")
    assert TritonAttentionBackend().deterministic
    monkeypatch.setenv("MRT_ENGINE_DETERMINISTIC", "0")
    assert not TritonAttentionBackend().deterministic
    with pytest.raises(ValueError, match="det_chunk"):
        TritonAttentionBackend(det_chunk=0)
