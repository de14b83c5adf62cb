"""The GRPO loop's pieces against slow twins, and `mrt train` end to end on tiny settings.

- completion logps of padded batches == one unpadded forward per row == the engine's logprobs;
- gradient accumulation: GA=2 micro-batches give the GA=1 gradient (dapo, grpo, dr_grpo);
- the reward-mode seam: a mode that keeps handles, forks and returns [B, T] advantages trains and
  leaves no KV pinned;
- the CLI: metrics.jsonl fields, checkpoint loadable by the engine with the synced weights, plot.
"""
import copy
import importlib.util
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from mrt_engine import LLM, SamplingParams, default_model_path
from mrt_engine.trainer import reward_modes
from mrt_engine.trainer.config import load_config
from mrt_engine.trainer.metrics import health_warnings, truncate
from mrt_engine.trainer.rollout import TensorBatch, completion_logps, generate_rollouts
from mrt_engine.trainer.round import RoundData, train_pass
from mrt_engine.trainer.sampler import PromptSampler
from trainer_helpers import ParityMode

PROMPTS = [[1, 104, 98, 5, 98, 9, 98, 13, 98, 8, 98, 7], [1, 104, 98, 9, 98, 7, 98], [1, 104]]
TINY = ["--num_generations", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--max_completion_length", "12", "--num_train_problems", "16", "--learning_rate", "1e-3",
        "--engine_num_blocks", "64", "--seed", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm():
    return LLM(default_model_path(), num_blocks=128, seed=0)


@pytest.fixture(scope="module")
def policy():
    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)


def _batch(llm, temperature=1.0, n=2, max_tokens=24):
    return generate_rollouts(llm, PROMPTS, ["p0", "p1", "p2"], num_generations=n,
                             max_completion_length=max_tokens, temperature=temperature, top_p=1.0,
                             seed=11, keep=False)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_match_unpadded_rows_and_engine(llm, policy, temperature):
    b = _batch(llm, temperature)
    assert [len(p) for p in b.prompt_ids] == [12, 12, 7, 7, 2, 2] and b.problems[2] == "p1"
    tb = b.to_tensors(pad_id=0)
    with torch.no_grad():
        got, logits = completion_logps(policy, tb, temperature, want_logits=True)
    assert logits.shape == (*got.shape, policy.config.vocab_size)
    for r, (p, c) in enumerate(zip(b.prompt_ids, b.completion_ids)):
        with torch.no_grad():   # the slow twin: one unpadded row at a time
            lg = policy(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:-1] / temperature
        want = torch.log_softmax(lg, -1).gather(1, torch.tensor(c)[:, None])[:, 0]
        torch.testing.assert_close(got[r, :len(c)], want, atol=2e-5, rtol=0)
        assert tb.completion_mask[r].sum() == len(c)
        torch.testing.assert_close(got[r, :len(c)], torch.tensor(b.engine_logps[r]), atol=1e-4, rtol=0)
    # a trimmed micro-batch gives the same numbers
    sub = tb.rows(slice(2, 4))
    with torch.no_grad():
        part, _ = completion_logps(policy, sub, temperature)
    torch.testing.assert_close(part * sub.completion_mask, got[2:4, :part.shape[1]] * sub.completion_mask)


def _round(llm, cfg):
    b = _batch(llm, n=2, max_tokens=16)
    b = type(b)(2, b.prompt_ids[:4], b.completion_ids[:4], b.engine_logps[:4], b.texts[:4],
                b.finish_reasons[:4], b.problems[:4])
    tb = b.to_tensors(0)
    g = torch.Generator().manual_seed(0)
    adv = torch.randn(tb.completion_mask.shape, generator=g)      # per-token advantages [B, T]
    old = tb.engine_logps + 0.05 * torch.randn(tb.engine_logps.shape, generator=g)   # ratios != 1
    return RoundData(tb, adv, tb.completion_mask.clone(), old, None, float(tb.completion_mask.sum()))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_matches_one_big_batch(llm, policy, loss_type):
    grads = []
    for ga, mb in ((1, 4), (2, 2), (4, 1)):
        cfg = load_config(None, ["--num_generations", "2", "--per_device_train_batch_size", str(mb),
                                 "--gradient_accumulation_steps", str(ga), "--loss_type", loss_type,
                                 "--max_completion_length", "16"])
        rd = _round(llm, cfg)
        m = copy.deepcopy(policy)
        out = train_pass(m, rd, cfg, world_size=1, measure_mismatch=True)
        assert out["logprob_mismatch_max"] < 1e-4 and torch.isfinite(torch.tensor(out["loss"]))
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
        if ga == 1:
            loss1 = out["loss"]
        else:
            assert out["loss"] == pytest.approx(loss1, rel=1e-4, abs=1e-7)
    assert grads[0].abs().max() > 0
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-4, atol=1e-7)


class ForkingMode(reward_modes.OutcomeMode):
    """Keeps the handles, forks 2 answers from the middle of every trace (as MRT's progress does)
    and gives per-token advantages [B, T]: the outcome advantage on the first half, its negation
    after."""

    needs_handles = True

    def credit(self, ctx, batch):
        base = super().credit(ctx, batch)
        assert all(h is not None and not h.released for h in batch.handles)
        forks = [ctx.llm.fork(h, at=len(p) + max(1, len(c) // 2), n=2,
                              params=SamplingParams(max_tokens=3, seed=1))
                 for h, p, c in zip(batch.handles, batch.prompt_ids, batch.completion_ids)]
        t = max(len(c) for c in batch.completion_ids)
        adv = base.advantages[:, None].repeat(1, t)
        for r, c in enumerate(batch.completion_ids):
            adv[r, len(c) // 2:] *= -1
        return reward_modes.Credit(adv, base.rewards, base.correct, batch,
                                   {"fork_s": 0.0, "forks": float(sum(len(o.outputs) for f in forks for o in f))})


def test_reward_mode_seam_per_token_advantages_no_kv_leak(tmp_path, monkeypatch):
    from mrt_engine.trainer.train import train

    monkeypatch.setitem(reward_modes._REGISTRY, "outcome", ForkingMode)
    cfg = load_config(None, TINY + ["--max_steps", "2", "--output_dir", str(tmp_path), "--save_steps", "0"])
    out = train(cfg)
    st = out["llm"].kv_stats()
    assert st["kept_handles"] == 0 and st["used_blocks"] == 0
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [r["forks"] for r in rows] == [8.0, 8.0]     # 4 rows x 2 answers, every step


def test_reward_mode_registry_errors():
    with pytest.raises(ValueError, match="not available"):
        reward_modes.get_reward_mode("nope", None)
    with pytest.raises(TypeError, match="callable"):
        reward_modes.register_reward_mode("x", 3)
    a = torch.tensor([1.0, -1.0])
    assert reward_modes.per_token(a, 2, 3).tolist() == [[1, 1, 1], [-1, -1, -1]]
    assert reward_modes.per_token(torch.ones(2, 5), 2, 3).shape == (2, 3)
    assert reward_modes.per_token(torch.ones(2, 2), 2, 3).tolist() == [[1, 1, 0], [1, 1, 0]]
    with pytest.raises(ValueError, match="B=2"):
        reward_modes.per_token(torch.ones(3, 2), 2, 3)


def test_batch_scaling_gathers_every_rank():
    """scale_rewards=batch under DDP: each rank's slice of the advantages of the gathered batch."""
    from mrt_engine.trainer.advantages import group_advantages

    everyone = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.2, 0.9])

    class FakeDist:
        world_size, rank = 2, 1

        def all_gather(self, t):
            assert torch.equal(t, everyone[4:])
            return everyone

    cfg = load_config(None, ["--scale_rewards", "batch", "--num_generations", "2"])
    ctx = reward_modes.RewardContext(None, cfg, None, None, None, FakeDist())
    got = reward_modes.normalised_advantages(ctx, everyone[4:].tolist())
    torch.testing.assert_close(got, group_advantages(everyone, 2, "batch")[4:])
    assert not torch.allclose(got, group_advantages(everyone[4:], 2, "batch"))


def test_mrt_train_cli_end_to_end(tmp_path, monkeypatch):
    from mrt_engine.cli import main as mrt
    from mrt_engine.trainer import plot

    monkeypatch.setitem(reward_modes._REGISTRY, "outcome", ParityMode)
    out = tmp_path / "run"
    summary = mrt(["train", "--config", os.path.join(os.path.dirname(__file__), "..", "trainer", "configs",
                                                      "toy_grpo.yaml"),
                   *TINY, "--max-steps", "2", "--output-dir", str(out), "--eval_steps", "2",
                   "--num_eval_problems", "3", "--save_steps", "1", "--report_to", "tensorboard"])
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval_accuracy" in rows[0] and "eval_accuracy" in rows[2]
    need = ["loss", "reward", "reward_std", "accuracy", "completion_length_mean", "completion_length_max",
            "truncated_ratio", "zero_std_groups", "kl", "clip_ratio", "logprob_mismatch_mean",
            "logprob_mismatch_max", "lr", "grad_norm", "generate_s", "train_s", "weight_sync_s"]
    for r in rows[1:]:
        assert all(isinstance(r[k], (int, float)) for k in need), set(need) - set(r)
        assert r["logprob_mismatch_max"] < 1e-3
    assert summary["final_step"] == 2 and (out / "summary.json").is_file()
    # tensorboard is optional (the `tensorboard` extra): without it only metrics.jsonl is written
    has_tb = importlib.util.find_spec("tensorboard") is not None
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2", "grpo_config.yaml", "metrics.jsonl",
                                       "summary.json"] + (["tensorboard"] if has_tb else [])
    # the checkpoint is a model folder the engine loads, holding the weights that were synced
    ck = str(out / "checkpoint-2")
    trained = AutoModelForCausalLM.from_pretrained(ck)
    base = AutoModelForCausalLM.from_pretrained(default_model_path())
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters()))
    fresh = LLM(ck, num_blocks=16)
    in_process = LLM(default_model_path(), num_blocks=16)
    in_process.update_weights(trained.state_dict())
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a = fresh.generate([PROMPTS[0]], sp)[0].outputs[0]
    b = in_process.generate([PROMPTS[0]], sp)[0].outputs[0]
    assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    png = plot.main([str(out)])
    assert os.path.getsize(png) > 10_000


def test_mask_truncated_completions_drops_them_from_the_loss(tmp_path, monkeypatch):
    from mrt_engine.trainer.train import train

    monkeypatch.setitem(reward_modes._REGISTRY, "outcome", ParityMode)
    base = AutoModelForCausalLM.from_pretrained(default_model_path()).state_dict()
    for flag, moved in (("true", False), ("false", True)):
        cfg = load_config(None, TINY + ["--max_steps", "1", "--output_dir", str(tmp_path / flag),
                                        "--mask_truncated_completions", flag])
        out = train(cfg)      # 12-token completions of the shipped model never finish
        assert out["last"]["truncated_ratio"] == 1.0
        sd = out["policy"].state_dict()
        assert any(not torch.equal(sd[k], base[k]) for k in sd) == moved


def test_kl_to_the_reference_policy(tmp_path, monkeypatch):
    """beta > 0 keeps a frozen copy of the start weights: k3 KL is exactly 0 while the policy
    equals it (step 1) and positive once it has moved (step 2)."""
    from mrt_engine.trainer.train import train

    monkeypatch.setitem(reward_modes._REGISTRY, "outcome", ParityMode)
    out = train(load_config(None, TINY + ["--max_steps", "2", "--beta", "0.1", "--output_dir", str(tmp_path)]))
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0 and out["final_step"] == 2


def test_cli_errors(tmp_path):
    from mrt_engine.trainer.train import main

    with pytest.raises(ValueError, match="nope"):
        main(["--nope", "1"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(TINY + ["--output_dir", str(tmp_path), "--resume"])
    with pytest.raises(FileNotFoundError, match="config"):
        main(["--config", str(tmp_path / "missing.yaml")])


def test_prompt_sampler_epochs_and_state():
    s = PromptSampler(5, seed=1)
    first = s.take(5)
    assert sorted(first) == list(range(5))
    nxt = s.take(7)                           # crosses into epoch 1 and 2
    assert sorted(nxt[:5]) == list(range(5)) and s.epoch == 2 and s.cursor == 2
    assert PromptSampler(5, seed=1).take(12) == first + nxt
    assert PromptSampler(5, seed=2).take(5) != first or PromptSampler(5, seed=3).take(5) != first
    st = s.state_dict()
    t = PromptSampler(5, seed=1)
    t.load_state_dict(st)
    assert t.take(4) == s.take(4)
    with pytest.raises(ValueError, match="dataset or seed changed"):
        PromptSampler(6, seed=1).load_state_dict(st)


def test_health_warnings_and_truncate(tmp_path):
    assert health_warnings({"truncated_ratio": 0.2, "zero_std_groups": 1, "num_groups": 4}) == []
    w = health_warnings({"truncated_ratio": 0.9, "zero_std_groups": 3, "num_groups": 4,
                         "loss": float("nan")})
    assert len(w) == 3 and "max_completion_length" in w[0] and "zero reward spread" in w[1]
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"step": i}) + "\n" for i in range(5)))
    truncate(str(p), 2)
    assert [json.loads(x)["step"] for x in open(p)] == [0, 1, 2]


def test_tensor_batch_layout():
    tb = TensorBatch.build([[5, 6, 7], [8]], [[1, 2], []], [[-0.5, -0.25], []], pad_id=0)
    assert tb.input_ids.tolist() == [[5, 6, 7, 1, 2], [8, 0, 0, 0, 0]]
    assert tb.logp_index.tolist() == [[2, 3], [0, 0]]
    assert tb.completion_mask.tolist() == [[1, 1], [0, 0]]
    assert tb.engine_logps.tolist() == [[-0.5, -0.25], [0, 0]]
    with pytest.raises(ValueError, match="empty"):
        TensorBatch.build([], [], [], 0)


def test_micro_batches_partition_rows_by_length():
    from mrt_engine.trainer.round import micro_batches

    comps = [[1] * n for n in (3, 9, 1, 7, 5, 2)]
    tb = TensorBatch.build([[5, 6]] * 6, comps, [[-0.1] * len(c) for c in comps], pad_id=0)
    mbs = micro_batches(tb, 2)
    assert [m.tolist() for m in mbs] == [[1, 3, 4], [0, 5, 2]]   # longest first, equal sizes
    assert tb.rows(mbs[1]).input_ids.shape == (3, 2 + 3)          # padded to its own longest row
    with pytest.raises(ValueError, match="equal micro-batches"):
        micro_batches(tb, 4)
