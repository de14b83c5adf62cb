"""STaR / MRT-STaR (trainer/star.py): the SFT loss against transformers' own, the step schedule,
and short end-to-end runs of `mrt train` on the shipped tiny reasoner."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

from mrt_engine import default_model_path
from mrt_engine.trainer import star

TINY_RUN = ["--max_steps", "2", "--star_iterations", "1", "--num_generations", "4",
            "--star_samples_per_prompt", "4", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "1", "--max_completion_length", "96",
            "--eval_steps", "0", "--save_steps", "0", "--num_train_problems", "16",
            "--progress_k", "2", "--episode_max_episodes", "3", "--learning_rate", "1e-3"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def policy():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)


def _rows(seed=0):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 100) for _ in range(rng.randrange(3, 9))] for _ in range(3)]
    comps = [[rng.randrange(3, 100) for _ in range(rng.randrange(1, 12))] + [2] for _ in range(3)]
    return prompts, comps


def test_sft_nll_equals_transformers_loss(policy):
    prompts, comps = _rows()
    tb = star.sft_tensors(prompts, comps, pad_id=0)
    got = star.sft_nll(policy, tb)
    # the oracle: transformers' causal-LM loss with the prompt and the padding labelled -100
    total, count = 0.0, 0
    for p, c in zip(prompts, comps):
        ids = torch.tensor([p + c])
        labels = torch.tensor([[-100] * len(p) + c])
        out = policy(input_ids=ids, labels=labels)
        total += float(out.loss.detach()) * len(c)
        count += len(c)
    assert int(tb.completion_mask.sum()) == count
    assert float(got.detach()) == pytest.approx(total, rel=1e-5)


def test_sft_step_lowers_nll_of_kept_rows():
    from transformers import AutoModelForCausalLM

    from mrt_engine.trainer.config import GRPOConfig
    from mrt_engine.trainer.train import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    prompts, comps = _rows(1)
    tb = star.sft_tensors(prompts, comps, pad_id=0)
    opt = build_optimizer(GRPOConfig(learning_rate=1e-3), model)
    before = float(star.sft_nll(model, tb).detach())
    for _ in range(3):
        (star.sft_nll(model, tb) / tb.completion_mask.sum()).backward()
        opt.step()
        opt.zero_grad()
    assert float(star.sft_nll(model, tb).detach()) < before


def test_schedule():
    assert star.steps_per_iteration(10, 3) == [4, 3, 3]
    assert star.steps_per_iteration(2, 3) == [1, 1, 0]
    with pytest.raises(ValueError):
        star.steps_per_iteration(0, 1)
    rows = star.sft_schedule([3, 7, 9], num_steps=2, epochs=2, rng=random.Random(0))
    flat = [r for step in rows for r in step]
    assert len(rows) == 2 and sorted(flat) == [3, 3, 7, 7, 9, 9] and len(rows[0]) == 3
    assert sorted(flat[:3]) == [3, 7, 9]          # each epoch is a permutation of the kept rows
    assert star.sft_schedule([], 3, 1, random.Random(0)) == [[], [], []]


@pytest.mark.parametrize("mode", ["star", "mrt_star"])
def test_mrt_train_star_end_to_end(tmp_path, monkeypatch, mode):
    from mrt_engine.trainer import mrt
    from mrt_engine.trainer.train import main

    seen = {}
    real = mrt.star_select

    def spy(correct, samples, m, keep, traces=None, budget=None):
        kept = real(correct, samples, m, keep, traces=traces, budget=budget)
        seen.update(correct=list(correct), mode=m, traces=traces, kept=kept)
        return kept

    monkeypatch.setattr(mrt, "star_select", spy)
    out = str(tmp_path / mode)
    summary = main(["--config", f"trainer/configs/toy_{'mrt_' if mode == 'mrt_star' else ''}star.yaml",
                    "--output_dir", out] + TINY_RUN)
    assert summary["final_step"] == 2
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    assert seen["mode"] == mode and (seen["traces"] is not None) == (mode == "mrt_star")
    assert all(seen["correct"][i] >= 0.5 for i in seen["kept"])
    assert rows[0]["kept"] == len(seen["kept"])
    assert rows[0]["accuracy"] == pytest.approx(sum(seen["correct"]) / len(seen["correct"]))
    assert rows[0]["generate_s"] > 0 and (rows[0]["fork_s"] > 0) == (mode == "mrt_star")
    if seen["kept"]:
        assert rows[0]["sft_tokens"] > 0 and rows[0]["loss"] > 0
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "model.safetensors"))


def test_refuses_resume_and_wrong_mode(tmp_path):
    from mrt_engine.trainer.config import load_config

    cfg = load_config("trainer/configs/toy_star.yaml", ["--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="resume"):
        star.train_star(cfg, resume=True)
    cfg = load_config("trainer/configs/toy_grpo.yaml", ["--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="reward_mode"):
        star.train_star(cfg)
