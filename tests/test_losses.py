"""policy_loss: hand-computed values for every loss type, clipping on both sides, k3 KL, GSPO,
per-token advantages, stats, and gradient-accumulation / data-parallel invariance of the gradient
against one big batch (against a from-scratch per-token loop as the oracle)."""
import math

import pytest
import torch

from mrt_engine.trainer.losses import entropy_from_logits, k3_kl, policy_loss

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


# ---- a slow twin: plain Python loops over tokens, straight from the formulas ----

def twin_loss(logps, old, adv, mask, loss_type, eps, eps_high=None, ref=None, beta=0.0, L=None,
              level="token", n_items=None, P=1, GA=1):
    eps_high = eps if eps_high is None else eps_high
    B, T = logps.shape
    per = [[None] * T for _ in range(B)]
    for i in range(B):
        act = [j for j in range(T) if mask[i][j] > 0]
        seq_lr = sum(logps[i][j] - old[i][j] for j in act) / max(len(act), 1)
        for j in range(T):
            a = adv[i][j] if adv.dim() == 2 else adv[i]
            lr = seq_lr if level == "sequence" else logps[i][j] - old[i][j]
            rho = torch.exp(lr)
            clip = torch.clamp(rho, 1 - eps, 1 + eps_high)
            v = -torch.minimum(rho * a, clip * a)
            if beta > 0:
                d = ref[i][j] - logps[i][j]
                v = v + beta * (torch.exp(d) - d - 1)
            per[i][j] = v
    tot = sum(per[i][j] for i in range(B) for j in range(T) if mask[i][j] > 0)
    ntok = float(mask.sum())
    if loss_type == "grpo":
        return sum(sum(per[i][j] for j in range(T) if mask[i][j] > 0) / max(float(mask[i].sum()), 1)
                   for i in range(B)) / B / GA
    if loss_type == "bnpo":
        return tot / ntok / GA
    if loss_type == "dr_grpo":
        return tot / (B * L) / GA
    return tot / ((ntok if n_items is None else n_items) / P)


def rand_batch(B=8, T=7, seed=0, per_token_adv=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=D) * 3
    logps = old + 0.4 * torch.randn(B, T, generator=g, dtype=D)  # ratios on both sides of the clip
    ref = old + 0.2 * torch.randn(B, T, generator=g, dtype=D)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).to(D)
    adv = torch.randn(B, T, generator=g, dtype=D) if per_token_adv else torch.randn(B, generator=g, dtype=D)
    return logps, old, adv, mask, ref


LOSS_TYPES = ["grpo", "bnpo", "dapo", "dr_grpo"]


# ---- hand-computed values ----

@pytest.mark.parametrize("loss_type,expected", [
    # ratio 1 everywhere: per-token loss = -A; seq 0: 2 tokens of -1, seq 1: 3 tokens of +2
    ("grpo", (-1.0 + 2.0) / 2),          # sequence means -1 and 2, then their mean
    ("bnpo", (-2.0 + 6.0) / 5),          # token sum 4 over 5 active tokens
    ("dapo", (-2.0 + 6.0) / 5),          # one process, one micro-step: the local count
    ("dr_grpo", (-2.0 + 6.0) / (2 * 4)),  # B=2, L=4
])
def test_normalisers_by_hand(loss_type, expected):
    logps = torch.zeros(2, 3, dtype=D, requires_grad=True)
    mask = t([[1, 1, 0], [1, 1, 1]])
    loss, stats = policy_loss(logps, torch.zeros(2, 3, dtype=D), t([1.0, -2.0]), mask, loss_type,
                              0.2, max_completion_length=4)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert stats["num_tokens"].item() == 5
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    # gradient of -rho*A at rho=1 is -A / normaliser per active token, 0 on padding
    loss.backward()
    assert logps.grad[0, 2].item() == 0.0


def test_dapo_global_normaliser_by_hand():
    logps = torch.zeros(2, 3, dtype=D)
    mask = t([[1, 1, 0], [1, 1, 1]])
    # 20 active tokens in the global batch over 2 ranks: this rank divides by 10
    loss, _ = policy_loss(logps, logps, t([1.0, -2.0]), mask, "dapo", 0.2, num_items_in_batch=20,
                          num_processes=2, gradient_accumulation_steps=3)
    assert loss.item() == pytest.approx(4.0 / 10.0)


def test_gradient_accumulation_divides_by_steps_for_grpo_bnpo_drgrpo():
    logps, old, adv, mask, _ = rand_batch()
    for lt in ("grpo", "bnpo", "dr_grpo"):
        one, _ = policy_loss(logps, old, adv, mask, lt, 0.2, max_completion_length=9)
        four, _ = policy_loss(logps, old, adv, mask, lt, 0.2, max_completion_length=9,
                              gradient_accumulation_steps=4)
        assert four.item() == pytest.approx(one.item() / 4, rel=1e-12)


def test_clipping_both_sides_by_hand():
    # token 0: rho=1.5, A>0 -> clipped high at 1.28 (no grad); token 1: rho=0.5, A<0 -> clipped
    # low at 0.8 (no grad); token 2: rho=0.5, A>0 -> unclipped (grad); token 3: rho=1.5, A<0 ->
    # unclipped, the pessimistic term is rho*A (grad)
    old = torch.zeros(1, 4, dtype=D)
    logps = torch.log(t([[1.5, 0.5, 0.5, 1.5]])).requires_grad_(True)
    adv = t([[1.0, -1.0, 2.0, -2.0]])
    loss, stats = policy_loss(logps, old, adv, torch.ones(1, 4, dtype=D), "bnpo", 0.2,
                              epsilon_high=0.28)
    per = [-1.28 * 1.0, -0.8 * -1.0, -0.5 * 2.0, -1.5 * -2.0]
    assert loss.item() == pytest.approx(sum(per) / 4, abs=1e-12)
    loss.backward()
    # d(-rho*A)/dlogp = -rho*A / 4 where unclipped
    expected_grad = [0.0, 0.0, -0.5 * 2.0 / 4, -1.5 * -2.0 / 4]
    assert logps.grad[0].tolist() == pytest.approx(expected_grad, abs=1e-12)
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.25)
    assert stats["clip_ratio/low_mean"].item() == pytest.approx(0.25)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)


def test_epsilon_high_defaults_to_epsilon():
    old = torch.zeros(1, 1, dtype=D)
    logps = torch.log(t([[1.5]]))
    loss, stats = policy_loss(logps, old, t([1.0]), torch.ones(1, 1, dtype=D), "grpo", 0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert stats["clip_ratio/high_mean"].item() == 1.0


def test_k3_kl_by_hand():
    logps = t([[-1.0, -2.0]]).requires_grad_(True)
    ref = t([[-1.5, -1.0]])
    d = [-0.5, 1.0]
    k3 = [math.exp(x) - x - 1 for x in d]
    assert k3_kl(logps.detach(), ref).tolist()[0] == pytest.approx(k3)
    assert all(v >= 0 for v in k3)
    beta = 0.1
    loss, stats = policy_loss(logps, logps.detach(), t([0.0]), torch.ones(1, 2, dtype=D), "bnpo", 0.2,
                              ref_logps=ref, beta=beta)
    # A=0: only the KL term is left
    assert loss.item() == pytest.approx(beta * sum(k3) / 2)
    assert stats["kl"].item() == pytest.approx(sum(k3) / 2)
    loss.backward()
    # d k3 / d logp = 1 - e^d
    assert logps.grad[0].tolist() == pytest.approx([beta * (1 - math.exp(x)) / 2 for x in d])


def test_kl_logged_without_penalty_when_beta_zero():
    logps, old, adv, mask, ref = rand_batch()
    with_ref, st = policy_loss(logps, old, adv, mask, "dapo", 0.2, ref_logps=ref, beta=0.0)
    without, st0 = policy_loss(logps, old, adv, mask, "dapo", 0.2)
    assert with_ref.item() == without.item()
    assert st["kl"].item() > 0 and st0["kl"].item() == 0


def test_gspo_sequence_ratio_by_hand():
    old = torch.zeros(1, 3, dtype=D)
    # log-ratios 0.1 and 0.3 on active tokens; a huge one on the padding must not count
    logps = t([[0.1, 0.3, 5.0]]).requires_grad_(True)
    mask = t([[1, 1, 0]])
    loss, stats = policy_loss(logps, old, t([1.0]), mask, "grpo", 0.3,
                              importance_sampling_level="sequence")
    w = math.exp(0.2)
    assert loss.item() == pytest.approx(-w)
    assert stats["ratio_mean"].item() == pytest.approx(w)
    loss.backward()
    # d(-exp(mean lr))/dlogp_t = -w / 2 on each active token
    assert logps.grad[0].tolist() == pytest.approx([-w / 2, -w / 2, 0.0])
    # token level would use two different ratios
    tok, _ = policy_loss(logps.detach(), old, t([1.0]), mask, "grpo", 0.4)
    assert tok.item() == pytest.approx(-(math.exp(0.1) + math.exp(0.3)) / 2)


def test_gspo_clips_the_whole_sequence():
    old = torch.zeros(1, 2, dtype=D)
    logps = t([[0.0, 1.0]]).requires_grad_(True)  # mean log-ratio 0.5: rho = 1.65 > 1.2
    loss, stats = policy_loss(logps, old, t([1.0]), torch.ones(1, 2, dtype=D), "grpo", 0.2,
                              importance_sampling_level="sequence")
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert logps.grad.abs().sum().item() == 0.0
    assert stats["clip_ratio/high_mean"].item() == 1.0


def test_per_token_advantages_by_hand_and_broadcast():
    logps, old, adv, mask, _ = rand_batch()
    for lt in LOSS_TYPES:
        a, _ = policy_loss(logps, old, adv, mask, lt, 0.2, max_completion_length=7)
        b, _ = policy_loss(logps, old, adv[:, None].expand(-1, 7).clone(), mask, lt, 0.2,
                           max_completion_length=7)
        assert a.item() == pytest.approx(b.item(), rel=1e-12)
    # hand: ratio 1, A = [3, -1] on a 2-token sequence -> grpo loss = -(3 - 1) / 2
    z = torch.zeros(1, 2, dtype=D)
    loss, _ = policy_loss(z, z, t([[3.0, -1.0]]), torch.ones(1, 2, dtype=D), "grpo", 0.2)
    assert loss.item() == pytest.approx(-1.0)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("per_token_adv", [False, True])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_slow_twin(loss_type, per_token_adv, level):
    logps, old, adv, mask, ref = rand_batch(seed=3, per_token_adv=per_token_adv)
    kw = dict(epsilon_high=0.28, ref_logps=ref, beta=0.05)
    got, _ = policy_loss(logps, old, adv, mask, loss_type, 0.2, max_completion_length=9,
                         importance_sampling_level=level, **kw)
    want = twin_loss(logps, old, adv, mask, loss_type, 0.2, eps_high=0.28, ref=ref, beta=0.05, L=9,
                     level=level)
    assert got.item() == pytest.approx(float(want), rel=1e-10, abs=1e-12)


def test_entropy_stat():
    logits = torch.zeros(2, 3, 5, dtype=D)
    logits[1, 0] = torch.tensor([10.0, -10.0, -10.0, -10.0, -10.0])
    mask = t([[1, 1, 1], [1, 0, 0]])
    z = torch.zeros(2, 3, dtype=D)
    _, stats = policy_loss(z, z, t([1.0, 1.0]), mask, "grpo", 0.2, logits=logits)
    ent = entropy_from_logits(logits)
    assert ent[0, 0].item() == pytest.approx(math.log(5))
    assert ent[1, 0].item() < 1e-6
    assert stats["entropy"].item() == pytest.approx((3 * math.log(5) + ent[1, 0].item()) / 4)


# ---- gradient accumulation and data-parallel invariance ----

def _grad(fn, logps):
    x = logps.detach().clone().requires_grad_(True)
    fn(x).backward()
    return x.grad


def _micro_grads(logps, old, adv, mask, ref, loss_type, splits, P=1, level="token"):
    """Sum of micro-batch gradients on each of P ranks, then DDP's mean over ranks."""
    n_items = mask.sum()
    GA = len(splits) // P
    total = torch.zeros_like(logps)
    for idx in splits:
        x = logps[idx].detach().clone().requires_grad_(True)
        loss, _ = policy_loss(x, old[idx], adv[idx], mask[idx], loss_type, 0.2, epsilon_high=0.28,
                              ref_logps=ref[idx], beta=0.05, max_completion_length=9,
                              importance_sampling_level=level, num_items_in_batch=n_items,
                              num_processes=P, gradient_accumulation_steps=GA)
        loss.backward()
        total[idx] += x.grad
    return total / P


def _big_grad(logps, old, adv, mask, ref, loss_type, level="token"):
    return _grad(lambda x: policy_loss(x, old, adv, mask, loss_type, 0.2, epsilon_high=0.28,
                                       ref_logps=ref, beta=0.05, max_completion_length=9,
                                       importance_sampling_level=level)[0], logps)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_gradient_accumulation_equals_big_batch(loss_type, level):
    logps, old, adv, mask, ref = rand_batch(B=8, seed=5, per_token_adv=True)
    assert len(set(mask.sum(-1).tolist())) > 2  # unequal lengths: a wrong normaliser would show
    big = _big_grad(logps, old, adv, mask, ref, loss_type, level)
    splits = [torch.arange(i, i + 2) for i in range(0, 8, 2)]  # GA = 4 micro-batches of 2
    assert torch.allclose(_micro_grads(logps, old, adv, mask, ref, loss_type, splits, level=level),
                          big, rtol=1e-10, atol=1e-14)
    # 2 ranks x 2 micro-steps, DDP averaging
    assert torch.allclose(_micro_grads(logps, old, adv, mask, ref, loss_type, splits, P=2,
                                       level=level), big, rtol=1e-10, atol=1e-14)


def test_dapo_invariant_to_uneven_token_split():
    # micro-batches of different sizes and token counts: the global normaliser still makes it exact
    logps, old, adv, mask, ref = rand_batch(B=8, seed=6)
    big = _big_grad(logps, old, adv, mask, ref, "dapo")
    splits = [torch.tensor([0]), torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7])]
    assert torch.allclose(_micro_grads(logps, old, adv, mask, ref, "dapo", splits), big,
                          rtol=1e-10, atol=1e-14)


def test_bnpo_local_normaliser():
    # bnpo (as TRL) normalises by the micro-batch's own token count: exact when micro-batches hold
    # equally many tokens, different otherwise
    logps, old, adv, _, ref = rand_batch(B=8, seed=7)
    lens = torch.tensor([2, 5, 4, 3, 7, 1, 6, 2])  # micro-batch token counts 7, 7, 8, 8
    mask = (torch.arange(7)[None, :] < lens[:, None]).to(D)
    splits = [torch.arange(i, i + 2) for i in range(0, 8, 2)]
    big = _big_grad(logps, old, adv, mask, ref, "bnpo")
    got = _micro_grads(logps, old, adv, mask, ref, "bnpo", splits)
    assert not torch.allclose(got, big, rtol=1e-6)
    even = mask.clone()
    even[4, 6] = 0.0  # rows 4 and 6 lose a token: 7 tokens in every micro-batch
    even[6, 5] = 0.0
    assert [int(even[i].sum() + even[i + 1].sum()) for i in range(0, 8, 2)] == [7, 7, 7, 7]
    assert torch.allclose(_micro_grads(logps, old, adv, even, ref, "bnpo", splits),
                          _big_grad(logps, old, adv, even, ref, "bnpo"), rtol=1e-10, atol=1e-14)


# ---- bad input ----

@pytest.mark.parametrize("kwargs,match", [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(epsilon=1.5), "epsilon"),
    (dict(epsilon_high=-0.1), "epsilon_high"),
    (dict(beta=0.1), "ref_logps"),
    (dict(loss_type="dr_grpo"), "max_completion_length"),
    (dict(loss_type="dapo", gradient_accumulation_steps=2), "num_items_in_batch"),
    (dict(loss_type="dapo", num_processes=2), "num_items_in_batch"),
    (dict(loss_type="dapo", num_items_in_batch=0), "num_items_in_batch"),
    (dict(advantages=torch.zeros(3, dtype=D)), "advantages"),
    (dict(mask=torch.ones(2, 4, dtype=D)), "mask"),
    (dict(logits=torch.zeros(2, 3, dtype=D)), "logits"),
])
def test_bad_input(kwargs, match):
    args = dict(logps=torch.zeros(2, 3, dtype=D), old_logps=torch.zeros(2, 3, dtype=D),
                advantages=torch.zeros(2, dtype=D), mask=torch.ones(2, 3, dtype=D),
                loss_type="grpo", epsilon=0.2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args)


def test_non_tensor_refused():
    with pytest.raises(TypeError, match="advantages"):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), [1.0], torch.ones(1, 2), "grpo", 0.2)
