"""Top-k metrics for multi-item test sets and the popularity-bias rates of AUC-NS, as per-user sums that add
up exactly across workers (methods.md §3.2, §4.2; ``studentcej/AUC_NS`` ``evaluation.py``).

Protocol, per user u with at least one test item (users without test items are skipped):
- Full ranking over items 0..I-1; ``exclude`` (the user's training items) never recommended.
  R_u = the top-k items; T_u = test items; hits = |R_u ∩ T_u|. Ties in the top-k cut are broken
  by ``torch.topk``.
- P@k = hits / k; R@k = hits / |T_u|; F1@k = 2·hits / (|T_u| + k) (as coded);
  NDCG@k = Σ_{r<k} [R_u[r] ∈ T_u] / log2(r + 2) over IDCG = Σ_{r < min(|T_u|, k)} 1 / log2(r + 2).
- Hot items: ``hot_items`` (top 15 % by popularity on the full data, ties at the threshold hot).
  OHR = |R_u ∩ hot \\ T_u| / |R_u ∩ hot|, OCR = |R_u ∩ cold \\ T_u| / |R_u ∩ cold|,
  UHR = |T_u ∩ hot \\ R_u| / |T_u ∩ hot|, UCR = |T_u ∩ cold \\ R_u| / |T_u ∩ cold|; a zero
  denominator makes the user's rate 0 (the code's ``/(x + 1e-8)``) and the user still counts.
- Every metric is the mean over users with test items.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ray_pinet.evaluation.metrics import check_not_nan

RATES = ("ohr", "ocr", "uhr", "ucr")


def hot_items(popularity: np.ndarray | torch.Tensor, hot_share: float = 0.15) -> torch.Tensor:
    """Bool[I]: items whose popularity reaches that of the item at position ⌊(1 − share)·I⌋ of
    the ascending popularity order (the AUC-NS code's rule; ties at the threshold are all hot)."""
    pop = torch.as_tensor(np.asarray(popularity), dtype=torch.float64)
    if not 0.0 < hot_share <= 1.0:
        raise ValueError(f"hot_share must be in (0, 1], got {hot_share}")
    threshold = pop.sort().values[int(pop.numel() * (1.0 - hot_share))]
    return pop >= threshold


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


def topk_user_metrics(scores: torch.Tensor, test: torch.Tensor, hot: torch.Tensor, ks: Sequence[int],
                      exclude: torch.Tensor | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """{k: {metric: Float64[B']}} for the B' rows of ``test`` (Bool[B, I]) with a test item.

    scores Float[B, I]; hot Bool[I]; exclude Bool[B, I] (training items), or None."""
    check_not_nan("scores", scores)
    keep = test.any(1)
    scores, test = scores[keep].to(torch.float64), test[keep]
    if exclude is not None:
        exclude = exclude[keep]
        if bool(((~exclude).sum(1) < max(ks)).any()):
            raise ValueError(f"a user has fewer than {max(ks)} rankable items")
        scores = scores.masked_fill(exclude, -math.inf)
    top = scores.topk(max(ks), dim=1).indices
    hit = test.gather(1, top)
    top_hot = hot[top]
    n_test = test.sum(1).to(torch.float64)
    test_hot = (test & hot).sum(1).to(torch.float64)
    discount = 1.0 / torch.log2(torch.arange(max(ks), dtype=torch.float64) + 2.0)
    ideal = torch.cat([torch.zeros(1, dtype=torch.float64), discount.cumsum(0)])
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k in ks:
        h, th = hit[:, :k], top_hot[:, :k]
        hits = h.sum(1).to(torch.float64)
        rec_hot = th.sum(1).to(torch.float64)
        hits_hot = (h & th).sum(1).to(torch.float64)
        idcg = ideal[n_test.clamp(max=k).long()]
        out[k] = {
            "p": hits / k,
            "r": hits / n_test,
            "f1": 2 * hits / (n_test + k),
            "ndcg": (h.to(torch.float64) * discount[:k]).sum(1) / idcg,
            "ohr": _ratio(rec_hot - hits_hot, rec_hot),
            "ocr": _ratio((k - rec_hot) - (hits - hits_hot), k - rec_hot),
            "uhr": _ratio(test_hot - hits_hot, test_hot),
            "ucr": _ratio((n_test - test_hot) - (hits - hits_hot), n_test - test_hot),
        }
    return out


class TopKStats:
    """Additive sums of ``topk_user_metrics`` for cut-offs ``ks``, cut-off-major:
    ``[users, p, r, f1, ndcg, ohr, ocr, uhr, ucr] × len(ks)``. All-reduce SUM ``tensor`` (or add
    the stats of shards), rebuild with ``TopKStats(ks, tensor)``, then ``finalize()``."""

    FIELDS = ("users", "p", "r", "f1", "ndcg", *RATES)

    def __init__(self, ks: Sequence[int] = (5, 10, 20), tensor: torch.Tensor | None = None) -> None:
        self.ks = tuple(int(k) for k in ks)
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive cut-offs, got {ks}")
        shape = (len(self.ks), len(self.FIELDS))
        self.tensor = torch.zeros(shape).flatten() if tensor is None else tensor
        if self.tensor.numel() != shape[0] * shape[1] or self.tensor.dim() != 1:
            raise ValueError(f"tensor must be flat with {shape[0] * shape[1]} entries, got {tuple(self.tensor.shape)}")
        self.tensor = self.tensor.to(torch.float64)

    def _table(self) -> torch.Tensor:
        """[len(ks), FIELDS] view of ``tensor``."""
        return self.tensor.view(len(self.ks), -1)

    def add(self, scores: torch.Tensor, test: torch.Tensor, hot: torch.Tensor, exclude: torch.Tensor | None = None) -> None:
        """One row per user: scores Float[B, I], test Bool[B, I], hot Bool[I], exclude Bool[B, I]."""
        per_k = topk_user_metrics(scores, test, hot, self.ks, exclude)
        table = self._table()
        for row, k in enumerate(self.ks):
            m = per_k[k]
            table[row, 0] += float(m["p"].numel())
            for col, name in enumerate(self.FIELDS[1:], start=1):
                table[row, col] += m[name].sum()

    def __add__(self, other: "TopKStats") -> "TopKStats":
        if other.ks != self.ks:
            raise ValueError("cannot add TopKStats with different cut-offs")
        return TopKStats(self.ks, self.tensor + other.tensor)

    def finalize(self) -> dict[str, float]:
        """``users`` and ``{metric}@{k}`` (means over users with test items; NaN when none)."""
        table = self._table()
        out: dict[str, float] = {"users": float(table[0, 0])}
        for row, k in enumerate(self.ks):
            n = float(table[row, 0])
            for col, name in enumerate(self.FIELDS[1:], start=1):
                out[f"{name}@{k}"] = float(table[row, col]) / n if n else math.nan
        return out
