"""Ranking and CTR metrics as pure functions, plus per-stratum sufficient statistics that add up
exactly across workers.

Conventions (documented choices):
- **Rank** of the target = number of competing items scoring *strictly higher* (0 = top). Ties go
  in the target's favour ("optimistic", the count-strictly-greater rule used by SASRec-style
  evaluation); ``ties="pessimistic"`` counts equal scores as higher instead. Report both if a model
  may emit many equal scores: optimistic ranking rewards a constant scorer. NaN scores are an error.
- Full-catalogue competitors: items 1..M except the user's seen items; padding 0 never competes;
  the target itself is never masked, even when it is in the seen list.
- **HR@k** = [rank < k]; **NDCG@k** = 1/log2(rank + 2) if rank < k else 0 (one relevant item).
- **AUC**: exact Mann-Whitney statistic, a (pos, neg) tie counts 1/2; O(n log n).
- **GAUC**: Σ_u w_u AUC_u / Σ_u w_u with w_u = the user's number of impressions (rows, positives and
  negatives); users with only positives or only negatives are skipped (AUC undefined).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch


def check_not_nan(name: str, x: torch.Tensor) -> None:
    if bool(torch.isnan(x).any()):
        raise ValueError(f"{name} contains NaN: ranks would be meaningless")


def rank_among(target_score: torch.Tensor, scores: torch.Tensor, exclude: torch.Tensor | None = None,
               ties: Literal["optimistic", "pessimistic"] = "optimistic") -> torch.Tensor:
    """Long[B]: how many of scores[b, :] (not excluded) beat target_score[b] (see module doc)."""
    check_not_nan("scores", scores)
    check_not_nan("target_score", target_score)
    t = target_score.unsqueeze(1)
    if ties == "optimistic":
        beats = scores > t
    elif ties == "pessimistic":
        beats = scores >= t
    else:
        raise ValueError(f"ties must be 'optimistic' or 'pessimistic', got {ties!r}")
    if exclude is not None:
        beats &= ~exclude
    return beats.sum(1)


def seen_mask(seen: Sequence[Sequence[int]], num_columns: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool[B, M+1] from per-user lists of seen item indices."""
    rows = [i for i, items in enumerate(seen) for _ in items]
    cols = [int(j) for items in seen for j in items]
    mask = torch.zeros(len(seen), num_columns, dtype=torch.bool, device=device)
    mask[torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device)] = True
    return mask


def target_rank(scores: torch.Tensor, target: torch.Tensor,
                seen: torch.Tensor | Sequence[Sequence[int]] | None = None,
                ties: Literal["optimistic", "pessimistic"] = "optimistic") -> torch.Tensor:
    """Long[B]: full-catalogue rank of target[b] among items 1..M minus seen items (module doc).

    scores Float[B, M+1] (column 0 = padding, ignored); seen Bool[B, M+1] or per-row item lists."""
    b, width = scores.shape
    if seen is None:
        exclude = torch.zeros(b, width, dtype=torch.bool, device=scores.device)
    elif isinstance(seen, torch.Tensor):
        exclude = seen.to(torch.bool).clone()
    else:
        exclude = seen_mask(seen, width, scores.device)
    exclude[:, 0] = True
    rows = torch.arange(b, device=scores.device)
    exclude[rows, target] = True  # the target is not its own competitor
    return rank_among(scores[rows, target], scores, exclude, ties)


def hr_ndcg_at_k(rank: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(HR Float64[B], NDCG Float64[B]) at cut-off k from 0-based ranks."""
    r = rank.to(torch.float64)
    hit = r < k
    ndcg = torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))
    return hit.to(torch.float64), ndcg


def per_user_auc(
    users: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user ids, AUC_u, impressions_u) for every user with both a positive and a negative row.

    Vectorised rank statistic: within each user, tied scores share their average rank; then
    AUC_u = (Σ positive ranks − P(P+1)/2) / (P·N)."""
    u = np.asarray(users)
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(np.float64)
    if not (u.shape == s.shape == y.shape) or u.ndim != 1:
        raise ValueError(f"users, scores, labels must be 1-D of one length, got {u.shape}, {s.shape}, {y.shape}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if u.size == 0:
        return u, np.zeros(0), np.zeros(0)
    order = np.lexsort((s, u))
    u, s, y = u[order], s[order], y[order]
    new_user = np.r_[True, u[1:] != u[:-1]]
    new_group = new_user | np.r_[True, s[1:] != s[:-1]]
    user_idx = np.cumsum(new_user) - 1
    rank_in_user = np.arange(u.size) - np.flatnonzero(new_user)[user_idx] + 1.0
    group_idx = np.cumsum(new_group) - 1
    rank = (np.bincount(group_idx, weights=rank_in_user) / np.bincount(group_idx))[group_idx]
    n_pos = np.bincount(user_idx, weights=y)
    n_all = np.bincount(user_idx).astype(np.float64)
    n_neg = n_all - n_pos
    pos_rank_sum = np.bincount(user_idx, weights=rank * y)
    keep = (n_pos > 0) & (n_neg > 0)
    auc_u = (pos_rank_sum[keep] - n_pos[keep] * (n_pos[keep] + 1) / 2) / (n_pos[keep] * n_neg[keep])
    return u[new_user][keep], auc_u, n_all[keep]


def auc(pos_scores: np.ndarray | Sequence[float], neg_scores: np.ndarray | Sequence[float]) -> float:
    """Exact AUC of positives vs negatives (ties 1/2). Not additive: gather scores before calling."""
    pos = np.asarray(pos_scores, dtype=np.float64).ravel()
    neg = np.asarray(neg_scores, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"AUC needs positives and negatives, got {pos.size} and {neg.size}")
    labels = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    _, value, _ = per_user_auc(np.zeros(labels.size, dtype=np.int64), np.r_[pos, neg], labels)
    return float(value[0])


def gauc(users: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[int]) -> float:
    """Impression-weighted mean of per-user AUC (module doc); NaN when no user has both classes."""
    _, value, weight = per_user_auc(users, scores, labels)
    return float((value * weight).sum() / weight.sum()) if weight.size else math.nan


def pair_auc(pos_score: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Float64[B]: per-user AUC of one positive pos_score[b] against neg_scores[b, :] (ties 1/2)."""
    check_not_nan("scores", neg_scores)
    check_not_nan("scores", pos_score)
    p = pos_score.to(torch.float64).unsqueeze(1)
    n = neg_scores.to(torch.float64)
    return ((p > n).to(torch.float64) + 0.5 * (p == n).to(torch.float64)).mean(1)


class StratumStats:
    """Additive per-stratum sums in one flat Float64 tensor, stratum-major:
    ``[count, hr_sum, ndcg_sum, gauc_num, gauc_den] × K``. All-reduce SUM ``tensor`` (or add the
    tensors of shards), rebuild with ``StratumStats(K, k, tensor)``, then ``finalize()``."""

    FIELDS = ("count", "hr_sum", "ndcg_sum", "gauc_num", "gauc_den")

    def __init__(self, num_strata: int, k: int = 10, tensor: torch.Tensor | None = None) -> None:
        self.num_strata = num_strata
        self.k = k
        size = num_strata * len(self.FIELDS)
        if tensor is None:
            tensor = torch.zeros(size, dtype=torch.float64)
        if tensor.shape != (size,):
            raise ValueError(f"tensor must have shape [{size}], got {tuple(tensor.shape)}")
        self.tensor = tensor.to(torch.float64)

    def _table(self) -> torch.Tensor:
        return self.tensor.view(self.num_strata, len(self.FIELDS))

    def _add(self, stratum: torch.Tensor, column: int, values: torch.Tensor) -> None:
        s = stratum.long().cpu()
        table = self._table()
        table[:, column] += torch.zeros(self.num_strata, dtype=torch.float64).index_add(
            0, s, values.detach().to(torch.float64).cpu()
        )

    def add_ranks(self, stratum: torch.Tensor, rank: torch.Tensor) -> None:
        """One evaluated user per row: count, HR@k and NDCG@k sums."""
        hr, ndcg = hr_ndcg_at_k(rank, self.k)
        self._add(stratum, 0, torch.ones_like(hr))
        self._add(stratum, 1, hr)
        self._add(stratum, 2, ndcg)

    def add_user_auc(self, stratum: torch.Tensor, user_auc: torch.Tensor, weight: torch.Tensor) -> None:
        """GAUC terms of users (one row each) with both classes: Σ w·AUC and Σ w."""
        w = weight.to(torch.float64)
        self._add(stratum, 3, w * user_auc.to(torch.float64))
        self._add(stratum, 4, w)

    def add_pairs(self, stratum: torch.Tensor, pos_score: torch.Tensor, neg_scores: torch.Tensor) -> None:
        """GAUC terms when each user has one positive and n negatives (weight 1 + n)."""
        weight = torch.full((pos_score.shape[0],), 1.0 + neg_scores.shape[1], dtype=torch.float64)
        self.add_user_auc(stratum, pair_auc(pos_score, neg_scores), weight)

    def __add__(self, other: "StratumStats") -> "StratumStats":
        if (other.num_strata, other.k) != (self.num_strata, self.k):
            raise ValueError("cannot add StratumStats with different num_strata or k")
        return StratumStats(self.num_strata, self.k, self.tensor + other.tensor)

    def finalize(self, names: Sequence[str] | None = None) -> dict[str, float]:
        """``{group}/count``, ``/hr@k``, ``/ndcg@k``, ``/gauc`` for every stratum and ``all``;
        NaN for an empty group."""
        if names is None:
            names = ["tail", "head"] if self.num_strata == 2 else [f"s{i}" for i in range(self.num_strata)]
        if len(names) != self.num_strata:
            raise ValueError(f"need {self.num_strata} names, got {list(names)}")
        table = self._table()
        out: dict[str, float] = {}
        for name, row in [*zip(names, table), ("all", table.sum(0))]:
            count, hr, ndcg, num, den = (float(v) for v in row)
            out[f"{name}/count"] = count
            out[f"{name}/hr@{self.k}"] = hr / count if count else math.nan
            out[f"{name}/ndcg@{self.k}"] = ndcg / count if count else math.nan
            out[f"{name}/gauc"] = num / den if den else math.nan
        return out
