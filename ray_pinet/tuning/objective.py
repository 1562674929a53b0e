"""The sweep objective: a trial's validation metric on one stratum, guarded on the others, both
measured against a reference joint model *on the same users*.

Why per-user reference outcomes: a trial with another head/tail threshold has another tail population, so
"tail NDCG" of two trials, or of a trial and a joint run evaluated with the base threshold, describe different
users. The reference joint model is evaluated once, per user (``user_outcomes``); each trial regroups those
outcomes by its own stratification and gets the reference's exact per-stratum metrics for its own strata
(``reference_metrics``), then scores itself against them (``Objective.score``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from ray_pinet.data.prepared import read_split
from ray_pinet.evaluation.protocol import (
    metric_key,
    outcome_metrics,
    slice_names,
    stratum_name,
    user_outcomes,
)
from ray_pinet.training.batches import EvalRows
from ray_pinet.training.checkpoint import load_state
from ray_pinet.training.sequence_outputs import rebuild_model
from ray_pinet.tuning.space import ObjectiveSpec

# Added to an infeasible trial's objective so that every feasible trial ranks above it (for ASHA
# and the searcher as for the final choice, which skips infeasible trials altogether).
GUARD_PENALTY = 10.0


def checkpoint_outcomes(checkpoint_dir: str, split: str = "valid") -> pd.DataFrame:
    """Per-user outcomes of a finished run's model on ``split`` of the data it was trained on:
    columns user_id, hit, ndcg, pos, neg (one process, on the caller)."""
    model, cfg, _ = rebuild_model(load_state(checkpoint_dir))
    path = Path(cfg.data.path)
    table = read_split(path, split).sort_by("sample_id")
    rows = EvalRows(table, cfg.model.max_len)
    out = user_outcomes(model, rows, cfg.eval.k, cfg.eval.batch_size, cfg.eval.candidates > 0)
    users = pq.read_table(path / "users.parquet", columns=["user_idx", "user_id"]).to_pandas()
    ids = users.set_index("user_idx")["user_id"]
    df = pd.DataFrame({name: out[name].numpy() for name in ("hit", "ndcg", "pos", "neg")})
    df.insert(0, "user_id", ids.loc[table.column("user_idx").to_numpy()].to_numpy())
    return df


def reference_metrics(outcomes: pd.DataFrame, users: pd.DataFrame, num_strata: int, k: int,
                      where: str = "reference") -> dict[str, float]:
    """The reference's metrics ``{"<slice>/<metric>": v}`` under a stratification ``users``
    (columns user_id, stratum). Every reference user must have a stratum."""
    strata = users.set_index("user_id")["stratum"]
    missing = ~outcomes["user_id"].isin(strata.index)
    if missing.any():
        first = outcomes.loc[missing, "user_id"].iloc[0]
        raise ValueError(f"{where}: {int(missing.sum())} evaluated users have no stratum in this "
                         f"trial's users.parquet (first: user_id={first!r}); trials must keep the "
                         "reference's users")
    s = torch.as_tensor(strata.loc[outcomes["user_id"]].to_numpy().astype(np.int64))
    out = {c: torch.tensor(outcomes[c].to_numpy(), dtype=torch.float64) for c in ("hit", "ndcg", "pos", "neg")}
    return outcome_metrics(out, s, num_strata, k)


@dataclass
class Objective:
    spec: ObjectiveSpec
    reference: dict[str, float]  # reference metrics under the trial's strata (reference_metrics)
    num_strata: int
    k: int

    @property
    def slice(self) -> str:
        """The objective's stratum name under this stratification: "tail" / "head" also name the
        least / most active bucket of K > 2 (s0 / s{K-1})."""
        K = self.num_strata
        alias = {"tail": stratum_name(0, K), "head": stratum_name(K - 1, K)}
        return alias.get(self.spec.slice, self.spec.slice)

    def guarded(self) -> list[str]:
        return [s for s in slice_names(self.num_strata) if s not in ("all", self.slice)]

    def check(self) -> None:
        names = slice_names(self.num_strata)
        if self.slice not in names or self.slice == "all":
            raise ValueError(f"objective.slice={self.spec.slice!r}: this stratification has strata {names[:-1]}")

    def score(self, metrics: dict[str, float], prefix: str) -> Optional[dict[str, float]]:
        """Objective fields for a report whose validation metrics carry ``prefix`` (val,
        final_val); None when the report holds none."""
        key = metric_key(self.slice, self.spec.metric, self.k)
        value = metrics.get(f"{prefix}/{key}")
        if value is None:
            return None
        ref = self.reference.get(key)
        if self.spec.measure == "lift":
            value = value / ref - 1.0 if ref else 0.0
        shortfall = 0.0  # worst relative shortfall below the guard line, over guarded strata
        for s in self.guarded():
            gk = metric_key(s, self.spec.metric, self.k)
            m, r = metrics.get(f"{prefix}/{gk}"), self.reference.get(gk)
            if m is None or not r:
                continue
            shortfall = max(shortfall, (r * (1.0 - self.spec.guard_tolerance) - m) / r)
        feasible = shortfall <= 0.0
        return {
            "objective": value if feasible else value - GUARD_PENALTY - shortfall,
            "objective_value": value,
            "feasible": float(feasible),
            "guard_shortfall": max(shortfall, 0.0),
        }
