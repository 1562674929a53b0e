"""OneBP's pieces against their definitions (methods.md §3.2): InfoNCE, the moving aggregation and
its two duplicate rules."""

from __future__ import annotations

import math

import pytest
import torch

from ray_pinet.methods.onebp import ema_targets, ema_update_, infonce_losses


def test_infonce_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(6, generator=g), torch.randn(6, 5, generator=g)
    for t in (1.0, 0.5):
        want = [-math.log(math.exp(p / t) / (math.exp(p / t) + sum(math.exp(n / t) for n in row)))
                for p, row in zip(pos.tolist(), neg.tolist())]
        assert torch.allclose(infonce_losses(pos, neg, t), torch.tensor(want), atol=1e-6)


def test_last_write_keeps_each_users_last_row_in_batch_order():
    users = torch.tensor([3, 1, 3, 0, 1, 3])
    vecs = torch.arange(6, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    uniq, target = ema_targets(users, vecs, "last_write")
    assert uniq.tolist() == [0, 1, 3]
    assert target[:, 0].tolist() == [3.0, 4.0, 5.0]  # rows 3, 4, 5 are each user's last


def test_mean_rule_averages_a_users_rows():
    users = torch.tensor([2, 2, 0, 2])
    vecs = torch.tensor([[1.0], [2.0], [5.0], [6.0]])
    uniq, target = ema_targets(users, vecs, "mean")
    assert uniq.tolist() == [0, 2] and target[:, 0].tolist() == [5.0, 3.0]


@pytest.mark.parametrize("rule", ["last_write", "mean"])
def test_ema_update_moves_only_the_batch_users_once(rule):
    table = torch.ones(4, 2)
    users = torch.tensor([1, 1, 3])
    vecs = torch.tensor([[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]])
    ema_update_(table, users, vecs, beta=0.9, rule=rule)
    v1 = 2.0 if rule == "last_write" else 1.0
    assert torch.allclose(table[1], torch.full((2,), 0.9 + 0.1 * v1))  # one step, not two
    assert torch.allclose(table[3], torch.full((2,), 0.9 + 0.4))
    assert torch.equal(table[[0, 2]], torch.ones(2, 2))  # users outside the batch keep their rows


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="duplicate_rule"):
        ema_targets(torch.tensor([0]), torch.zeros(1, 2), "first")
