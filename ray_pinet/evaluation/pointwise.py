"""Pointwise metrics of labeled (user, item, label) test rows, as in the Inverse Learning code's
``evaluate.py`` (methods.md §5.5), in forms that add up across workers that hold whole users.

* **AUC** over all rows of a slice: not additive, so the (score, label) rows are gathered first.
* **wauc** (the code's name): the unweighted mean over users with both labels of the user's AUC.
* **NDCG@K** within each user's rows: rows ranked by score, gain 2^y − 1 (= y for 0/1 labels),
  IDCG from the labels sorted; users with at least one positive row count.
* **BCE**: the mean binary cross-entropy of the rows (model selection: lowest on validation).

``user_sums`` gives per-user additive sums; ``finalize`` turns the all-reduced sums into means.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ray_pinet.evaluation.metrics import per_user_auc


def user_sums(users: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Float64[3 + 2·len(ks)... ]: [rows, Σ bce, wauc users, Σ wauc, ndcg users, Σ ndcg@k for k in ks]."""
    u = users.numpy()
    s = scores.detach().double().numpy()
    y = labels.numpy().astype(np.float64)
    out = np.zeros(5 + len(ks))
    out[0] = len(u)
    if len(u) == 0:
        return torch.from_numpy(out)
    out[1] = float(F.binary_cross_entropy_with_logits(scores.detach().double(), labels.double(), reduction="sum"))
    _, auc_u, _ = per_user_auc(u, s, y)
    out[2], out[3] = len(auc_u), float(np.sum(auc_u))
    order = np.lexsort((-s, u))  # by user, then score descending
    us, ys = u[order], y[order]
    start = np.r_[0, np.flatnonzero(us[1:] != us[:-1]) + 1]
    rank = np.arange(len(us)) - np.repeat(start, np.diff(np.r_[start, len(us)]))
    ideal = np.lexsort((-y, u))  # same users, labels descending
    gain, ideal_gain = 2.0 ** ys - 1, 2.0 ** y[ideal] - 1
    has_pos = np.add.reduceat(ys, start) > 0
    out[4] = int(has_pos.sum())
    disc = 1.0 / np.log2(rank + 2.0)
    for j, k in enumerate(ks):
        top = rank < k
        dcg = np.add.reduceat(gain * disc * top, start)
        idcg = np.add.reduceat(ideal_gain * disc * top, start)
        out[5 + j] = float(np.sum(dcg[has_pos] / idcg[has_pos]))
    return torch.from_numpy(out)


def finalize(sums: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    s = sums.tolist()

    def ratio(a: float, b: float) -> float:
        return a / b if b else math.nan

    out = {"rows": s[0], "bce": ratio(s[1], s[0]), "wauc": ratio(s[3], s[2]), "users": s[4]}
    out.update({f"ndcg@{k}": ratio(s[5 + j], s[4]) for j, k in enumerate(ks)})
    return out


def global_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC of all rows (ties 1/2); NaN without both labels."""
    pos, neg = scores[labels > 0], scores[labels == 0]
    if pos.size == 0 or neg.size == 0:
        return math.nan
    _, value, _ = per_user_auc(np.zeros(len(scores), dtype=np.int64), scores.astype(np.float64),
                                labels.astype(np.float64))
    return float(value[0])
