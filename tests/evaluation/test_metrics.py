"""Metrics against small examples worked out by hand (in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ray_pinet.evaluation.metrics import (
    StratumStats,
    auc,
    gauc,
    hr_ndcg_at_k,
    pair_auc,
    per_user_auc,
    rank_among,
    target_rank,
)

# items 0 (padding) .. 5
SCORES = torch.tensor(
    [
        [9.0, 0.5, 0.9, 0.3, 0.9, 0.1],  # target 1 (.5); seen {2}: competitors 3 (.3), 4 (.9), 5 (.1) -> rank 1
        [0.0, 0.2, 0.2, 0.2, 0.7, 0.1],  # target 2 (.2); seen {2, 4}: target kept, 4 masked;
    ]  # competitors 1 (.2 tie), 3 (.2 tie), 5 (.1) -> optimistic 0, pessimistic 2
)
TARGET = torch.tensor([1, 2])
SEEN = [[2], [2, 4]]


def test_target_rank_masking_and_ties():
    assert target_rank(SCORES, TARGET, SEEN).tolist() == [1, 0]
    assert target_rank(SCORES, TARGET, SEEN, ties="pessimistic").tolist() == [1, 2]
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2] = mask[1, 2] = mask[1, 4] = True
    assert target_rank(SCORES, TARGET, mask).tolist() == [1, 0]
    # nothing masked: row 0 loses to 2 and 4 (padding column 0 with 9.0 never counts); row 1 to 4
    assert target_rank(SCORES, TARGET, None).tolist() == [2, 1]
    with pytest.raises(ValueError, match="NaN"):
        target_rank(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([1]))


def test_rank_among_candidates():
    # target .5 vs candidates .7, .5, .2 (the .7 one excluded) -> 0 optimistic, 1 pessimistic
    exclude = torch.tensor([[True, False, False]])
    assert rank_among(torch.tensor([0.5]), torch.tensor([[0.7, 0.5, 0.2]]), exclude).tolist() == [0]
    assert rank_among(torch.tensor([0.5]), torch.tensor([[0.7, 0.5, 0.2]]), None, "pessimistic").tolist() == [2]


def test_hr_ndcg():
    hr, ndcg = hr_ndcg_at_k(torch.tensor([0, 1, 9, 10]), k=10)
    assert hr.tolist() == [1, 1, 1, 0]
    # 1/log2(2) = 1, 1/log2(3) = .6309, 1/log2(11) = .2891, 0
    torch.testing.assert_close(ndcg, torch.tensor([1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0], dtype=torch.float64))


def test_auc_with_ties():
    # pairs: (.8,.4) 1, (.8,.2) 1, (.4,.4) 1/2, (.4,.2) 1, (.6,.4) 1, (.6,.2) 1 -> 5.5 / 6
    assert auc([0.8, 0.4, 0.6], [0.4, 0.2]) == pytest.approx(5.5 / 6)
    assert auc([1.0], [1.0]) == 0.5
    assert auc(np.array([0.1]), np.array([0.2, 0.3])) == 0.0
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 50).astype(float), rng.integers(0, 5, 40).astype(float)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc(pos, neg) == pytest.approx(brute)
    with pytest.raises(ValueError):
        auc([], [0.1])


def test_gauc_by_hand():
    users = ["A", "A", "A", "B", "B", "C", "D", "D", "D", "D"]
    scores = [0.9, 0.3, 0.5, 0.2, 0.6, 0.7, 0.4, 0.4, 0.1, 0.5]
    labels = [1, 0, 0, 1, 0, 1, 1, 0, 0, 1]
    # A: 1.0 (3 rows); B: 0.0 (2 rows); C: only a positive -> skipped;
    # D: pos .4 vs negs .4, .1 -> 1/2 + 1; pos .5 -> 1 + 1; 3.5 / 4 = .875 (4 rows)
    u, value, weight = per_user_auc(users, scores, labels)
    assert u.tolist() == ["A", "B", "D"]
    np.testing.assert_allclose(value, [1.0, 0.0, 0.875])
    assert weight.tolist() == [3, 2, 4]
    assert gauc(users, scores, labels) == pytest.approx((3 * 1 + 2 * 0 + 4 * 0.875) / 9)
    assert math.isnan(gauc(["C"], [0.7], [1]))


def test_pair_auc():
    # .5 vs .1, .5, .9 -> (1 + 1/2 + 0) / 3; .3 vs three .3 -> 1/2
    got = pair_auc(torch.tensor([0.5, 0.3]), torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.3, 0.3]]))
    torch.testing.assert_close(got, torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_stratum_stats_add_up_across_shards():
    stratum = torch.tensor([0, 1, 0, 0])
    rank = torch.tensor([0, 1, 20, 3])
    pos, neg = torch.tensor([0.9, 0.1, 0.5, 0.4]), torch.tensor([[0.1], [0.9], [0.5], [0.2]])
    full = StratumStats(2, k=10)
    full.add_ranks(stratum, rank)
    full.add_pairs(stratum, pos, neg)
    shards = []
    for sl in (slice(0, 1), slice(1, 4)):
        part = StratumStats(2, k=10)
        part.add_ranks(stratum[sl], rank[sl])
        part.add_pairs(stratum[sl], pos[sl], neg[sl])
        shards.append(part)
    summed = StratumStats(2, 10, shards[0].tensor + shards[1].tensor)  # = all-reduce SUM
    assert torch.equal(summed.tensor, full.tensor)
    out = summed.finalize()
    # tail = users 0, 2, 3: ranks 0, 20, 3 -> HR 2/3, NDCG (1 + 0 + 1/log2 5)/3; AUC 1, .5, 1 -> 2.5/3
    assert out["tail/count"] == 3
    assert out["tail/hr@10"] == pytest.approx(2 / 3)
    assert out["tail/ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 3)
    assert out["tail/gauc"] == pytest.approx(2.5 / 3)
    # head = user 1: rank 1 -> NDCG .6309; AUC 0
    assert out["head/ndcg@10"] == pytest.approx(1 / math.log2(3))
    assert out["head/gauc"] == 0.0
    # all: weights 2 each -> (1 + 0 + .5 + 1) / 4
    assert out["all/count"] == 4
    assert out["all/hr@10"] == pytest.approx(3 / 4)
    assert out["all/gauc"] == pytest.approx(2.5 / 4)
    assert set(StratumStats(3).finalize()) >= {"s0/count", "s2/hr@10", "all/gauc"}
    assert math.isnan(StratumStats(3).finalize()["s1/ndcg@10"])
