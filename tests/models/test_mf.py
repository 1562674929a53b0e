"""Two-tower MF: score / full_scores agree, Xavier-normal scale, gradients reach both tables."""

from __future__ import annotations

import math

import pytest
import torch

from ray_pinet.models.mf import MF


def test_scores_agree_and_init_scale():
    torch.manual_seed(0)
    model = MF(400, 300, 16)
    users = torch.tensor([0, 5, 399])
    full = model.full_scores(users)
    assert full.shape == (3, 300)
    items = torch.tensor([[1, 2], [299, 0], [7, 7]])
    assert torch.allclose(model.score(users, items), full.gather(1, items), atol=1e-6)
    assert torch.allclose(model.score(users, items[:, 0]), full.gather(1, items[:, :1])[:, 0], atol=1e-6)
    assert float(model.user.weight.detach().std()) == pytest.approx(math.sqrt(2 / (400 + 16)), rel=0.05)
    assert float(model.item.weight.detach().std()) == pytest.approx(math.sqrt(2 / (300 + 16)), rel=0.05)
    model.score(users, items).sum().backward()
    assert model.user.weight.grad.abs().sum() > 0 and model.item.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        MF(0, 3)
