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
