"""The launch tuning knobs (mrt_engine/kernels/tuning.py): validated environment values that reach
the split-K / chunk sizing, and a default that keeps the previous behaviour (2 programs x 132 SMs)."""
from __future__ import annotations

import pytest

import kernels_helpers  # noqa: F401  (interpreter switch)
from mrt_engine.kernels import tuning
from mrt_engine.kernels.cascade_decode import choose_chunk_size
from mrt_engine.kernels.paged_decode import choose_split_size


def test_defaults(monkeypatch):
    monkeypatch.delenv(tuning.NUM_STAGES_ENV, raising=False)
    monkeypatch.delenv(tuning.PROGRAMS_PER_SM_ENV, raising=False)
    assert tuning.num_stages() == 2
    assert tuning.target_programs() == 4 * tuning.DEFAULT_SMS


@pytest.mark.parametrize("bad", ["0", "-1", "two"])
def test_bad_values_raise_naming_the_variable(monkeypatch, bad):
    monkeypatch.setenv(tuning.NUM_STAGES_ENV, bad)
    with pytest.raises(ValueError, match=tuning.NUM_STAGES_ENV):
        tuning.num_stages()
    monkeypatch.setenv(tuning.PROGRAMS_PER_SM_ENV, bad)
    with pytest.raises(ValueError, match=tuning.PROGRAMS_PER_SM_ENV):
        tuning.target_programs()


def test_programs_per_sm_sets_the_split_sizes(monkeypatch):
    # 8 parallel programs over a 16K-token span: the target decides how finely the span is cut
    sizes = {}
    for pps in (1, 4):
        monkeypatch.setenv(tuning.PROGRAMS_PER_SM_ENV, str(pps))
        sizes[pps] = (choose_split_size(16384, 8, 64), choose_chunk_size(16384, 8, 64))
    assert sizes[1] == (1024, 1024)           # 132 programs / 8 -> 17 splits of 16384 -> 964 -> 1024
    assert sizes[4] == (256, 256)             # 528 / 8 = 66 splits, capped at 16384 / 256 = 64 -> 256
    assert choose_split_size(16384, 8, 64, programs=8) == 16384
