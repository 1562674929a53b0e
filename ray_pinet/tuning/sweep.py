"""``ray-pinet tune``: a Ray Tune sweep whose trials each fit a Ray Train ``TorchTrainer``, for
either training kind (docs/design.md "Tuning").

The kind of a sweep is its space's ``method``; what differs between kinds (which keys may vary,
the objective, a reference run, the registry, the report) is the kind's ``SweepKind``
(``sequence_sweep.py``, ``twotower_sweep.py``). Everything else is this one flow: the search
algorithm with the defaults trial first, ASHA, ``Tuner.restore`` on a rerun (unfinished trials
continue, their Train runs resume from their last checkpoint), one MLflow parent run per sweep
(found again by name) with a child run per trial, ``summary.json`` and the report.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from ray_pinet.config_base import ConfigError, to_dict
from ray_pinet.kinds import kind_of_method
from ray_pinet.local_ray import start_ray
from ray_pinet.tracking import mlflow_utils as mu
from ray_pinet.tuning.sequence_sweep import SEQUENCE_SWEEP
from ray_pinet.tuning.space import TuneSpace, param_space, parse_space
from ray_pinet.tuning.trials import (
    SweepKind,
    SweepSetup,
    best_trial,
    collect,
    default_point,
    defaults_row,
    make_search,
    sweep_parent_run,
)
from ray_pinet.tuning.twotower_sweep import TWOTOWER_SWEEP

SWEEPS: dict[str, SweepKind] = {"sequence": SEQUENCE_SWEEP, "twotower": TWOTOWER_SWEEP}


def load_space(path: str | Path, base_config: Optional[str], base_overrides: list[str]) -> TuneSpace:
    """Parse a space file and check it against the base config of its kind: every key and every
    end value of every domain resolves into a full trial config, so a typo or an out-of-range
    bound fails before any trial starts."""
    space = parse_space(path)
    try:
        SWEEPS[kind_of_method(space.method).name].check_space(space, base_config, base_overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return space


def run_sweep(space_path: str, config: Optional[str], overrides: list[str], name: Optional[str] = None,
              storage: str = "runs/tune", register_as: Optional[str] = None,
              reference_checkpoint: Optional[str] = None, include_defaults: bool = True,
              num_samples: Optional[int] = None, smoke: bool = False) -> dict:
    """Run (or resume) a sweep; returns the summary written to ``<sweep>/summary.json``."""
    kind = kind_of_method(parse_space(space_path).method)
    sweep = SWEEPS[kind.name]
    if smoke:  # the smoke settings of the space's own kind
        overrides = kind.smoke(config, overrides)
    space = load_space(space_path, config, overrides)
    if num_samples:
        space.search.num_samples = int(num_samples)
    if smoke:  # the space's own epoch budget would win over the base config's smoke overrides
        space.fixed.update(kind.smoke_fixed)
        space.search.num_samples = min(space.search.num_samples, 2)
    base, base_prep = sweep.resolve(config, overrides, dict(space.fixed), space.method)
    name = name or sweep.default_name(space_path, space, base)
    sweep_dir = Path(storage).expanduser().resolve() / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    kind.prepare(base, base.run.progress)
    start_ray()
    uri, parent = sweep_parent_run(base, name, space, {"space_file": str(space_path)})
    setup = SweepSetup(name=name, base_config=config, base_overrides=list(overrides), space=to_dict(space),
                       storage=str(sweep_dir), tracking_uri=uri, parent_run_id=parent,
                       reference_outcomes=str(sweep_dir / "reference_outcomes.parquet"),
                       cwd=os.getcwd(), seed=space.search.seed)
    (sweep_dir / "command.json").write_text(json.dumps(
        {"space": str(space_path), "config": config, "overrides": overrides, "name": name}, indent=2))
    with mu.failed_on_error(uri, parent):
        reference = sweep.reference(setup, reference_checkpoint)
        point = default_point(space, base, base_prep)
        tuner = _tuner(sweep, setup, space, point if include_defaults else None)
        rows = collect(tuner.fit())
        for r in rows:
            if uri:
                r.run_id = mu.find_run(uri, base.tracking.experiment, f"{name}-{r.trial_id}")
                if r.run_id and not r.finished:  # Tune killed it (ASHA) mid-run: close its run
                    mu.finish_run(uri, r.run_id, status="FAILED" if r.error else "KILLED")
        best = best_trial(rows)
        summary = {"name": name, "sweep_dir": str(sweep_dir), "reference": reference,
                   "objective": sweep.objective_name(space), "trials": [dataclasses.asdict(r) for r in rows],
                   "best": dataclasses.asdict(best) if best else None, "defaults": defaults_row(rows, point),
                   "registered": sweep.register(best, uri, base, register_as, name, sweep_dir)}
        (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
        files = sweep.write_report(summary, space, sweep_dir)
        if uri and parent:
            for f in files:
                mu.log_artifact(uri, parent, f, "report")
            if best is not None:
                mu.log_metrics(uri, parent, {f"best/{k}": v for k, v in best.metrics.items()
                                             if k.startswith(("final_val/", "final/", "test/", "objective"))})
            mu.finish_run(uri, parent)
        return summary


def _tuner(sweep: SweepKind, setup: SweepSetup, space: TuneSpace, point: Optional[dict]):
    """The sweep's Tuner: restored from ``<sweep>/tune/<name>`` when it ran before, else new."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    # The trial function only waits on its Train run, whose workers hold the real CPUs; Tune
    # refuses an empty request, so it asks for a sliver (search.max_concurrent bounds how many
    # Train runs queue for workers at once).
    trainable = tune.with_resources(tune.with_parameters(sweep.trial_fn, setup=setup), {"CPU": 0.01})
    max_t = sweep.max_t(setup)
    tune_dir = Path(setup.storage) / "tune"
    if tune.Tuner.can_restore(str(tune_dir / setup.name)):
        print(f"sweep {setup.name}: resuming from {tune_dir / setup.name}", flush=True)
        return tune.Tuner.restore(str(tune_dir / setup.name), trainable, resume_unfinished=True,
                                  resume_errored=True)
    scheduler = None if space.scheduler.kind != "asha" else ASHAScheduler(
        time_attr="training_iteration", max_t=max_t, grace_period=space.scheduler.grace_period,
        reduction_factor=space.scheduler.reduction_factor)
    return tune.Tuner(
        trainable, param_space=param_space(space),
        tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=space.search.num_samples,
                                    max_concurrent_trials=space.search.max_concurrent or None,
                                    scheduler=scheduler, search_alg=make_search(space, point)),
        run_config=tune.RunConfig(name=setup.name, storage_path=str(tune_dir), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
