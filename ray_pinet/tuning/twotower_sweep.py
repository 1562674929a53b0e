"""``ray-pinet tune`` for the two-tower methods (onebp, twobp, bpr, ncf): a Ray Tune sweep whose
trials each fit ``fit_twotower`` (Ray Train), with ASHA on a validation metric.

Same space file format, search algorithms, ASHA, resume and MLflow layout as the PINet sweep
(``sweep.py``), with two differences, both because pair data has no leave-one-out reference
model to regroup: the objective is ``measure: absolute`` (the validation metric of
``objective.slice``: ``ndcg`` → NDCG@10, or ``auc`` for ``ncf``),
and there is no guard and no model registry (two-tower runs log no served model). A finished
trial's objective is its best validation value (the epoch its test metrics are reported at).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from ray_pinet.config_base import ConfigError, flatten, to_dict
from ray_pinet.tuning.space import TuneSpace, decode_values, encode_value, split_overrides
from ray_pinet.tuning.sweep import SweepSetup, best_trial, collect, make_search, sweep_parent_run

TWOTOWER_OBJECTIVES = ("ndcg", "auc")  # NDCG@10 (every method); AUC of labeled rows (ncf)


def objective_key(space: TuneSpace) -> str:
    metric = space.objective.metric
    return f"valid/{space.objective.slice}/{'ndcg@10' if metric == 'ndcg' else metric}"


def check_space(space: TuneSpace, config: Optional[str], overrides: list[str]) -> None:
    """Every key and end value resolves into a valid TwoTowerConfig; the objective fits pairs."""
    from ray_pinet.tuning.space import extreme_values

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
    from ray_pinet.twotower_config import TwoTowerConfig

    train_o, prep_o = split_overrides(values)
    if prep_o:
        raise ConfigError("two-tower sweeps vary data.* keys, not prepare.* (pair data has no prepare config)")
    return TwoTowerConfig.from_yaml(config, overrides + train_o + [f"model.method={method}"] + extra)


def _report_callback(key: str):
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            if key not in m:
                return
            m.update(objective=m[key], objective_value=m[key], feasible=1.0, final=0.0)
            super().after_report(run_context, [m], checkpoint)

    return ObjectiveReport()


def twotower_trial_fn(config: dict[str, Any], setup: SweepSetup) -> None:
    from ray import tune

    from ray_pinet.training.twotower_trainer import fit_twotower
    from ray_pinet.tuning.placement import remove_trial_groups

    if Path(setup.cwd).is_dir():
        os.chdir(setup.cwd)
    space = setup.tune_space
    trial_id = tune.get_context().get_trial_id()
    extra = [f"run.name={setup.name}-{trial_id}", f"run.storage_path={setup.storage}/runs", "run.progress=false",
             f"run.num_workers={space.trial.num_workers}", f"run.cpus_per_worker={space.trial.cpus_per_worker}"]
    extra += [f"tracking.tracking_uri={setup.tracking_uri}"] if setup.tracking_uri else []
    values = {**space.fixed, **decode_values(space, dict(config))}
    cfg = trial_config(setup.base_config, setup.base_overrides, values, space.method, extra)
    key = objective_key(space)
    tags = {"sweep": setup.name, "trial_id": trial_id, **{f"tune.{k}": json.dumps(v) for k, v in config.items()}}
    try:
        res = fit_twotower(cfg, parent_run_id=setup.parent_run_id, tags=tags, callbacks=[_report_callback(key)])
    finally:
        remove_trial_groups(own=True, orphans=True)
    best = max(h[key] for h in res.history if key in h)
    tune.report({"objective": best, "objective_value": best, "feasible": 1.0, "final": 1.0,
                 **{k: v for k, v in res.final.items() if k.startswith(("final/", "valid_best/"))}})


def run_twotower_sweep(space: TuneSpace, config: Optional[str], overrides: list[str], name: Optional[str],
                       storage: str, include_defaults: bool) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from ray_pinet.tracking import mlflow_utils as mu
    from ray_pinet.local_ray import start_ray
    from ray_pinet.training.twotower_trainer import ensure_pairs
    from ray_pinet.tuning.space import param_space

    check_space(space, config, overrides)
    base = trial_config(config, overrides, dict(space.fixed), space.method, [])
    name = name or f"tune-{space.method}-{Path(base.data.output).name}"
    sweep_dir = Path(storage).expanduser().resolve() / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    ensure_pairs(base, progress=base.run.progress)
    if not ray.is_initialized():
        start_ray()
    uri, parent = sweep_parent_run(base, name, space)
    setup = SweepSetup(name=name, base_config=config, base_overrides=list(overrides), space=to_dict(space),
                       storage=str(sweep_dir), tracking_uri=uri, parent_run_id=parent, reference_outcomes="",
                       cwd=os.getcwd(), seed=space.search.seed)
    flat = flatten(base.to_dict())
    point = {k: encode_value(dom, flat[k]) for k, dom in space.space.items()}
    try:
        trainable = tune.with_resources(tune.with_parameters(twotower_trial_fn, setup=setup), {"CPU": 0.01})
        tune_dir = sweep_dir / "tune"
        if tune.Tuner.can_restore(str(tune_dir / name)):
            tuner = tune.Tuner.restore(str(tune_dir / name), trainable, resume_unfinished=True, resume_errored=True)
        else:
            evaluations = math.ceil(base.optim.epochs / base.eval.every)
            scheduler = None if space.scheduler.kind != "asha" else ASHAScheduler(
                time_attr="training_iteration", max_t=evaluations + 2,
                grace_period=space.scheduler.grace_period, reduction_factor=space.scheduler.reduction_factor)
            tuner = tune.Tuner(
                trainable, param_space=param_space(space),
                tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=space.search.num_samples,
                                            max_concurrent_trials=space.search.max_concurrent or None,
                                            scheduler=scheduler,
                                            search_alg=make_search(space, setup, include_defaults, point=point)),
                run_config=tune.RunConfig(name=name, storage_path=str(tune_dir), verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=1)))
        rows = collect(tuner.fit())
        for r in rows:
            if uri:
                r.run_id = mu.find_run(uri, base.tracking.experiment, f"{name}-{r.trial_id}")
        best = best_trial(rows)
        summary = {"name": name, "sweep_dir": str(sweep_dir), "objective": objective_key(space),
                   "trials": [dataclasses.asdict(r) for r in rows],
                   "best": dataclasses.asdict(best) if best else None, "registered": None}
        (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
        report = write_report(summary, sweep_dir)
        if uri and parent:
            mu.log_artifact(uri, parent, report, "report")
            mu.finish_run(uri, parent)
        return summary
    except BaseException:
        if uri and parent:
            mu.finish_run(uri, parent, status="FAILED")
        raise


def write_report(summary: dict, out: Path) -> Path:
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
        status = "error" if t.get("error") else ("finished" if t["finished"] else "stopped early")
        cells = [f"{m.get(f'final/{s}/{x}', float('nan')):.4f}" for s, x in (("all", "ndcg@10"), ("tail", "ndcg@10"),
                                                                            ("all", third))]
        chosen = " **chosen**" if t["trial_id"] == best_id else ""
        lines.append(f"| {t['trial_id']} | {json.dumps(t['values'])} | {status}{chosen} | {t['iterations']} | "
                     f"{m.get('objective_value', float('nan')):.4f} | " + " | ".join(cells) + " |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
