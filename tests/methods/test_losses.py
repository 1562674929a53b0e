"""per_position_losses against explicit per-position computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ray_pinet.methods.losses import per_position_losses
from ray_pinet.models.config import ModelConfig, PluginConfig
from ray_pinet.models.registry import build_model

M = 20


def setup(backbone="sasrec"):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone, dim=8, max_len=5, din_mlp=[6], din_attention_hidden=[4]), M, 2, PluginConfig())
    model.eval()
    # windows seq = [0, 0, 3, 4, 5, 6] and [1, 2, 3, 4, 5, 6]: inputs seq[:-1], targets seq[1:]
    seq = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 7]])
    negs = torch.randint(1, M + 1, (3, 5, 2), generator=torch.Generator().manual_seed(3))
    return model, seq[:, :-1], seq[:, 1:], negs, torch.tensor([0, 1, 1])


def test_ce_one_loss_per_valid_position():
    model, inputs, targets, _, stratum = setup()
    loss_vec, rows = per_position_losses(model, inputs, targets, None, stratum, "ce")
    # row 0: inputs [0,0,3,4,5] -> 3 valid positions (the target 3 after padding is not one);
    # row 1: 5; row 2: inputs all padding -> none
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    states = model.states(inputs, stratum)
    expected = []
    for b, t in [(0, 2), (0, 3), (0, 4)] + [(1, t) for t in range(5)]:
        logits = model.full_logits(states[b, t][None], stratum[b : b + 1])[0]
        expected.append(-torch.log_softmax(logits[1:], 0)[targets[b, t] - 1])
    torch.testing.assert_close(loss_vec, torch.stack(expected))


def test_bce_pos_plus_sum_of_negs():
    model, inputs, targets, negs, stratum = setup("din")
    loss_vec, rows = per_position_losses(model, inputs, targets, negs, stratum, "bce")
    assert rows.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    s = model.score(inputs, torch.cat([targets[..., None], negs], -1), stratum)
    b, t = 1, 2
    want = -F.logsigmoid(s[b, t, 0]) - F.logsigmoid(-s[b, t, 1]) - F.logsigmoid(-s[b, t, 2])
    torch.testing.assert_close(loss_vec[3 + t], want)


def test_errors():
    model, inputs, targets, _, stratum = setup("din")
    with pytest.raises(ValueError, match="dot-product"):
        per_position_losses(model, inputs, targets, None, stratum, "ce")
    with pytest.raises(ValueError, match="negs"):
        per_position_losses(model, inputs, targets, None, stratum, "bce")
    with pytest.raises(ValueError, match="unknown loss"):
        per_position_losses(model, inputs, targets, None, stratum, "mse")
