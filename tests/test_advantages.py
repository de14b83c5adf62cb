"""group_advantages / zero_std_groups against hand-computed values and a per-group loop twin."""
import math
import statistics

import pytest
import torch

from mrt_engine.trainer.advantages import STD_EPS, group_advantages, zero_std_groups


def test_group_by_hand():
    # group 1: [1, 0, 0, 1] mean .5, Bessel std sqrt(1/3); group 2: all 0
    a = group_advantages([1, 0, 0, 1, 0, 0, 0, 0], 4, "group")
    s = math.sqrt(1 / 3)
    u = 0.5 / (s + STD_EPS)
    assert a.tolist() == pytest.approx([u, -u, -u, u] + [0.0] * 4)


def test_none_and_batch_by_hand():
    r = [1.0, 0.0, 3.0, 3.0]
    assert group_advantages(r, 2, "none").tolist() == pytest.approx([0.5, -0.5, 0.0, 0.0])
    s = statistics.stdev(r)  # Bessel over the whole batch
    assert group_advantages(r, 2, "batch").tolist() == pytest.approx(
        [0.5 / (s + STD_EPS), -0.5 / (s + STD_EPS), 0.0, 0.0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_matches_loop_twin(scale):
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (24,), generator=g).double() * 0.5
    got = group_advantages(r, 6, scale)
    assert got.dtype == torch.float64
    want = []
    for k in range(0, 24, 6):
        grp = r[k:k + 6].tolist()
        m = sum(grp) / 6
        sd = {"group": statistics.stdev(grp), "batch": statistics.stdev(r.tolist()), "none": None}[scale]
        want += [(x - m) / (sd + STD_EPS) if sd is not None else x - m for x in grp]
    assert got.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    # advantages sum to 0 in each group whatever the scaling
    assert got.view(-1, 6).sum(1).abs().max().item() < 1e-12


def test_zero_std_groups():
    assert zero_std_groups([1, 1, 0, 1, 0, 0, 0.5, 0.5], 2) == 3
    assert zero_std_groups(torch.tensor([1.0, 0.0]), 2) == 0


@pytest.mark.parametrize("args,exc,match", [
    (([1, 0, 1], 2), ValueError, "multiple of num_generations"),
    (([], 2), ValueError, "multiple"),
    (([1, 0], 0), ValueError, "num_generations"),
    (([1, 0], 2.0), TypeError, "num_generations"),
    (([1, float("nan")], 2), ValueError, "finite"),
    ((["a", 1], 2), TypeError, "rewards"),
    ((torch.zeros(2, 2), 2), ValueError, "1-D"),
])
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        group_advantages(*args)


def test_bad_scale():
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages([1, 0], 2, "std")
