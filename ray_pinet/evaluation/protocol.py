"""Per-stratum evaluation over the whole evaluation set, exact across workers.

Protocol (docs/design.md): leave-one-out, one row per user. HR@k / NDCG@k rank the target
against the full catalogue with the user's earlier items masked (or against the prepared sampled
candidates when ``candidates > 0``). AUC / GAUC compare the target with one sampled negative.

Cross-worker exactness: HR, NDCG and GAUC are sums over users, so each rank all-reduces
[count, hr_sum, ndcg_sum, gauc_sum] per stratum (float64) and the means are taken after the
reduction; AUC is not a sum, so the (positive, negative) scores are gathered and AUC is computed
on all of them. Never an average of per-worker averages.

Devices: each chunk of ``batch_size`` rows is moved to the model's device, where the full
catalogue is scored, the history masked and the rank counted; the per-row outcomes and the
float64 sums stay there until ``finalize`` reads them once. Scores are fp32 even in a bf16 run
(bf16 scores of 10^4 items tie often, and ties favour the target).
"""

from __future__ import annotations

from typing import Optional

import torch

from ray_pinet.evaluation.metrics import auc as auc_fn
from ray_pinet.evaluation.metrics import hr_ndcg_at_k
from ray_pinet.training.batches import EvalRows
from ray_pinet.training.collectives import all_gather_rows, all_reduce_sum_

STATS = ("count", "hr", "ndcg", "gauc")


def stratum_name(s: int, num_strata: int) -> str:
    if num_strata == 2:
        return ("tail", "head")[s]
    return f"s{s}"


def slice_names(num_strata: int) -> list[str]:
    return [stratum_name(s, num_strata) for s in range(num_strata)] + ["all"]


def slice_table(final: dict[str, float], num_strata: int, cols: list[str], prefix: str,
                headers: Optional[list[str]] = None) -> str:
    """``final[prefix/slice/col]`` as a Markdown table, a row per slice (both kinds' tables)."""
    lines = ["| slice | " + " | ".join(headers or cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in slice_names(num_strata):
        vals = []
        for c in cols:
            v = final.get(f"{prefix}/{s}/{c}")
            vals.append("-" if v is None else (f"{int(v)}" if c == "users" else f"{v:.4f}"))
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def mask_seen_(scores: torch.Tensor, seen_rows: torch.Tensor, seen_items: torch.Tensor) -> torch.Tensor:
    """Scores [B, M+1] with the padding column and each row's seen items at -inf (in place):
    what evaluation ranks over, and what ``ray-pinet recommend`` recommends from."""
    scores[:, 0] = -torch.inf
    scores[seen_rows, seen_items] = -torch.inf
    return scores


@torch.no_grad()
def batch_ranks(model, batch, k: int, use_candidates: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rank of target, target score, negative score) for one EvalBatch, last position."""
    stratum = batch.stratum
    if use_candidates:
        if batch.candidates is None:
            raise ValueError("eval.candidates > 0 but the prepared data has no 'candidates' column")
        items = torch.cat([batch.target[:, None], batch.neg[:, None], batch.candidates], dim=1)
        scores = model.predict(batch.history, stratum, items)
        target_score, neg_score = scores[:, 0], scores[:, 1]
        rank = (scores[:, 2:] > target_score[:, None]).sum(dim=1)
        return rank, target_score, neg_score
    scores = model.predict(batch.history, stratum, None).clone()  # [B, M+1]
    rows = torch.arange(len(batch), device=scores.device)
    target_score = scores[rows, batch.target].clone()
    neg_score = scores[rows, batch.neg].clone()
    mask_seen_(scores, batch.seen_rows, batch.seen_items)
    scores[rows, batch.target] = target_score  # the target is never masked
    # Only strictly higher scores count, so ties favour the target ("optimistic", as
    # metrics.target_rank's default); exact float ties among 10^4 learned scores are rare.
    rank = (scores > target_score[:, None]).sum(dim=1)
    return rank, target_score, neg_score


@torch.no_grad()
def user_outcomes(model, rows: EvalRows, k: int = 10, batch_size: int = 256,
                  candidates: bool = False) -> dict[str, torch.Tensor]:
    """Per-row outcomes of one rank's evaluation rows, in row order: hit@k and NDCG@k
    (Float64), the target's and the sampled negative's scores (Float64), the stratum and the
    global sample id (Long; rows of all ranks sorted by it are the same for every W).
    Every metric of ``finalize`` is a function of these, so any regrouping of users (another
    stratification, ``tuning/objective.py``) gives exactly what ``evaluate`` would."""
    was_training = model.training
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # a model without parameters scores on the CPU
    parts: dict[str, list] = {"hit": [], "ndcg": [], "pos": [], "neg": [], "stratum": []}
    for batch in rows.batches(batch_size):
        rank, pos, neg = batch_ranks(model, batch.to(device), k, candidates)
        hit, ndcg = hr_ndcg_at_k(rank, k)
        for name, v in (("hit", hit), ("ndcg", ndcg), ("pos", pos.to(torch.float64)),
                        ("neg", neg.to(torch.float64)), ("stratum", batch.stratum.to(device))):
            parts[name].append(v)
    model.train(was_training)
    out = {name: torch.cat(v) if v else torch.zeros(0, dtype=torch.int64 if name == "stratum" else torch.float64,
                                                  device=device)
           for name, v in parts.items()}
    out["sample_id"] = rows.sample_id.to(device)
    return out


def local_stats(out: dict[str, torch.Tensor], stratum: torch.Tensor, num_strata: int):
    """([K, len(STATS)] sums, [n, 3] (pos, neg, stratum) rows) of per-row outcomes grouped by
    ``stratum``: the additive part and the gathered part of ``finalize``'s input."""
    stats = torch.zeros(num_strata, len(STATS), dtype=torch.float64, device=out["hit"].device)
    pos, neg = out["pos"], out["neg"]
    gauc = (pos > neg).to(torch.float64) + 0.5 * (pos == neg).to(torch.float64)
    for col, v in ((0, torch.ones_like(out["hit"])), (1, out["hit"]), (2, out["ndcg"]), (3, gauc)):
        stats[:, col].index_add_(0, stratum, v)
    return stats, torch.stack([pos, neg, stratum.to(torch.float64)], dim=1)


def outcome_metrics(out: dict[str, torch.Tensor], stratum: torch.Tensor, num_strata: int, k: int) -> dict[str, float]:
    """``evaluate``'s metrics from one process's per-row outcomes, grouped by ``stratum`` (no
    collectives: all rows are here)."""
    stats, rows = local_stats(out, stratum, num_strata)
    return finalize(stats, rows, num_strata, k)


@torch.no_grad()
def evaluate(model, rows: EvalRows, num_strata: int, k: int = 10, batch_size: int = 256,
             candidates: bool = False) -> dict[str, float]:
    """Metrics ``{"<slice>/<metric>": value}`` for every stratum and "all". Collective."""
    out = user_outcomes(model, rows, k, batch_size, candidates)
    stats, local = local_stats(out, out["stratum"], num_strata)
    all_reduce_sum_(stats)
    gathered = all_gather_rows(local)
    return finalize(stats, gathered, num_strata, k)


def finalize(stats: torch.Tensor, scores: torch.Tensor, num_strata: int, k: int) -> dict[str, float]:
    stats, scores = stats.cpu(), scores.cpu()  # the evaluation's one read from the device
    out: dict[str, float] = {}
    names = slice_names(num_strata)
    for i, name in enumerate(names):
        if name == "all":
            row = stats.sum(dim=0)
            sel = torch.ones(scores.shape[0], dtype=torch.bool)
        else:
            row = stats[i]
            sel = scores[:, 2] == i
        n = float(row[0])
        out[f"{name}/users"] = n
        if n == 0:
            continue
        out[f"{name}/hr@{k}"] = float(row[1]) / n
        out[f"{name}/ndcg@{k}"] = float(row[2]) / n
        out[f"{name}/gauc"] = float(row[3]) / n
        out[f"{name}/auc"] = float(auc_fn(scores[sel, 0], scores[sel, 1]))
    return out


def metric_key(slice_name: str, metric: str, k: int) -> str:
    return f"{slice_name}/{metric}@{k}" if metric in ("hr", "ndcg") else f"{slice_name}/{metric}"
