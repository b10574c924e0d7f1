"""Advantages and losses against hand-computed values."""
import math

import pytest
import torch

from megatron_spark.algorithm import entropy_from_logits, group_advantages, grpo_loss, kl_k3, masked_mean, policy_loss


def test_group_advantages_by_prompt_id_any_order():
    r = torch.tensor([1., 0., 1., 1., 0., 0.])
    ids = ["a", "b", "a", "b", "a", "c"]
    adv = group_advantages(r, ids)
    # group a = [1, 1, 0]: mean 2/3, unbiased std sqrt(1/3)
    sa = math.sqrt(1 / 3)
    assert adv[0].item() == pytest.approx((1 - 2 / 3) / sa, rel=1e-6)
    assert adv[4].item() == pytest.approx((0 - 2 / 3) / sa, rel=1e-6)
    # group b = [0, 1]: mean .5, unbiased std sqrt(.5)
    assert adv[1].item() == pytest.approx(-0.5 / math.sqrt(0.5), rel=1e-6)
    assert adv[5].item() == 0.0  # a group of one
    pop = group_advantages(r, ids, std="population")
    assert pop[1].item() == pytest.approx(-1.0, rel=1e-6)


def test_all_equal_group_has_zero_advantage():
    assert group_advantages(torch.ones(4), [0, 0, 0, 0]).abs().max() == 0


def test_ppo_clip_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1., 1., 0.]])
    loss, clip = policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2)
    # A>0: token0 ratio 1.5 -> clipped 1.2; token1 ratio .5 -> min(.5, .8) = .5; token2 masked
    assert loss.item() == pytest.approx(-(1.2 + 0.5) / 2, rel=1e-6)
    assert clip.item() == pytest.approx(0.5)
    loss, _ = policy_loss(logp, old, torch.tensor([-1.0]), mask, 0.2, 0.2)
    # A<0: -min(-1.5, -1.2) = 1.5 ; -min(-.5, -.8) = .8
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2, rel=1e-6)
    loss, _ = policy_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.28)  # asymmetric: upper bound 1.28
    assert loss.item() == pytest.approx(-(1.28 + 0.5) / 2, rel=1e-6)


def test_reductions_differ_as_documented():
    x = torch.tensor([[1., 1., 1.], [4., 0., 0.]])
    mask = torch.tensor([[1., 1., 1.], [1., 0., 0.]])
    assert masked_mean(x, mask, "token_mean").item() == pytest.approx(7 / 4)
    assert masked_mean(x, mask, "seq_mean").item() == pytest.approx((1 + 4) / 2)


def test_k3_kl_and_total_loss():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    kl = kl_k3(logp, ref)
    assert kl[0, 0].item() == pytest.approx(0.5 - 1 - math.log(0.5), rel=1e-6)
    assert kl[0, 1].item() == 0.0
    mask = torch.ones(1, 2)
    out = grpo_loss(logp, logp.detach(), ref, torch.tensor([0.0]), mask, kl_coef=0.1)
    assert out.loss.item() == pytest.approx(0.1 * kl.mean().item(), rel=1e-6)
    ent = entropy_from_logits(torch.zeros(1, 2, 4))
    assert ent[0, 0].item() == pytest.approx(math.log(4), rel=1e-6)
    out = grpo_loss(logp, logp.detach(), None, torch.tensor([0.0]), mask, entropy=ent, entropy_coef=0.5)
    assert out.loss.item() == pytest.approx(-0.5 * math.log(4), rel=1e-6)


def test_loss_gradient_sign():
    logp = torch.zeros(1, 2, requires_grad=True)
    out = grpo_loss(logp, torch.zeros(1, 2), None, torch.tensor([2.0]), torch.ones(1, 2), kl_coef=0)
    out.loss.backward()
    assert (logp.grad < 0).all()  # positive advantage pushes log-probs up


def test_sampled_entropy_surrogate_has_the_entropy_gradient():
    """Weighted by pi(y) over every token y, the surrogate's gradient is exactly the entropy's gradient."""
    from megatron_spark.algorithm import sampled_entropy_surrogate

    logits = torch.randn(6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    entropy_from_logits(logits).backward()
    exact = logits.grad.clone()
    logits.grad = None
    logp = torch.log_softmax(logits, -1)
    (logp.exp().detach() * sampled_entropy_surrogate(logp)).sum().backward()
    assert torch.allclose(logits.grad, exact, atol=1e-6)


def test_ppo_clip_negative_advantages_with_asymmetric_bounds():
    """A<0 is clipped at 1-eps_low from below (the pessimistic side), never at 1+eps_high; hand-computed."""
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.75, 1.1]]))
    old = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    loss, clip = policy_loss(logp, old, torch.tensor([-2.0]), mask, eps_low=0.2, eps_high=0.28)
    # per token -min(rho*A, clip(rho, 0.8, 1.28)*A) with A=-2:
    # rho 1.5  -> -min(-3.0, -2.56) = 3.0  (unclipped: a negative sample pushed further is fully penalised)
    # rho 0.5  -> -min(-1.0, -1.6)  = 1.6  (clipped at 1 - eps_low = 0.8)
    # rho 0.75 -> -min(-1.5, -1.6)  = 1.6  (clipped at 0.8)
    # rho 1.1  -> 2.2 (inside both bounds)
    assert loss.item() == pytest.approx((3.0 + 1.6 + 1.6 + 2.2) / 4, rel=1e-6)
    assert clip.item() == pytest.approx(0.5)
    # swapping the bounds changes the clipped tokens: eps_low=0.28 clips at 0.72
    loss2, _ = policy_loss(logp, old, torch.tensor([-2.0]), mask, eps_low=0.28, eps_high=0.2)
    assert loss2.item() == pytest.approx((3.0 + 1.44 + 1.5 + 2.2) / 4, rel=1e-6)
    # and the gradient of a clipped token is zero, of an unclipped one is not
    lp = logp.clone().requires_grad_(True)
    policy_loss(lp, old, torch.tensor([-2.0]), mask, eps_low=0.2, eps_high=0.28)[0].backward()
    assert lp.grad[0, 1] == 0 and lp.grad[0, 2] == 0 and lp.grad[0, 0] > 0 and lp.grad[0, 3] > 0


def test_group_advantages_eps_dtype_and_bad_shapes():
    r = torch.tensor([1., 0., 0.])
    # eps enters the denominator: std of [1, 0, 0] (unbiased) = sqrt(1/3); with eps = 1 the scale is 1/(sqrt(1/3)+1)
    adv = group_advantages(r, [0, 0, 0], eps=1.0)
    assert adv[0].item() == pytest.approx((2 / 3) / (math.sqrt(1 / 3) + 1.0), rel=1e-6)
    assert adv.dtype == torch.float32 and group_advantages(r.double(), [0, 0, 0]).dtype == torch.float64
    with pytest.raises(ValueError, match=r"rewards \(3,\) must be \[N\] with N = 2 prompt ids"):
        group_advantages(r, [0, 0])
    with pytest.raises(ValueError, match=r"rewards \(1, 3\) must be \[N\] with N = 3"):
        group_advantages(r[None], [0, 0, 0])  # right element count, wrong rank


@pytest.mark.parametrize("reduction", ["token_mean", "seq_mean"])
def test_batch_normalised_loss_is_the_same_however_the_batch_is_cut(reduction):
    """Shares of the global batch add up to the whole batch's loss for any split into micro-batches (rows with no
    response token, i.e. pipeline fillers, count for nothing); per-micro-batch means do not."""
    from megatron_spark.algorithm import BatchSize

    g = torch.Generator().manual_seed(0)
    n, t = 6, 9
    logp, old, ref = (-torch.rand(n, t, generator=g) for _ in range(3))
    adv = torch.randn(n, generator=g)
    lengths = torch.tensor([9, 2, 5, 7, 1, 4])
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    ent = torch.rand(n, t, generator=g)
    kw = dict(eps_low=0.2, eps_high=0.28, kl_coef=0.1, reduction=reduction, entropy=ent, entropy_coef=0.01)
    whole = grpo_loss(logp, old, ref, adv, mask, **kw)
    batch = BatchSize(tokens=int(mask.sum()), sequences=n)
    for cuts in ([0, 6], [0, 2, 6], [0, 1, 3, 6], [0, 1, 2, 3, 4, 5, 6]):
        parts = [grpo_loss(logp[a:b], old[a:b], ref[a:b], adv[a:b], mask[a:b], batch=batch,
                           **{**kw, "entropy": ent[a:b]}) for a, b in zip(cuts, cuts[1:])]
        for field in ("loss", "policy_loss", "kl", "clip_fraction", "entropy"):
            assert sum(getattr(p, field) for p in parts).item() == pytest.approx(getattr(whole, field).item(),
                                                                                 rel=1e-6, abs=1e-7), field
    # a filler row changes nothing
    pad = grpo_loss(torch.cat([logp, logp[:1]]), torch.cat([old, old[:1]]), torch.cat([ref, ref[:1]]),
                    torch.cat([adv, adv[:1]]), torch.cat([mask, torch.zeros(1, t)]),
                    **{**kw, "entropy": torch.cat([ent, ent[:1]])})
    assert pad.loss.item() == pytest.approx(whole.loss.item(), rel=1e-6)
    # per-micro-batch means (no BatchSize) do depend on the cut
    halves = [grpo_loss(logp[a:b], old[a:b], ref[a:b], adv[a:b], mask[a:b], **{**kw, "entropy": ent[a:b]}).loss
              for a, b in ((0, 1), (1, 6))]
    assert abs((halves[0] + halves[1]).item() / 2 - whole.loss.item()) > 1e-3


def test_defaults_and_entropy_reduction():
    """The defaults are the paper's symmetric 0.2 clip; the entropy term is reduced like the other terms."""
    import inspect

    for fn in (policy_loss, grpo_loss):
        sig = inspect.signature(fn).parameters
        assert sig["eps_low"].default == 0.2 and sig["eps_high"].default == 0.2
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.25, 0.0 + 1e-9, 0.0 + 1e-9]]))
    mask = torch.tensor([[1., 1., 1.], [1., 0., 0.]])
    ent = torch.tensor([[1., 1., 1.], [4., 0., 0.]])
    tok = grpo_loss(logp, logp.detach(), None, torch.zeros(2), mask, entropy=ent, entropy_coef=1.0)
    seq = grpo_loss(logp, logp.detach(), None, torch.zeros(2), mask, entropy=ent, entropy_coef=1.0,
                    reduction="seq_mean")
    assert tok.entropy.item() == pytest.approx(7 / 4) and seq.entropy.item() == pytest.approx(5 / 2)
    # the clip fraction always counts tokens, whatever the reduction
    assert tok.clip_fraction.item() == seq.clip_fraction.item() == 0.0


def _k3(d):
    return math.exp(d) - 1 - d


def test_grpo_loss_hand_computed_with_real_old_and_reference_logprobs():
    """Two sequences of different lengths, non-zero old log-probs, asymmetric clipping, per-token reference gaps:
    every term by hand, for both reductions (token mean over 5 tokens; mean over the 2 sequences' means)."""
    rho = [[1.5, 0.5, 1.0], [1.1, 0.7, 9.9]]
    old = torch.full((2, 3), -0.5)
    logp = old + torch.log(torch.tensor(rho))
    gap = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
    ref = logp + torch.tensor(gap)
    mask = torch.tensor([[1., 1., 1.], [1., 1., 0.]])
    adv = torch.tensor([1.0, -1.0])
    # PPO-clip per token, eps_low 0.2 / eps_high 0.28: A=+1 row: -1.28, -0.5, -1.0; A=-1 row: 1.1, 0.8 (masked: -)
    pl_tok = [[-1.28, -0.5, -1.0], [1.1, 0.8]]
    kl_tok = [[_k3(g) for g in gap[0]], [_k3(g) for g in gap[1][:2]]]
    for reduction in ("token_mean", "seq_mean"):
        def red(rows):
            if reduction == "token_mean":
                return sum(sum(r) for r in rows) / 5
            return sum(sum(r) / len(r) for r in rows) / 2
        out = grpo_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.28, kl_coef=0.5, reduction=reduction)
        assert out.policy_loss.item() == pytest.approx(red(pl_tok), rel=1e-5), reduction
        assert out.kl.item() == pytest.approx(red(kl_tok), rel=1e-5), reduction
        assert out.loss.item() == pytest.approx(red(pl_tok) + 0.5 * red(kl_tok), rel=1e-5), reduction
        assert out.clip_fraction.item() == pytest.approx(2 / 5), reduction  # always over tokens
    # the defaults: symmetric 0.2 clip, KL 1e-3, no entropy term, token mean
    d = grpo_loss(logp, old, ref, adv, mask, entropy=torch.ones(2, 3))
    e = grpo_loss(logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.2, kl_coef=1e-3, entropy_coef=0.0,
                  reduction="token_mean")
    assert d.loss.item() == e.loss.item() and d.clip_fraction.item() == e.clip_fraction.item()


def test_per_token_advantages_and_single_token_means():
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0]])  # [N, T]: one advantage per token
    loss, _ = policy_loss(logp, torch.zeros(1, 2), adv, torch.ones(1, 2), 0.2, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2, rel=1e-6)  # token 1: -min(-0.5, -0.8) = 0.8
    one = torch.tensor([[5.0, 7.0]])
    m = torch.tensor([[1.0, 0.0]])
    assert masked_mean(one, m, "token_mean").item() == 5.0 and masked_mean(one, m, "seq_mean").item() == 5.0


def test_default_arguments_behave_as_documented():
    """Called without them: clip at 0.8 / 1.2 and token means (signatures cannot show this under mutation tools)."""
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.0, 1.0, 1.0]]))
    mask = torch.tensor([[1., 1., 1.], [1., 0., 0.]])
    loss, clip = policy_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, 0.0]), mask)
    assert loss.item() == pytest.approx(-(1.2 + 0.5 + 1.0) / 4, rel=1e-6) and clip.item() == pytest.approx(0.25)
    x = torch.tensor([[1., 1., 1.], [4., 0., 0.]])
    assert masked_mean(x, mask).item() == pytest.approx(7 / 4)
    out = grpo_loss(logp, torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, 0.0]), mask)
    assert out.loss.item() == pytest.approx(loss.item() + 1e-3 * out.kl.item(), rel=1e-6)


def test_has_spread_marks_groups_whose_rewards_differ():
    from megatron_spark.algorithm import has_spread

    rewards = [1, 0, 1, 1, 0.1, 0.1, 0.1, 0, 0.5]
    ids = ["a", "a", "b", "b", "c", "c", "c", "d", "d"]
    assert has_spread(rewards, ids) == [True, True, False, False, False, False, False, True, True]
    # rewards like 0.1 are equal but their advantages are not exactly 0: the filter must not look at advantages
    assert group_advantages(torch.tensor([0.1, 0.1, 0.1]), [0, 0, 0]).abs().max() < 1e-6
    assert has_spread([1.0], ["x"]) == [False]


def test_skip_zero_advantage_leaves_groups_without_spread_out_of_the_global_batches():
    import random

    from megatron_spark.batching import global_batches

    outs = [["p0a", "p0b"], ["p1a", "p1b"], ["p2a", "p2b"]]
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]  # prompt 1's group has no spread
    for skip, kept in ((False, {"p0a", "p0b", "p1a", "p1b", "p2a", "p2b"}), (True, {"p0a", "p0b", "p2a", "p2b"})):
        batches = global_batches(outs, rewards, 2, random.Random(0), skip_zero_advantage=skip)
        assert {x.sample for b in batches for x in b} == kept and all(len(b) == 2 for b in batches)
        assert all(x.advantage != 0 for b in batches for x in b) == skip


def test_truncated_importance_sampling_by_hand():
    from megatron_spark.algorithm import truncated_is_weights

    # the trainer's log-probs require grad here, so a weight that kept its graph would change the gradient below
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]])).requires_grad_(True)
    rollout = torch.log(torch.tensor([[0.25, 0.4, 0.3]]))
    w, ratio = truncated_is_weights(old, rollout, cap=2.0)
    assert not w.requires_grad and not ratio.requires_grad
    old = old.detach()
    assert torch.allclose(ratio, torch.tensor([[2.0, 0.5, 3.0]])) and torch.allclose(w, torch.tensor([[2.0, 0.5,
                                                                                                        2.0]]))
    # the policy term of each token is scaled by its weight: logp == old (ratio 1, no clipping), A = 1, mask all
    logp = old.clone().requires_grad_(True)
    mask = torch.ones(1, 3)
    plain, _ = policy_loss(logp, old, torch.tensor([1.0]), mask)
    weighted, _ = policy_loss(logp, old, torch.tensor([1.0]), mask, is_weights=w)
    assert plain.item() == pytest.approx(-1.0) and weighted.item() == pytest.approx(-(2.0 + 0.5 + 2.0) / 3)
    weighted.backward()
    # d/dlogp of -exp(logp - old) * w / 3 at logp = old is -w / 3; no gradient flows through the weights
    assert torch.allclose(logp.grad, -w / 3)
    total = grpo_loss(logp.detach(), old, None, torch.tensor([1.0]), mask, kl_coef=0.0, is_weights=w)
    assert total.loss.item() == pytest.approx(weighted.item())


def test_tis_in_the_trainers_loss_logs_ratio_and_capped_fraction():
    from types import SimpleNamespace

    from megatron_spark.loss import GRPOLoss, MicroBatch

    alg = SimpleNamespace(rollout_is="tis", rollout_is_cap=2.0, kl_coef=0.0, eps_clip_low=0.2, eps_clip_high=0.2,
                          entropy_coef=0.0, loss_reduction="token_mean")
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9, 0.3]]))
    mb = MicroBatch(mask=torch.tensor([[1.0, 1.0, 1.0, 0.0]]), old=old, ref=old, adv=torch.tensor([1.0]),
                    rollout=torch.log(torch.tensor([[0.25, 0.4, 0.3, 0.01]])))  # the 4th token is masked out
    loss, m = GRPOLoss(alg)(old.clone(), mb)
    assert m["is_ratio_mean"].item() == pytest.approx((2.0 + 0.5 + 3.0) / 3)
    assert m["is_capped_fraction"].item() == pytest.approx(1 / 3)
    assert loss.item() == pytest.approx(-(2.0 + 0.5 + 2.0) / 3)
    off = dict(vars(alg), rollout_is="off")
    loss_off, m_off = GRPOLoss(SimpleNamespace(**off))(old.clone(), mb)
    assert loss_off.item() == pytest.approx(-1.0) and "is_ratio_mean" not in m_off


def test_overlong_penalty_by_hand():
    """DAPO's soft overlong punishment with max_new_tokens 100, buffer 20: nothing up to 80 tokens, then -1/20 per
    token over, -factor at (and beyond) the limit; off when the buffer is 0."""
    from megatron_spark.algorithm import overlong_penalty

    assert [overlong_penalty(n, 100, 20) for n in (10, 80, 81, 90, 100, 130)] == [0.0, 0.0, -0.05, -0.5, -1.0, -1.0]
    assert overlong_penalty(90, 100, 20, factor=0.5) == -0.25
    assert overlong_penalty(100, 100, 0) == 0.0


def test_overlong_shaping_and_truncation_masking_in_the_trainer():
    """algorithm.overlong_buffer shapes the rewards the advantages come from (the verifier's 0/1 still drives
    recycling); algorithm.mask_truncated leaves responses cut at the limit out of the update while they still
    count in their group's advantage."""
    import random
    from types import SimpleNamespace

    from megatron_spark.batching import global_batches, shaped_rewards

    S = lambda n, reason: SimpleNamespace(token_ids=[0] * n, finish_reason=reason, name=f"{n}{reason[0]}")  # noqa
    samples = [S(10, "stop"), S(95, "stop"), S(100, "length"), S(40, "stop")]
    shaped = shaped_rewards([1.0, 1.0, 0.0, 0.0], samples, max_new_tokens=100, overlong_buffer=20, factor=1.0)
    assert shaped == [1.0, 1.0 - 0.75, 0.0 - 1.0, 0.0]
    assert shaped_rewards([1.0], samples[:1], max_new_tokens=100, overlong_buffer=0, factor=1.0) == [1.0]
    outs = [samples[:2], samples[2:]]
    for mask, kept in ((False, {"10s", "95s", "100l", "40s"}), (True, {"10s", "95s", "40s"})):
        batches = global_batches(outs, [1.0, 0.0, 0.0, 1.0], 1, random.Random(0), mask_truncated=mask)
        assert {x.sample.name for b in batches for x in b} == kept
        # the truncated response's group still has spread: its partner keeps a non-zero advantage
        assert all(abs(x.advantage) > 0 for b in batches for x in b)
