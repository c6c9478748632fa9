"""REBEL loss against hand-computed values and gradients."""

from __future__ import annotations

import pytest
import torch

from personalign.errors import ConfigError
from personalign.losses import rebel_loss


def _inputs():
    logp_y = torch.tensor([-3.0, -5.0], requires_grad=True)
    logp_old_y = torch.tensor([-3.5, -4.0])
    logp_yp = torch.tensor([-2.0, -6.0], requires_grad=True)
    logp_old_yp = torch.tensor([-2.0, -6.5])
    u_y = torch.tensor([0.8, 0.1])
    u_yp = torch.tensor([0.3, 0.4])
    return logp_y, logp_old_y, logp_yp, logp_old_yp, u_y, u_yp


def test_rebel_loss_and_gradient_hand_computed():
    logp_y, logp_old_y, logp_yp, logp_old_yp, u_y, u_yp = _inputs()
    # D(y) = [0.5, -1.0], D(y') = [0.0, 0.5]; eta = 2 -> (D - D') / eta = [0.25, -0.75];
    # U - U' = [0.5, -0.3]; residuals r = [-0.25, -0.45]; loss = (0.0625 + 0.2025) / 2 = 0.1325.
    loss = rebel_loss(logp_y, logp_old_y, logp_yp, logp_old_yp, u_y, u_yp, eta=2.0)
    assert loss.item() == pytest.approx(0.1325)
    loss.backward()
    # dL/dlogp_y = 2 r / (B eta) = r / 2; dL/dlogp_y' is its negative.
    assert logp_y.grad.tolist() == pytest.approx([-0.125, -0.225])
    assert logp_yp.grad.tolist() == pytest.approx([0.125, 0.225])


def test_rebel_loss_is_zero_when_log_ratios_match_utilities():
    d = torch.tensor([0.3, -0.2])
    loss = rebel_loss(d, torch.zeros(2), torch.zeros(2), torch.zeros(2), d / 0.5, torch.zeros(2), eta=0.5)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_rebel_loss_rejects_bad_input():
    args = [t.detach() for t in _inputs()]
    with pytest.raises(ConfigError, match="eta"):
        rebel_loss(*args, eta=0.0)
    with pytest.raises(ValueError, match="u_yp"):
        rebel_loss(*args[:5], torch.zeros(3), eta=1.0)
    with pytest.raises(ValueError, match="logp_y"):
        rebel_loss(torch.zeros(2, 4), *args[1:], eta=1.0)
