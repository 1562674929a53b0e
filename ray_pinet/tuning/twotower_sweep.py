"""The two-tower kind's sweep (``ray-pinet tune`` on onebp, twobp, bpr, ncf): trials each ``fit`` (Ray Train),
with ASHA on a validation metric.

The same ``sweep.run_sweep`` as the sequence kind (space file format, search algorithms, ASHA, resume and
MLflow layout), with two differences, both because pair data has no leave-one-out reference model to regroup:
the objective is ``measure: absolute`` (the validation metric of ``objective.slice``: ``ndcg`` → NDCG@10, or
``auc`` for ``ncf``), and there is no guard and no model registry (two-tower runs log no served model). A
finished trial's objective is its best validation value (the epoch its test metrics are reported at).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from ray_pinet.config_base import ConfigError
from ray_pinet.tuning.report import status
from ray_pinet.tuning.space import TuneSpace, decode_values, extreme_values, split_overrides
from ray_pinet.tuning.trials import SweepKind, SweepSetup, fit_trial, run_overrides, start_trial
from ray_pinet.twotower_config import TwoTowerConfig

TWOTOWER_OBJECTIVES = ("ndcg", "auc")  # NDCG@10 (every method); AUC of labeled rows (ncf)


def objective_key(space: TuneSpace) -> str:
    metric = space.objective.metric
    return f"valid/{space.objective.slice}/{'ndcg@10' if metric == 'ndcg' else metric}"


def check_space(space: TuneSpace, config: Optional[str], overrides: list[str]) -> None:
    """Every key and end value resolves into a valid TwoTowerConfig; the objective fits pairs."""
    if space.objective.measure != "absolute":
        raise ConfigError("two-tower sweeps optimise objective.measure: absolute (no reference model)")
    if space.objective.metric not in TWOTOWER_OBJECTIVES:
        raise ConfigError(f"objective.metric for two-tower methods must be one of {TWOTOWER_OBJECTIVES}")
    for key in list(space.fixed) + list(space.space):
        if key in ("model.method", "data.output", "run.name", "run.storage_path", "run.seed") or key.startswith("prepare."):
            raise ConfigError(f"space/fixed key {key!r} is set by the sweep itself (or is not a twotower key)")
    for key, dom in space.space.items():
        for v in extreme_values(dom):
            trial_config(config, overrides, {**space.fixed, key: v}, space.method, [])
    cfg = trial_config(config, overrides, dict(space.fixed), space.method, [])
    if cfg.data.valid_share == 0:
        raise ConfigError("a two-tower sweep selects on validation: set data.valid_share > 0")


def trial_config(config: Optional[str], overrides: list[str], values: dict[str, Any], method: str, extra: list[str]):
    train_o, prep_o = split_overrides(values)
    if prep_o:
        raise ConfigError("two-tower sweeps vary data.* keys, not prepare.* (pair data has no prepare config)")
    return TwoTowerConfig.from_yaml(config, overrides + train_o + [f"model.method={method}"] + extra)


def twotower_trial_fn(config: dict[str, Any], setup: SweepSetup) -> None:
    from ray import tune

    trial_id, tags = start_trial(setup, config)
    space = setup.tune_space
    values = {**space.fixed, **decode_values(space, dict(config))}
    cfg = trial_config(setup.base_config, setup.base_overrides, values, space.method,
                       run_overrides(setup, f"{setup.name}-{trial_id}"))
    key = objective_key(space)
    # every evaluated epoch's validation value is an intermediate objective (ASHA stops on it)
    res = fit_trial(cfg, setup, tags, lambda m: None if key not in m else
                    {"objective": m[key], "objective_value": m[key], "feasible": 1.0, "final": 0.0})
    best = max(h[key] for h in res.history if key in h)
    tune.report({"objective": best, "objective_value": best, "feasible": 1.0, "final": 1.0,
                 **{k: v for k, v in res.final.items() if k.startswith(("final/", "valid_best/"))}})


def resolve(config: Optional[str], overrides: list[str], values: dict[str, Any], method: str):
    return trial_config(config, overrides, values, method, []), None  # pair data: no prepare config


def max_t(setup: SweepSetup) -> int:
    space = setup.tune_space
    base = trial_config(setup.base_config, setup.base_overrides, dict(space.fixed), space.method, [])
    return math.ceil(base.optim.max_epochs / base.eval.every) + 2  # evaluations, and the final report


def write_report(summary: dict, space: TuneSpace, out: Path) -> list[Path]:
    """report.md: each trial's values, status, best validation objective and its test metrics."""
    key = summary["objective"]
    third = "auc" if any("final/all/auc" in t["metrics"] for t in summary["trials"]) else "p@10"
    lines = [f"# two-tower sweep {summary['name']}", "", f"Objective: best validation `{key}` of each trial "
             "(ASHA on it); test metrics at that epoch.", "",
             "| trial | values | status | iterations | objective | test all NDCG@10 | test tail NDCG@10 | test all "
             f"{third.upper()} |", "|---|---|---|---|---|---|---|---|"]
    best_id = (summary["best"] or {}).get("trial_id")
    for t in summary["trials"]:
        m = t["metrics"]
        cells = [f"{m.get(f'final/{s}/{x}', float('nan')):.4f}" for s, x in (("all", "ndcg@10"), ("tail", "ndcg@10"),
                                                                            ("all", third))]
        chosen = " **chosen**" if t["trial_id"] == best_id else ""
        lines.append(f"| {t['trial_id']} | {json.dumps(t['values'])} | {status(t)}{chosen} | {t['iterations']} | "
                     f"{m.get('objective_value', float('nan')):.4f} | " + " | ".join(cells) + " |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return [path]


TWOTOWER_SWEEP = SweepKind(
    check_space=check_space, resolve=resolve, trial_fn=twotower_trial_fn, max_t=max_t,
    default_name=lambda space_path, space, base: f"tune-{space.method}-{Path(base.data.output).name}",
    reference=lambda setup, checkpoint: None, register=lambda *args: None,
    objective_name=objective_key, write_report=write_report,
)
