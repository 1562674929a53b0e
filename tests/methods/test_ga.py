"""GA priors, weights and the exactness contract (methods.md §1.2, §6)."""

from __future__ import annotations

import pytest
import torch

from ray_pinet.methods.ga import Prior, ga_weights, reference_ga_gradient, stratum_counts, stratum_prior, unit_losses
from ray_pinet.methods.losses import per_position_losses
from ray_pinet.models.config import ModelConfig
from ray_pinet.models.registry import build_model

M, L = 25, 6


def test_priors_by_hand():
    counts = torch.tensor([6.0, 2.0, 0.0])  # N_s; stratum 2 absent from the batch
    share = [0.5, 0.25, 0.25]  # user shares n_s
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    pi = lambda kind, alpha=0.0: stratum_prior(Prior(kind, alpha, share), counts)  # noqa: E731
    torch.testing.assert_close(pi("interaction_share"), t(0.75, 0.25, 0))
    torch.testing.assert_close(pi("uniform"), t(0.5, 0.5, 0))
    # user_share renormalised over present strata: 0.5, 0.25 -> 2/3, 1/3
    torch.testing.assert_close(pi("user_share"), t(2 / 3, 1 / 3, 0))
    # power α=0.5: sqrt(.75*.5)=.6124, sqrt(.25*.25)=.25 -> .7101, .2899
    a, b = (0.75 * 0.5) ** 0.5, (0.25 * 0.25) ** 0.5
    torch.testing.assert_close(pi("power", 0.5), t(a / (a + b), b / (a + b), 0))
    torch.testing.assert_close(pi("power", 0.0), t(0.75, 0.25, 0))
    torch.testing.assert_close(pi("power", 1.0), t(2 / 3, 1 / 3, 0))
    # α = -1: c²/n = 1.125, 0.25 -> head data weighted above its share
    torch.testing.assert_close(pi("power", -1.0), t(1.125 / 1.375, 0.25 / 1.375, 0))
    assert stratum_prior(Prior("user_share", user_share=share), torch.zeros(3)).sum() == 0
    with pytest.raises(ValueError, match="unknown prior"):
        Prior("nope")


def test_weights_and_units():
    strata = torch.tensor([0, 0, 1, 0])
    counts = torch.tensor([5.0, 2.0])  # global: this shard holds 3 of 5 and 1 of 2
    w = ga_weights(strata, counts, torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([0.05, 0.05, 0.375, 0.05]))
    with pytest.raises(ValueError, match="global_counts"):
        ga_weights(strata, torch.tensor([5.0, 0.0]), torch.tensor([0.5, 0.5]))
    loss, rows = unit_losses(torch.tensor([1.0, 3.0, 5.0, 2.0]), torch.tensor([0, 0, 2, 3]), 4, "user")
    assert loss.tolist() == [2.0, 5.0, 2.0] and rows.tolist() == [0, 2, 3]  # row 1 has no positions


# ---- gradients on a small SASRec ---------------------------------------------------------------


def small_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(dim=8, max_len=L, num_heads=2), M).double().eval()
    return model


def data():
    g = torch.Generator().manual_seed(5)
    seqs = torch.randint(1, M + 1, (8, L + 1), generator=g)
    for b, n in enumerate([2, 5, 7, 3, 6, 4, 7, 1]):
        seqs[b, : L + 1 - n] = 0  # left padding; row 7 has no target position
    return seqs[:, :-1], seqs[:, 1:], torch.tensor([0, 0, 1, 0, 1, 0, 1, 1])


def grads(model, loss):
    params = [p for p in model.parameters()]
    return [g if g is not None else torch.zeros_like(p) for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]


def units_of(model, inputs, targets, strata, unit):
    loss_vec, rows = per_position_losses(model, inputs, targets, None, None, "ce")
    loss, rows = unit_losses(loss_vec, rows, inputs.shape[0], unit)
    return loss, strata[rows]


def ga_loss(model, inputs, targets, strata, unit, kind, global_counts=None, prior=None):
    loss, s = units_of(model, inputs, targets, strata, unit)
    counts = stratum_counts(s, 2) if global_counts is None else global_counts
    if prior is None:
        prior = stratum_prior(Prior(kind, 0.5, [0.8, 0.2]), counts)
    return (ga_weights(s, counts, prior, dtype=loss.dtype) * loss).sum()


def rel_err(a, b):
    num = sum(((x - y) ** 2).sum() for x, y in zip(a, b)) ** 0.5
    return float(num / sum((y**2).sum() for y in b) ** 0.5)


@pytest.mark.parametrize("unit", ["position", "user"])
def test_interaction_share_is_pooled_mean(unit):
    model = small_model()
    inputs, targets, strata = data()
    pooled = units_of(model, inputs, targets, strata, unit)[0].mean()
    got = ga_loss(model, inputs, targets, strata, unit, "interaction_share")
    assert rel_err(grads(model, got), grads(model, pooled)) < 1e-12


@pytest.mark.parametrize("unit", ["position", "user"])
@pytest.mark.parametrize("kind", ["user_share", "uniform", "power"])
def test_weighted_loss_equals_literal_per_stratum_means(kind, unit):
    model = small_model()
    inputs, targets, strata = data()
    weighted = grads(model, ga_loss(model, inputs, targets, strata, unit, kind))

    # one sample = one position (b, t), or one row; its loss computed alone
    valid = (inputs != 0) & (targets != 0)
    if unit == "position":
        samples = [(b, t) for b, t in valid.nonzero().tolist()]

        def loss_fn(m, sample):
            b, t = sample
            tg = torch.zeros_like(targets[b : b + 1])
            tg[0, t] = targets[b, t]
            return per_position_losses(m, inputs[b : b + 1], tg, None, None, "ce")[0].sum()
    else:
        samples = [(b, None) for b in range(8) if valid[b].any()]

        def loss_fn(m, sample):
            b = sample[0]
            return per_position_losses(m, inputs[b : b + 1], targets[b : b + 1], None, None, "ce")[0].mean()

    s = [int(strata[b]) for b, _ in samples]
    prior = stratum_prior(Prior(kind, 0.5, [0.8, 0.2]), stratum_counts(torch.tensor(s), 2))
    ref = reference_ga_gradient(model, loss_fn, samples, s, prior)
    assert rel_err(weighted, [ref[n] for n, _ in model.named_parameters()]) < 1e-6


@pytest.mark.parametrize("unit", ["position", "user"])
def test_two_shards_sum_to_full_batch_gradient(unit):
    """What the distributed trainer does: global counts, shard-local weighted sums, SUM over shards."""
    model = small_model()
    inputs, targets, strata = data()
    full = grads(model, ga_loss(model, inputs, targets, strata, unit, "power"))
    shards = [slice(0, 3), slice(3, 8)]  # unequal sizes and stratum mixes
    counts = sum(stratum_counts(units_of(model, inputs[sh], targets[sh], strata[sh], unit)[1], 2) for sh in shards)
    prior = stratum_prior(Prior("power", 0.5, [0.8, 0.2]), counts)
    parts = [grads(model, ga_loss(model, inputs[sh], targets[sh], strata[sh], unit, "", counts, prior)) for sh in shards]
    summed = [a + b for a, b in zip(*parts)]
    assert rel_err(summed, full) < 1e-12
