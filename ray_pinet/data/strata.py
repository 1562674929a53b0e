"""Activeness strata (methods.md §1.3): pure functions on the small per-user table.

Users are ranked by ``(activeness, user id)`` ascending: rank 0 is the least active user, and among
users with equal activeness the one with the larger user id counts as more active. The caller passes
arrays in user-id order (``users.parquet`` order, i.e. by ``user_idx``), so the array position is the
tie-breaker. Stratum 0 is always the least active.

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
    """Rank (0 = least active) of each user; ties broken by array position (= user id order)."""
    a = np.asarray(activeness, dtype=np.int64)
    order = np.lexsort((np.arange(len(a)), a))
    rank = np.empty(len(a), dtype=np.int64)
    rank[order] = np.arange(len(a))
    return rank


def stratum_names(cfg: StrataConfig) -> list[str]:
    return [f"q{i}" for i in range(cfg.k)] if cfg.mode == "quantiles" else ["tail", "head"]


def assign_strata(activeness: np.ndarray, cfg: StrataConfig) -> np.ndarray:
    """Stratum (int8, 0 = least active) of each user; arrays in user-id order. Empty stratum: ConfigError."""
    a = np.asarray(activeness, dtype=np.int64)
    n = len(a)
    if n == 0:
        raise ConfigError("strata: there are no users to stratify")
    if cfg.mode == "min_count":
        strata = (a >= cfg.tau).astype(np.int8)
    elif cfg.mode == "top_fraction":
        strata = (rank_users(a) >= n - math.ceil(cfg.q * n)).astype(np.int8)
    elif cfg.mode == "quantiles":
        strata = (rank_users(a) * cfg.k // n).astype(np.int8)
    else:
        raise ConfigError(f"strata.mode: unknown mode {cfg.mode!r}")
    counts = np.bincount(strata, minlength=cfg.num_strata)
    empty = [name for name, c in zip(stratum_names(cfg), counts) if c == 0]
    if empty:
        raise ConfigError(
            f"strata: empty stratum {empty} with mode={cfg.mode} ({_describe(cfg)}) over {n} users "
            f"with activeness {a.min()}..{a.max()}; change the threshold"
        )
    return strata


def _describe(cfg: StrataConfig) -> str:
    return {"top_fraction": f"q={cfg.q}", "min_count": f"tau={cfg.tau}", "quantiles": f"k={cfg.k}"}[cfg.mode]


def strata_stats(activeness: np.ndarray, strata: np.ndarray, cfg: StrataConfig) -> dict[str, Any]:
    """The ``strata.json`` content: thresholds, per-stratum counts and shares, and the two priors.

    ``interactions`` of a stratum = the sum of its users' activeness (training events).
    """
    a = np.asarray(activeness, dtype=np.int64)
    s = np.asarray(strata, dtype=np.int64)
    k = cfg.num_strata
    users = np.bincount(s, minlength=k)
    inter = np.bincount(s, weights=a, minlength=k).astype(np.int64)
    n_users, n_inter = int(users.sum()), int(inter.sum())
    per = []
    for i, name in enumerate(stratum_names(cfg)):
        ai = a[s == i]
        per.append(
            {
                "stratum": i,
                "name": name,
                "users": int(users[i]),
                "interactions": int(inter[i]),
                "user_share": users[i] / n_users,
                "interaction_share": inter[i] / n_inter if n_inter else 0.0,
                "min_activeness": int(ai.min()) if len(ai) else None,
                "max_activeness": int(ai.max()) if len(ai) else None,
                "mean_activeness": float(ai.mean()) if len(ai) else None,
            }
        )
    return {
        "mode": cfg.mode,
        "num_strata": k,
        "names": stratum_names(cfg),
        "thresholds": _thresholds(a, s, cfg),
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


def _thresholds(a: np.ndarray, s: np.ndarray, cfg: StrataConfig) -> dict[str, Any]:
    if cfg.mode == "min_count":
        return {"tau": cfg.tau, "rule": "head iff activeness >= tau"}
    if cfg.mode == "top_fraction":
        return {
            "q": cfg.q,
            "head_users": int((s == 1).sum()),
            "rule": "head = top ceil(q*U) users by (activeness, user id)",
            "min_head_activeness": int(a[s == 1].min()),
            "max_tail_activeness": int(a[s == 0].max()),
        }
    return {
        "k": cfg.k,
        "rule": "stratum = floor(rank * k / U), rank by (activeness, user id) ascending",
        "activeness_ranges": [[int(a[s == i].min()), int(a[s == i].max())] for i in range(cfg.k)],
    }


def format_strata_table(stats: dict[str, Any]) -> str:
    """A plain-text table of ``strata_stats`` output (printed by ``prepare``)."""
    head = (
        f"{'stratum':>7} {'name':<6} {'users':>10} {'user_share':>10} {'interactions':>12} "
        f"{'inter_share':>11} {'activeness':>14}"
    )
    rows = [head]
    for r in stats["strata"]:
        act = f"{r['min_activeness']}..{r['max_activeness']}"
        rows.append(
            f"{r['stratum']:>7} {r['name']:<6} {r['users']:>10,} {r['user_share']:>10.4f} "
            f"{r['interactions']:>12,} {r['interaction_share']:>11.4f} {act:>14}"
        )
    th = {k: v for k, v in stats["thresholds"].items() if k != "rule"}
    rows.append(f"mode={stats['mode']} {th}  ({stats['thresholds']['rule']})")
    return "\n".join(rows)
