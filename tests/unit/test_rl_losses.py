"""RL math against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from personalign.losses import (
    AdaptiveKLController,
    RunningMeanStd,
    gae_advantages,
    group_advantages,
    kl_per_token,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_policy_loss,
)


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0]])
    m = torch.tensor([[1, 1, 0]])
    assert masked_mean(x, m).item() == pytest.approx(1.5)
    w = masked_whiten(x, m)
    assert w[0, 2].item() == 0.0
    assert w[0, :2].tolist() == pytest.approx([-1.0, 1.0], abs=1e-4)


def test_gae_hand_computed():
    adv, ret = gae_advantages(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]),
                              torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0])


def test_gae_ignores_padding():
    adv, ret = gae_advantages(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[0.5, 0.6, 9.0]]),
                              torch.tensor([[1, 1, 0]]), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.3, 0.4, 0.0])
    assert ret[0, 2].item() == 0.0


def test_ppo_policy_loss_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 7.0]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5) / 3)
    assert stats["clipfrac"] == pytest.approx(1 / 3)


def test_ppo_policy_gradient_flows_only_through_unclipped():
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_(True)
    loss, _ = ppo_policy_loss(logp, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip=0.2)
    loss.backward()
    # d/dlogp of -A*exp(logp) = -ratio, averaged over 2 tokens; the clipped token has no gradient.
    assert logp.grad[0].tolist() == pytest.approx([0.0, -1.1 / 2])


def test_ppo_value_loss_hand_computed():
    v = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.5, 0.0]])
    ret = torch.tensor([[0.0, 1.0]])
    # token 0: max((1-0)^2, (0.7-0)^2) = 1 ; token 1: max(1, 1) = 1 -> 0.5 * mean = 0.5
    assert ppo_value_loss(v, old, ret, torch.ones(1, 2), clip=0.2).item() == pytest.approx(0.5)


def test_group_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert group_advantages(r, 2, "rloo").tolist() == pytest.approx([-1, 1, -1, 1])
    assert group_advantages(r, 4, "rloo").tolist() == pytest.approx([-2, -2 / 3, 2 / 3, 2])
    g = group_advantages(torch.tensor([1.0, 2.0, 3.0]), 3, "grpo")
    assert g.tolist() == pytest.approx([-1 / 1.0001, 0, 1 / 1.0001])
    with pytest.raises(ValueError, match="do not split"):
        group_advantages(r, 3)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(r, 1)


def test_sequence_policy_loss_is_policy_gradient_at_ratio_one():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    loss, _ = sequence_policy_loss(logp, logp.detach(), adv, torch.tensor([[1, 1], [1, 0]]))
    assert loss.item() == pytest.approx((-2 - 2 + 1) / 3)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([-2 / 3, -2 / 3, 1 / 3, 0.0])


def test_kl_estimators():
    logp, ref = torch.tensor([0.0]), torch.tensor([math.log(0.5)])
    assert kl_per_token(logp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_per_token(logp, ref, "k3").item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_per_token(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k9")


def test_running_mean_std_and_state():
    rms = RunningMeanStd()
    rms.update(torch.tensor([1.0, 2.0, 3.0]))
    rms.update(torch.tensor([4.0, 5.0]))
    assert rms.mean == pytest.approx(3.0, abs=1e-3)
    assert rms.var == pytest.approx(2.0, abs=1e-3)
    other = RunningMeanStd()
    other.load_state_dict(rms.state_dict())
    assert other.normalize(torch.tensor([3.0])).item() == pytest.approx(0.0, abs=1e-3)


def test_adaptive_kl_controller():
    c = AdaptiveKLController(init=0.2, target=6.0, horizon=10000)
    assert c.update(12.0, 100) == pytest.approx(0.2 * 1.002)
    assert c.update(0.0, 100) == pytest.approx(0.2 * 1.002 * 0.998)


def test_shape_scores_adds_coverage_and_subtracts_repetition():
    from types import SimpleNamespace

    from personalign.rl import shape_scores

    score, coverage, repeats = torch.tensor([1.0, -1.0, 0.0]), torch.tensor([0.5, 1.0, 0.0]), torch.tensor([0.0, 0.5, 1.0])
    off = SimpleNamespace(ontopic_coef=0.0, repeat_coef=0.0)
    assert torch.equal(shape_scores(score, coverage, repeats, off), score)  # both terms off: the score itself
    both = SimpleNamespace(ontopic_coef=2.0, repeat_coef=3.0)
    assert torch.allclose(shape_scores(score, coverage, repeats, both), torch.tensor([2.0, -0.5, -3.0]))
    assert torch.equal(score, torch.tensor([1.0, -1.0, 0.0]))  # the input is not modified in place
