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
