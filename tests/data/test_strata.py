"""Strata on a hand-made activeness table, expected assignments computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ray_pinet.config_base import ConfigError
from ray_pinet.data.config import StrataConfig
from ray_pinet.data.strata import assign_strata, rank_users, strata_stats

# Index = user_idx (user-id order). Ranking by (activeness, user id) ascending:
# rank 0..9 = users 0, 7 (a=1), 4 (a=2), 2, 8 (a=3), 1, 3, 5, 9 (a=5), 6 (a=9).
A = np.array([1, 5, 3, 5, 2, 5, 9, 1, 3, 5])


def test_rank_breaks_ties_by_user_id():
    assert rank_users(A).tolist() == [0, 5, 3, 6, 2, 7, 9, 1, 4, 8]


@pytest.mark.parametrize(
    "cfg, expected",
    [
        # ceil(0.3 * 10) = 3 head users: 6 (a=9) and, of the four tied at a=5, the two larger ids 5 and 9.
        (StrataConfig(mode="top_fraction", q=0.3), [0, 0, 0, 0, 0, 1, 1, 0, 0, 1]),
        (StrataConfig(mode="top_fraction", q=0.25), [0, 0, 0, 0, 0, 1, 1, 0, 0, 1]),  # ceil(2.5) = 3
        (StrataConfig(mode="top_fraction", q=0.2), [0, 0, 0, 0, 0, 0, 1, 0, 0, 1]),
        (StrataConfig(mode="min_count", tau=5), [0, 1, 0, 1, 0, 1, 1, 0, 0, 1]),
        (StrataConfig(mode="min_count", tau=2), [0, 1, 1, 1, 1, 1, 1, 0, 1, 1]),
        # floor(rank * 3 / 10): ranks 0-3 -> 0, 4-6 -> 1, 7-9 -> 2.
        (StrataConfig(mode="quantiles", k=3), [0, 1, 0, 1, 0, 2, 2, 0, 1, 2]),
        (StrataConfig(mode="quantiles", k=2), [0, 1, 0, 1, 0, 1, 1, 0, 0, 1]),
    ],
)
def test_assignments(cfg, expected):
    strata = assign_strata(A, cfg)
    assert strata.dtype == np.int8 and strata.tolist() == expected


def test_stats_and_priors():
    cfg = StrataConfig(mode="top_fraction", q=0.3)
    stats = strata_stats(A, assign_strata(A, cfg), cfg)
    tail, head = stats["strata"]
    assert (tail["users"], tail["interactions"], head["users"], head["interactions"]) == (7, 20, 3, 19)
    assert stats["priors"]["user_share"] == pytest.approx([0.7, 0.3])
    assert stats["priors"]["interaction_share"] == pytest.approx([20 / 39, 19 / 39])
    assert (head["min_activeness"], tail["max_activeness"]) == (5, 5)
    assert stats["thresholds"]["head_users"] == 3 and stats["num_users"] == 10 and stats["num_interactions"] == 39
    q = StrataConfig(mode="quantiles", k=3)
    qs = strata_stats(A, assign_strata(A, q), q)
    assert [s["users"] for s in qs["strata"]] == [4, 3, 3]
    assert qs["thresholds"]["activeness_ranges"] == [[1, 3], [3, 5], [5, 9]]


@pytest.mark.parametrize(
    "cfg",
    [
        StrataConfig(mode="min_count", tau=10),  # no head
        StrataConfig(mode="min_count", tau=1),  # no tail
        StrataConfig(mode="top_fraction", q=0.95),  # ceil(9.5) = 10 head users: no tail
        StrataConfig(mode="quantiles", k=11),  # more buckets than users
    ],
)
def test_empty_stratum_is_a_config_error(cfg):
    with pytest.raises(ConfigError, match="empty stratum"):
        assign_strata(A, cfg)


# -- the driver's histogram path equals the all-users rule ------------------------------------
# prepare's driver never sees a per-user table: it cuts the strata from activeness histograms and
# each bucket ranks its own users from offsets (data/strata.py). Both must give exactly what the
# all-users functions give on the concatenated users, ties included.
MODES = [StrataConfig(mode="top_fraction", q=q) for q in (0.01, 0.2, 0.5)] + [
    StrataConfig(mode="min_count", tau=t) for t in (2, 4)] + [
    StrataConfig(mode="quantiles", k=k) for k in (2, 3, 5)]


@pytest.mark.parametrize("seed", range(6))
def test_bucket_ranks_and_histogram_stats_equal_the_all_users_rule(seed):
    from ray_pinet.data.strata import (first_ranks, ranks_in_bucket, stats_from_histograms,
                                       stratum_histograms, stratum_of)

    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    a = np.minimum(rng.zipf(1.8, n), 40) + int(rng.integers(0, 2))  # heavy ties at the low values
    cuts = np.sort(rng.choice(np.arange(1, n), size=int(rng.integers(0, 6)), replace=False))
    parts = np.split(a, cuts)  # buckets = contiguous runs of user_idx, some may be empty
    hists = [np.unique(p, return_counts=True) for p in parts]
    allv, total, firsts = first_ranks([h[0] for h in hists], [h[1] for h in hists])
    ranks = np.concatenate([ranks_in_bucket(p, h[0], f) for p, h, f in zip(parts, hists, firsts)])
    assert ranks.tolist() == rank_users(a).tolist()
    values, counts = np.unique(a, return_counts=True)
    assert allv.tolist() == values.tolist() and total.tolist() == counts.tolist()
    for cfg in MODES:
        try:
            expected = assign_strata(a, cfg)
        except ConfigError as exc:
            with pytest.raises(ConfigError, match="empty stratum") as got:
                stats_from_histograms(stratum_histograms(values, counts, cfg), cfg)
            assert str(got.value) == str(exc)
            continue
        assert stratum_of(a, ranks, n, cfg).tolist() == expected.tolist()
        assert stats_from_histograms(stratum_histograms(values, counts, cfg), cfg) == \
            strata_stats(a, expected, cfg)
