"""Exact resume: 4 steps == 2 steps + resume + 2 steps (losses, rewards, final weights), also when
the checkpoint falls mid-round (num_iterations = 2); engine RNG state round trip; checkpoint
discovery. Tiny settings on the shipped model."""
import json
import os

import pytest
import torch

from mrt_engine import LLM, SamplingParams, default_model_path
from mrt_engine.trainer import checkpoint as ckpt
from mrt_engine.trainer import reward_modes
from mrt_engine.trainer.config import load_config
from mrt_engine.trainer.train import train
from trainer_helpers import ParityMode

TINY = ["--num_generations", "2", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--max_completion_length", "12", "--num_train_problems", "16",
        "--learning_rate", "1e-3", "--eval_steps", "0", "--engine_num_blocks", "64", "--seed", "3",
        "--loss_type", "dapo", "--lr_scheduler_type", "linear", "--warmup_ratio", "0.25"]


@pytest.fixture(autouse=True)
def _tiny_run(monkeypatch):
    monkeypatch.setitem(reward_modes._REGISTRY, "outcome", ParityMode)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # a tiny model on a shared machine: one thread is many times faster
    yield
    torch.set_num_threads(threads)


def _cfg(out, *extra):
    return load_config(None, TINY + ["--output_dir", str(out)] + list(extra))


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _compare(full, split):
    keys = ("loss", "reward", "accuracy", "completion_length_mean", "grad_norm", "lr", "kl", "entropy")
    a, b = _rows(full), _rows(split)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in keys} == {k: rb[k] for k in keys}, ra["step"]
    assert len({r["loss"] for r in a}) > 1   # the steps differ: the comparison has teeth


def _weights_equal(sa, sb):
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_four_steps_equal_two_plus_resume_plus_two(tmp_path):
    full = train(_cfg(tmp_path / "full", "--max_steps", "4", "--save_steps", "0"))
    # the split run stops after step 2 (its checkpoint), then a new process-like run resumes
    train(_cfg(tmp_path / "split", "--max_steps", "4", "--save_steps", "2"), stop_after=2)
    assert ckpt.latest_checkpoint(str(tmp_path / "split")).endswith("checkpoint-2")
    resumed = train(_cfg(tmp_path / "split", "--max_steps", "4", "--save_steps", "2"), resume=True)
    assert resumed["start_step"] == 2
    _compare(tmp_path / "full", tmp_path / "split")
    _weights_equal(full["policy"].state_dict(), resumed["policy"].state_dict())
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(default_model_path()).state_dict()
    assert any(not torch.equal(v, base[k]) for k, v in full["policy"].state_dict().items())
    # the engine of the resumed run holds the same weights as the policy: identical logprobs
    prompt = [1, 104, 98, 5, 98, 9]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    la = full["llm"].generate([prompt], sp)[0].outputs[0]
    lb = resumed["llm"].generate([prompt], sp)[0].outputs[0]
    assert la.token_ids == lb.token_ids and la.logprobs == lb.logprobs


def test_resume_mid_round_with_num_iterations_2(tmp_path):
    extra = ["--num_iterations", "2", "--max_steps", "4"]
    full = train(_cfg(tmp_path / "full", *extra, "--save_steps", "0"))
    # checkpoint-3 is taken after the first optimizer pass over round 2: the round is stored
    train(_cfg(tmp_path / "split", *extra, "--save_steps", "3"), stop_after=3)
    state, _ = ckpt.load_state(ckpt.latest_checkpoint(str(tmp_path / "split")), 0)
    assert state["round"] is not None and state["step"] == 3
    resumed = train(_cfg(tmp_path / "split", *extra, "--save_steps", "3"),
                    resume=str(tmp_path / "split" / "checkpoint-3"))
    _compare(tmp_path / "full", tmp_path / "split")
    _weights_equal(full["policy"].state_dict(), resumed["policy"].state_dict())


def test_engine_rng_state_round_trip():
    llm = LLM(default_model_path(), num_blocks=16, seed=5)
    sp = SamplingParams(n=2, max_tokens=8, temperature=1.0)   # unseeded: seeds come from the engine
    llm.generate([[1, 104, 98]], sp)
    st = llm.get_rng_state()
    a = [c.token_ids for c in llm.generate([[1, 104, 98]], sp)[0].outputs]
    b = [c.token_ids for c in llm.generate([[1, 104, 98]], sp)[0].outputs]
    llm.set_rng_state(torch.load(_save(st), weights_only=False))   # through a file, as a checkpoint
    assert [c.token_ids for c in llm.generate([[1, 104, 98]], sp)[0].outputs] == a != b
    with pytest.raises(ValueError, match="get_rng_state"):
        llm.set_rng_state({"seed_rng": st["seed_rng"]})
    with pytest.raises(ValueError, match="num_requests"):
        llm.set_rng_state({"seed_rng": st["seed_rng"], "num_requests": -1})
    with pytest.raises(ValueError, match="random.Random state"):
        llm.set_rng_state({"seed_rng": (3, (1, 2), None), "num_requests": 0})


def _save(obj):
    import tempfile
    f = tempfile.NamedTemporaryFile(suffix=".pt", delete=False)
    torch.save(obj, f.name)
    return f.name


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    for name, complete in (("checkpoint-2", True), ("checkpoint-10", True), ("checkpoint-12", False),
                           ("checkpoint-20.tmp", True), ("other-30", True)):
        os.makedirs(tmp_path / name)
        if complete:
            (tmp_path / name / ckpt.STATE).write_bytes(b"x")
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint-10")
    assert ckpt.resolve(True, str(tmp_path)).endswith("checkpoint-10")
    assert ckpt.resolve(str(tmp_path / "checkpoint-2"), "unused").endswith("checkpoint-2")
    assert ckpt.resolve(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.resolve(True, str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="checkpoint-N"):
        ckpt.resolve(str(tmp_path / "checkpoint-12"), "unused")
