"""Uniform (RNS) and AUC-NS negative samplers: keyed draws, exact set arithmetic, the gain formula
against hand-computed values, and independence of the draws from batch composition."""

from __future__ import annotations

import math
import typing

import pytest
import torch

from ray_pinet.config_base import ConfigError
from ray_pinet.methods import negative_sampling as ns
from ray_pinet.models.mf import MF
from ray_pinet.twotower_config import TwoTowerConfig, TwoTowerModel

U, I = 30, 25


def random_sets(seed: int = 0, rows: int = 300) -> ns.UserItemSets:
    g = torch.Generator().manual_seed(seed)
    users = torch.cat([torch.arange(U), torch.randint(0, U, (rows,), generator=g)])  # every user has a positive
    items = torch.randint(0, I, (users.numel(),), generator=g)
    return ns.UserItemSets.from_pairs(users, items, U, I)


def test_keyed_uniform_is_a_function_of_the_key_only():
    ids = torch.tensor([5, 0, 17, 5])
    a = ns.keyed_uniform(7, 1, 3, ids, 4)
    assert a.shape == (4, 4) and a.dtype == torch.float64
    assert ((a >= 0) & (a < 1)).all()
    assert torch.equal(a[0], a[3])  # same example, same draws
    assert torch.equal(ns.keyed_uniform(7, 1, 3, torch.tensor([17]), 4)[0], a[2])
    assert torch.equal(ns.keyed_uniform(7, 1, 3, ids, 2), a[:, :2])  # slot s does not depend on num
    for other in (ns.keyed_uniform(8, 1, 3, ids, 4), ns.keyed_uniform(7, 2, 3, ids, 4), ns.keyed_uniform(7, 1, 4, ids, 4)):
        assert not torch.isclose(other, a).any()
    many = ns.keyed_uniform(0, 0, 0, torch.arange(20_000), 1)
    assert abs(float(many.mean()) - 0.5) < 0.01
    with pytest.raises(ValueError):
        ns.keyed_uniform(0, 0, 0, torch.tensor([-1]), 1)


def test_user_item_sets_rank_arithmetic_matches_brute_force():
    sets = random_sets()
    mask = sets.mask(torch.arange(U))
    for u in range(U):
        pos = torch.nonzero(mask[u]).flatten()
        neg = torch.nonzero(~mask[u]).flatten()
        users = torch.full((1,), u)
        assert int(sets.pos_count(users)) == pos.numel() and int(sets.neg_count(users)) == neg.numel()
        assert torch.equal(sets.positives_at(users, torch.arange(pos.numel())[None])[0], pos)
        assert torch.equal(sets.negatives_at(users, torch.arange(neg.numel())[None])[0], neg)
    dup = ns.UserItemSets.from_pairs(torch.tensor([0, 0, 1]), torch.tensor([2, 2, 0]), 3, 4)
    assert dup.pos_count(torch.arange(3)).tolist() == [1, 1, 0]  # duplicates once, empty user allowed
    assert dup.negatives_at(torch.tensor([2]), torch.tensor([[0, 3]])).tolist() == [[0, 3]]


def test_negative_draws_are_distinct_non_interacted_and_uniform():
    sets = random_sets()
    mask = sets.mask(torch.arange(U))
    ids = torch.arange(24_000)
    users = ids % U
    k = 4
    neg = sets.sample_negatives(users, ns.keyed_uniform(1, 9, 0, ids, sets.neg_slots(k)), k)
    assert not mask[users.unsqueeze(1), neg].any()
    assert (neg.sort(1).values.diff(1) > 0).all()
    # user 0: every negative equally likely, in every draw position
    n0 = int(sets.neg_count(torch.tensor([0])))
    for j in range(k):
        counts = torch.bincount(neg[users == 0, j], minlength=I)[~mask[0]].double()
        expected = (users == 0).sum() / n0
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < n0 + 6 * math.sqrt(2 * n0)  # ~6 sd above the chi-square mean
    pos = sets.sample_positives(users, ns.keyed_uniform(1, 8, 0, ids, 3))
    assert mask[users.unsqueeze(1), pos].all()


def test_sequential_fallback_is_exact_without_replacement():
    sets = random_sets()
    ids = torch.arange(3000)
    users = ids % U
    k = int(sets.neg_count(torch.arange(U)).min())  # as many draws as the smallest I_u⁻ allows
    u = ns.keyed_uniform(2, 9, 0, ids, k)
    neg = sets.sample_negatives(users, u, k)  # only k slots: duplicates force the fallback
    assert (neg.sort(1).values.diff(1) > 0).all()
    assert not sets.mask(users).gather(1, neg).any()
    with pytest.raises(ValueError, match="fewer than"):
        sets.sample_negatives(users, ns.keyed_uniform(2, 9, 0, ids, I), I)


def test_auc_ns_gain_hand_computed():
    # one user, N = 2, M = 2; |I_u+| = 3, |I_u-| = 7; α = .6, γ = .5
    x_pos, x_neg, x_cand = torch.tensor([[1.0, 2.0]]), torch.tensor([[-1.0, 0.0]]), torch.tensor([[0.5, -0.5]])
    cdf, prior = torch.tensor([[0.75, 0.25]]), torch.tensor([[0.5, 0.2]])
    got = ns.auc_ns_gain(x_pos, x_neg, x_cand, cdf, prior, torch.tensor([3]), torch.tensor([7]), alpha=0.6, gamma=0.5)

    def sig(z: float) -> float:
        return 1 / (1 + math.exp(-z))

    expected = []
    for xc, f, p in ((0.5, 0.75, 0.5), (-0.5, 0.25, 0.2)):
        info_pos = 3 * sum(1 - sig(xp - xc) for xp in (1.0, 2.0)) / 2
        info_neg = 0.5 * 7 * sum(1 - sig(xc - xq) for xq in (-1.0, 0.0)) / 2
        negdist = (2 * (1 - f) * 0.6 + 2 * f * 0.4) * p
        posdist = (2 * (1 - f) * 0.4 + 2 * f * 0.6) * (1 - p)
        p_tn = negdist / (negdist + posdist)
        expected.append(p_tn * info_pos - (1 - p_tn) * info_neg)
    assert torch.allclose(got, torch.tensor([expected], dtype=torch.float64), atol=1e-12)


def test_rank_cdf_exact_and_sampled():
    torch.manual_seed(0)
    model = MF(U, I, 8)
    users = torch.arange(6)
    full = model.full_scores(users).detach()
    # the score path of each mode (matmul vs elementwise) so an item compares equal to itself
    x_cand = full[:, [3, 7, 11]]
    exact = ns.rank_cdf(model, users, x_cand, ns.AucNsConfig(), users, 0, 0)
    brute = torch.tensor([[float((full[b] <= x).sum()) / (I + 1) for x in x_cand[b]] for b in range(6)])
    assert torch.allclose(exact, brute.double())
    x_cand = model.score(users, torch.tensor([[3, 7, 11]]).expand(6, 3)).detach()
    sampled = ns.rank_cdf(model, users, x_cand, ns.AucNsConfig(cdf_mode="sampled", cdf_samples=20_000), users, 0, 0)
    assert (sampled - exact).abs().max() < 0.02
    with pytest.raises(ValueError, match="cdf_samples"):
        ns.AucNsConfig(cdf_mode="sampled", cdf_samples=10).validate()


@pytest.mark.parametrize("alpha", [7, -0.1, 1.01])
def test_auc_ns_settings_are_the_samplers_and_refuse_alpha_outside_0_1_naming_the_key(alpha):
    """``model.auc_ns`` is the sampler's own ``AucNsConfig`` (one definition, one validation):
    alpha, a model AUC, outside [0, 1] is a ConfigError naming the dotted key, at config load and
    for a config built in code."""
    assert typing.get_type_hints(TwoTowerModel)["auc_ns"] is ns.AucNsConfig
    with pytest.raises(ConfigError) as exc:
        TwoTowerConfig.from_dict({"model": {"method": "bpr", "sampler": "auc_ns",
                                            "auc_ns": {"alpha": alpha}}})
    assert exc.value.key == "model.auc_ns.alpha"
    assert str(exc.value).startswith("model.auc_ns.alpha must be in [0, 1]")
    with pytest.raises(ConfigError, match="alpha must be in"):
        ns.AucNsConfig(alpha=alpha).validate()


def _sampler_setup():
    sets = random_sets(1)
    torch.manual_seed(0)
    model = MF(U, I, 8)
    prior = ns.popularity_prior(torch.bincount(sets.items, minlength=I), 0.025)
    return sets, model, prior


def test_auc_ns_picks_the_largest_gain_among_its_candidates():
    sets, model, prior = _sampler_setup()
    cfg = ns.AucNsConfig(num_extra=4, num_candidates=5)
    ids = torch.arange(40)
    users = ids % U
    chosen = ns.auc_ns_negatives(model, sets, users, ids, prior, cfg, seed=3, epoch=2, num=2)
    draws = ns.auc_ns_draws(sets, users, ids, cfg, 3, 2)
    full = model.full_scores(users).detach()
    for b in range(len(ids)):
        gains = []
        for j in draws.candidates[b].tolist():
            xj = float(full[b, j])
            info_pos = sets.pos_count(users[b : b + 1]).item() * sum(
                1 - torch.sigmoid(full[b, p] - xj).item() for p in draws.extra_pos[b].tolist()) / 4
            info_neg = cfg.gamma * sets.neg_count(users[b : b + 1]).item() * sum(
                1 - torch.sigmoid(xj - full[b, q]).item() for q in draws.extra_neg[b].tolist()) / 4
            f = float((full[b] <= xj).sum()) / (I + 1)
            p = float(prior[j])
            neg = (2 * (1 - f) * cfg.alpha + 2 * f * (1 - cfg.alpha)) * p
            pos = (2 * (1 - f) * (1 - cfg.alpha) + 2 * f * cfg.alpha) * (1 - p)
            gains.append((neg / (neg + pos)) * info_pos - (pos / (neg + pos)) * info_neg)
        best = sorted(range(5), key=lambda m: -gains[m])[:2]
        assert chosen[b].tolist() == draws.candidates[b, best].tolist()


@pytest.mark.parametrize("name", ["uniform", "auc_ns"])
def test_negatives_do_not_depend_on_batch_composition(name):
    """methods.md §6: draws keyed by (seed, epoch, global example index). The same examples,
    batched differently or split over two 'workers', get the same negatives."""
    sets, model, prior = _sampler_setup()
    sampler = ns.NegativeSampler(name, sets, seed=11, num=2, prior_beta=prior, cfg=ns.AucNsConfig(num_extra=3))
    train_users = torch.randint(0, U, (64,), generator=torch.Generator().manual_seed(5))
    ids = torch.arange(64)
    whole = sampler(model, train_users[ids], ids, epoch=4)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(6))
    for batch in (perm[:10], perm[10:37], perm[37:]):  # another order, other batch sizes
        assert torch.equal(sampler(model, train_users[batch], batch, epoch=4), whole[batch])
    for rank in range(2):  # W = 2: rank r holds ids with id % 2 == r
        mine = ids[ids % 2 == rank]
        assert torch.equal(sampler(model, train_users[mine], mine, epoch=4), whole[mine])
    assert not torch.equal(sampler(model, train_users[ids], ids, epoch=5), whole)  # a new epoch redraws
    if name == "auc_ns":
        d1 = ns.auc_ns_draws(sets, train_users[ids], ids, sampler.cfg, 11, 4)
        d2 = ns.auc_ns_draws(sets, train_users[perm[:10]], perm[:10], sampler.cfg, 11, 4)
        for a, b in ((d1.extra_pos, d2.extra_pos), (d1.extra_neg, d2.extra_neg), (d1.candidates, d2.candidates)):
            assert torch.equal(a[perm[:10]], b)


def test_sampler_checks_and_bpr_loss():
    sets, model, prior = _sampler_setup()
    with pytest.raises(ValueError, match="sampler must be"):
        ns.NegativeSampler("dns", sets, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prior_beta"):
        ns.NegativeSampler("auc_ns", sets, seed=0)
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    assert math.isclose(float(ns.bpr_loss(pos, neg)), (math.log1p(math.exp(-1.0)) + math.log(2)) / 2, rel_tol=1e-6)
    assert torch.allclose(ns.bpr_loss(pos, neg.unsqueeze(1)), ns.bpr_loss(pos, neg))
    assert ns.popularity_prior(torch.tensor([0, 1, 3]), 0.5).tolist() == [0.0, 0.5, math.sqrt(0.75)]


def test_a_user_shard_draws_what_the_full_sets_draw_once_given_the_global_slot_count():
    """A rank holding some users builds its sets from their rows alone; with ``min_neg_count``
    set from the global largest |I_u⁺| its draws equal the full sets' for those users (without
    it the slot count, hence the draws, follow the shard's own users)."""
    g = torch.Generator().manual_seed(3)
    users = torch.cat([torch.arange(U), torch.zeros(20, dtype=torch.long)])  # user 0: the most items
    items = torch.cat([torch.randint(0, I, (U,), generator=g), torch.arange(20)])
    full = ns.UserItemSets.from_pairs(users, items, U, I)
    odd = users % 2 == 1
    shard = ns.UserItemSets.from_pairs(users[odd], items[odd], U, I)
    k = 4
    assert shard.neg_slots(k) != full.neg_slots(k)  # the shard alone would plan other slots
    shard.min_neg_count = I - int(full.pos_count(torch.arange(U)).max())
    assert shard.neg_slots(k) == full.neg_slots(k)
    mine = torch.arange(1, U, 2)
    ids = mine * 7
    assert torch.equal(ns.uniform_negatives(shard, mine, ids, 0, 1, k), ns.uniform_negatives(full, mine, ids, 0, 1, k))
