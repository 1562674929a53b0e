"""Activeness strata (methods.md §1.3): pure functions on the small per-user table.

Users are ranked by ``(activeness, user_idx)`` ascending: rank 0 is the least active user, and among
users with equal activeness the one with the larger user_idx counts as more active. The caller passes
arrays in ``users.parquet`` order (by ``user_idx``), so the array position is the tie-breaker.
Stratum 0 is always the least active. (``prepare`` numbers users by (hash slot, user id), see
docs/design.md; before prepared-data format 2 user_idx followed the user id.)

- ``top_fraction`` (q): the ``ceil(q * U)`` highest ranks are head (stratum 1), the rest tail (0).
- ``min_count`` (tau): head iff ``activeness >= tau``.
- ``quantiles`` (k): equal-frequency buckets over the ranking, ``stratum = floor(rank * k / U)``; bucket
  sizes differ by at most one user and a bucket may hold users of equal activeness on both sides of
  its edge (activeness quantiles alone cannot split ties into equal buckets).

An empty stratum is a ``ConfigError``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ray_pinet.config_base import ConfigError
from ray_pinet.data.config import StrataConfig


def rank_users(activeness: np.ndarray) -> np.ndarray:
    """Rank (0 = least active) of each user; ties broken by array position (= user_idx order)."""
    a = np.asarray(activeness, dtype=np.int64)
    order = np.lexsort((np.arange(len(a)), a))
    rank = np.empty(len(a), dtype=np.int64)
    rank[order] = np.arange(len(a))
    return rank


def stratum_names(cfg: StrataConfig) -> list[str]:
    return [f"q{i}" for i in range(cfg.k)] if cfg.mode == "quantiles" else ["tail", "head"]


def stratum_of(activeness: np.ndarray, rank: np.ndarray | None, num_users: int,
               cfg: StrataConfig) -> np.ndarray:
    """Stratum (int8) of users with these activeness values and global ranks among ``num_users``
    users (``rank`` unused by ``min_count``). The one rule, for all users at once
    (``assign_strata``) or one bucket of them (``prepare``'s tasks, ranks from ``ranks_in_bucket``)."""
    if cfg.mode == "min_count":
        return (np.asarray(activeness) >= cfg.tau).astype(np.int8)
    if cfg.mode == "top_fraction":
        return (rank >= num_users - math.ceil(cfg.q * num_users)).astype(np.int8)
    if cfg.mode == "quantiles":
        return (rank * cfg.k // num_users).astype(np.int8)
    raise ConfigError(f"strata.mode: unknown mode {cfg.mode!r}")


def assign_strata(activeness: np.ndarray, cfg: StrataConfig) -> np.ndarray:
    """Stratum (int8, 0 = least active) of each user; arrays in user_idx order. Empty stratum: ConfigError."""
    a = np.asarray(activeness, dtype=np.int64)
    if len(a) == 0:
        raise ConfigError("strata: there are no users to stratify")
    strata = stratum_of(a, None if cfg.mode == "min_count" else rank_users(a), len(a), cfg)
    _check_nonempty(np.bincount(strata, minlength=cfg.num_strata), cfg, len(a), int(a.min()), int(a.max()))
    return strata


def _check_nonempty(users: np.ndarray, cfg: StrataConfig, n: int, lo: int, hi: int) -> None:
    empty = [name for name, c in zip(stratum_names(cfg), users) if c == 0]
    if empty:
        raise ConfigError(
            f"strata: empty stratum {empty} with mode={cfg.mode} ({_describe(cfg)}) over {n} users "
            f"with activeness {lo}..{hi}; change the threshold"
        )


def _describe(cfg: StrataConfig) -> str:
    return {"top_fraction": f"q={cfg.q}", "min_count": f"tau={cfg.tau}", "quantiles": f"k={cfg.k}"}[cfg.mode]


# The same strata from histograms, for prepare's driver (O(distinct activeness values)). prepare numbers
# users bucket by bucket (docs/design.md), so the users of one bucket are a contiguous run of user_idx. A
# user's rank is then (users of lower activeness) + (users of equal activeness in earlier buckets) + (users
# of equal activeness before it in its bucket): the driver needs each bucket's activeness histogram only.


def rank_bounds(num_users: int, cfg: StrataConfig) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranks of each stratum under ``stratum_of`` (rank-based modes)."""
    n = num_users
    if cfg.mode == "top_fraction":
        h = math.ceil(cfg.q * n)
        return [(0, n - h), (n - h, n)]
    # rank * k // n == i  <=>  ceil(i n / k) <= rank < ceil((i + 1) n / k)
    return [(-(-i * n // cfg.k), -(-(i + 1) * n // cfg.k)) for i in range(cfg.k)]


def stratum_histograms(values: np.ndarray, counts: np.ndarray,
                       cfg: StrataConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each stratum's activeness histogram ``(values, counts)`` from all users' histogram
    (``values`` ascending, distinct), under the rule of ``stratum_of``: a stratum's rank interval
    takes the users of each activeness value that fall in it."""
    v, c = np.asarray(values, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    if cfg.mode == "min_count":
        return [(v[m], c[m]) for m in (v < cfg.tau, v >= cfg.tau)]
    end = np.cumsum(c)
    start = end - c
    out = []
    for lo, hi in rank_bounds(int(c.sum()), cfg):
        take = np.clip(np.minimum(hi, end) - np.maximum(lo, start), 0, None)
        out.append((v[take > 0], take[take > 0]))
    return out


def first_ranks(values: list[np.ndarray],
                counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """For buckets in user_idx order, each with its activeness histogram (``values[b]`` ascending,
    ``counts[b]``): all users' histogram ``(values, counts)`` and, per bucket, the global rank of
    the first user of each of bucket b's values."""
    allv = np.unique(np.concatenate(values)) if values else np.zeros(0, np.int64)
    per_bucket = np.zeros((len(values), len(allv)), dtype=np.int64)
    for b, (v, c) in enumerate(zip(values, counts)):
        per_bucket[b, np.searchsorted(allv, v)] = c
    total = per_bucket.sum(axis=0)
    earlier = np.cumsum(per_bucket, axis=0) - per_bucket  # equal activeness, earlier buckets
    first = (np.cumsum(total) - total) + earlier  # + lower activeness, all buckets
    return allv, total, [first[b, np.searchsorted(allv, v)] for b, v in enumerate(values)]


def ranks_in_bucket(activeness: np.ndarray, values: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Global ranks of one bucket's users (in user_idx order) from ``first_ranks``' row of the bucket."""
    a = np.asarray(activeness, dtype=np.int64)
    order = np.lexsort((np.arange(len(a)), a))
    sa = a[order]
    group_start = np.flatnonzero(np.r_[True, sa[1:] != sa[:-1]]) if len(sa) else np.zeros(0, np.int64)
    within = np.arange(len(a)) - np.repeat(group_start, np.diff(np.r_[group_start, len(a)]))
    rank = np.empty(len(a), dtype=np.int64)
    rank[order] = first[np.searchsorted(values, sa)] + within
    return rank


def strata_stats(activeness: np.ndarray, strata: np.ndarray, cfg: StrataConfig) -> dict[str, Any]:
    """The ``strata.json`` content of users with these activeness values and strata."""
    a, s = np.asarray(activeness, dtype=np.int64), np.asarray(strata, dtype=np.int64)
    hists = [np.unique(a[s == i], return_counts=True) for i in range(cfg.num_strata)]
    return stats_from_histograms(hists, cfg)


def stats_from_histograms(hists: list[tuple[np.ndarray, np.ndarray]], cfg: StrataConfig) -> dict[str, Any]:
    """The ``strata.json`` content from each stratum's activeness histogram: thresholds,
    per-stratum counts and shares, and the two priors. ConfigError when a stratum is empty.

    ``interactions`` of a stratum = the sum of its users' activeness (training events).
    """
    users = np.array([int(c.sum()) for _, c in hists], dtype=np.int64)
    inter = np.array([int((v * c).sum()) for v, c in hists], dtype=np.int64)
    n_users, n_inter = int(users.sum()), int(inter.sum())
    if n_users == 0:
        raise ConfigError("strata: there are no users to stratify")
    nonempty = [v for v, _ in hists if len(v)]
    _check_nonempty(users, cfg, n_users, min(int(v[0]) for v in nonempty), max(int(v[-1]) for v in nonempty))
    per = []
    for i, name in enumerate(stratum_names(cfg)):
        v = hists[i][0]
        per.append(
            {
                "stratum": i,
                "name": name,
                "users": int(users[i]),
                "interactions": int(inter[i]),
                "user_share": users[i] / n_users,
                "interaction_share": inter[i] / n_inter if n_inter else 0.0,
                "min_activeness": int(v[0]),
                "max_activeness": int(v[-1]),
                "mean_activeness": float(inter[i] / users[i]),
            }
        )
    return {
        "mode": cfg.mode,
        "num_strata": cfg.num_strata,
        "names": stratum_names(cfg),
        "thresholds": _thresholds(per, cfg),
        "num_users": n_users,
        "num_interactions": n_inter,
        "strata": per,
        "priors": priors(users, inter),
    }


def priors(users_per_stratum, interactions_per_stratum) -> dict[str, list[float]]:
    """``user_share`` (pi_s = |U_s|/|U|) and ``interaction_share`` (pi_s = N_s/N) priors."""
    u = np.asarray(users_per_stratum, dtype=np.float64)
    n = np.asarray(interactions_per_stratum, dtype=np.float64)
    return {
        "user_share": (u / u.sum()).tolist(),
        "interaction_share": (n / n.sum()).tolist() if n.sum() else [0.0] * len(n),
    }


def _thresholds(per: list[dict], cfg: StrataConfig) -> dict[str, Any]:
    if cfg.mode == "min_count":
        return {"tau": cfg.tau, "rule": "head iff activeness >= tau"}
    if cfg.mode == "top_fraction":
        return {
            "q": cfg.q,
            "head_users": per[1]["users"],
            "rule": "head = top ceil(q*U) users by (activeness, user_idx)",
            "min_head_activeness": per[1]["min_activeness"],
            "max_tail_activeness": per[0]["max_activeness"],
        }
    return {
        "k": cfg.k,
        "rule": "stratum = floor(rank * k / U), rank by (activeness, user_idx) ascending",
        "activeness_ranges": [[p["min_activeness"], p["max_activeness"]] for p in per],
    }


def format_strata_table(stats: dict[str, Any]) -> str:
    """A plain-text table of ``strata_stats`` output (printed by ``prepare``)."""
    rows = [f"{'stratum':>7} {'name':<6} {'users':>10} {'user_share':>10} {'interactions':>12} "
            f"{'inter_share':>11} {'activeness':>14}"]
    for r in stats["strata"]:
        act = f"{r['min_activeness']}..{r['max_activeness']}"
        rows.append(f"{r['stratum']:>7} {r['name']:<6} {r['users']:>10,} {r['user_share']:>10.4f} "
                    f"{r['interactions']:>12,} {r['interaction_share']:>11.4f} {act:>14}")
    th = {k: v for k, v in stats["thresholds"].items() if k != "rule"}
    rows.append(f"mode={stats['mode']} {th}  ({stats['thresholds']['rule']})")
    return "\n".join(rows)
