"""torchrun with 2 CPU ranks (gloo): weights stay identical across ranks, the loss is finite, and
step 1 equals one process holding the whole global batch (same samples, loss, grad norm: dapo's
global-token normaliser and DDP's gradient mean make the split invisible)."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from mrt_engine.trainer import reward_modes
from mrt_engine.trainer.config import load_config
from trainer_helpers import ParityMode

WORKER = textwrap.dedent('''
    import os, sys, torch
    torch.set_num_threads(1)
    from mrt_engine.trainer import reward_modes
    from mrt_engine.trainer.config import load_config
    from mrt_engine.trainer.train import train

    class ParityMode(reward_modes.OutcomeMode):
        def credit(self, ctx, batch):
            rewards = [sum(t % 2 for t in c) / max(len(c), 1) for c in batch.completion_ids]
            return reward_modes.Credit(reward_modes.normalised_advantages(ctx, rewards), rewards,
                                       [0.0] * len(rewards), batch)

    reward_modes._REGISTRY["outcome"] = ParityMode
    out = train(load_config(None, sys.argv[2:]))
    torch.save(out["policy"].state_dict(), os.path.join(sys.argv[1], "rank%s.pt" % os.environ["RANK"]))
''')

COMMON = ["--num_generations", "2", "--gradient_accumulation_steps", "2", "--max_completion_length", "12",
          "--num_train_problems", "16", "--learning_rate", "1e-3", "--engine_num_blocks", "64", "--seed", "5",
          "--loss_type", "dapo", "--max_steps", "2", "--save_steps", "0", "--eval_steps", "2",
          "--num_eval_problems", "3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path):
    return [json.loads(x) for x in open(path / "metrics.jsonl")]


def test_two_cpu_ranks_identical_weights_and_match_one_process(tmp_path, monkeypatch):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    ddp_out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(_free_port()), str(worker), str(tmp_path),
           *COMMON, "--per_device_train_batch_size", "2", "--output_dir", str(ddp_out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    ddp = _rows(ddp_out)
    assert [r["step"] for r in ddp] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) and r["grad_norm"] > 0 for r in ddp[1:])
    assert ddp[0]["eval_samples"] == 3 * 2   # the held-out set was split over the ranks and summed

    # one process, the same global batch (4 prompts x 2), the same micro-batch count
    from mrt_engine.trainer.train import train

    monkeypatch.setitem(reward_modes._REGISTRY, "outcome", ParityMode)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(load_config(None, COMMON + ["--per_device_train_batch_size", "4",
                                                   "--output_dir", str(tmp_path / "one")]))
    finally:
        torch.set_num_threads(threads)
    one = _rows(tmp_path / "one")
    a, b = ddp[1], one[1]
    for k in ("reward", "reward_std", "completion_length_mean", "num_groups"):
        assert a[k] == b[k], k
    assert a["num_groups"] == 4
    for k in ("loss", "grad_norm", "entropy"):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), k
    assert single["final_step"] == 2
