"""``ray-pinet tune``: a Ray Tune sweep whose trials each fit a Ray Train ``TorchTrainer``.

Flow (docs/design.md "Tuning"):
1. the reference: a ``joint`` run of the base config + the space's ``fixed`` values (the untuned
   model users have today), evaluated once per user on validation (``objective.py``);
2. a ``Tuner`` over ``trial_fn``: each trial resolves its config, restratifies the base data
   when only its stratification differs (a view: new strata, the base's samples) or prepares
   its own copy when its history length differs (both cached by the prepare config's hash),
   and calls ``fit`` with a callback that turns every validation report into the
   objective and forwards it to Tune (ASHA stops trials on it);
3. the best *feasible, finished* trial (selected on validation only) is registered in the
   MLflow Model Registry, and a report (Markdown, CSV, plot) is written and logged.

MLflow: one parent run per sweep (found again by name on resume), the reference and one child
run per trial under it (the trial's ``fit`` logs its config, per-epoch per-stratum metrics and
model). Rerunning the same command resumes: ``Tuner.restore`` continues unfinished trials, whose
Train runs resume from their last checkpoint (same run name and storage).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ray_pinet.config_base import to_dict
from ray_pinet.smoke import smoke_overrides
from ray_pinet.storage_uri import local_or_uri
from ray_pinet.tuning.space import TuneSpace, decode_values, encode_value, resolve_trial
from ray_pinet.twotower_config import TWOTOWER_METHODS


@dataclass
class SweepSetup:
    """What every trial needs (shipped to trials with ``tune.with_parameters``)."""

    name: str
    base_config: Optional[str]
    base_overrides: list[str]
    space: dict  # TuneSpace.to_dict()
    storage: str  # absolute sweep directory
    tracking_uri: Optional[str]
    parent_run_id: Optional[str]
    reference_outcomes: str  # parquet of per-user validation outcomes of the reference
    cwd: str = "."  # the driver's working directory: relative config paths are relative to it
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tune_space(self) -> TuneSpace:
        from ray_pinet.config_base import from_dict

        return from_dict(TuneSpace, self.space)


# -- configs and data of one run ---------------------------------------------------------------
def prepared_path_for(base_path: str, prep) -> str:
    """Where a trial's prepared data (a copy or a restratified view) lives: next to the base data,
    named by the prepare config's hash, so trials with the same stratification and history
    length share one."""
    d = to_dict(prep)
    d.pop("output", None)
    digest = hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
    base = Path(base_path)
    return str(base.parent / "tune" / f"{base.name}-{digest}")


def ensure_trial_data(cfg, prep, base_prep) -> str:
    """The data path of a run: the base data when its prepare config is the base one, else a
    hashed folder made under a file lock (concurrent trials of one setting wait for the first to
    write it). When only the stratification differs it is a restratified view of the base data
    (``data/restratify.py``: new users.parquet and strata.json, the base's samples; made again
    when the base was prepared again since); any other difference runs a full ``prepare``."""
    from ray_pinet.data.pipeline import prepare
    from ray_pinet.data.prepared import check_view, view_base
    from ray_pinet.data.restratify import restratify
    from ray_pinet.errors import DataError

    if prep is None:
        return cfg.data.path
    strip = lambda p, *also: {k: v for k, v in to_dict(p).items() if k not in ("output", *also)}  # noqa: E731
    if strip(prep) == strip(base_prep):
        return cfg.data.path
    path = Path(prepared_path_for(cfg.data.path, prep))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        made = (path / "strata.json").exists()
        if made and view_base(path) is not None:
            try:
                check_view(path)
            except DataError as exc:
                print(f"[ray-pinet] {path}: {exc}; making it again", flush=True)
                made = False
        if not made and strip(prep, "strata") == strip(base_prep, "strata"):
            restratify(cfg.data.path, prep.strata, path)
        elif not made:
            prepare(dataclasses.replace(prep, output=str(path)), progress=False)
    return str(path)


def run_config(setup: SweepSetup, values: dict[str, Any], run_name: str, method: str):
    """(TrainConfig, data path) of one run of the sweep: base + fixed + ``values``."""
    from ray_pinet.config import TrainConfig
    from ray_pinet.config_base import apply_overrides, from_dict, load_yaml
    from ray_pinet.data.config import PrepareConfig

    space = setup.tune_space
    merged = {**space.fixed, **values}
    cfg, prep = resolve_trial(setup.base_config, setup.base_overrides, merged, method)
    base_prep = None
    if cfg.data.prepare:
        base_prep = from_dict(PrepareConfig, apply_overrides(load_yaml(cfg.data.prepare), []))
    data_path = ensure_trial_data(cfg, prep, base_prep)
    from ray_pinet.tuning.space import split_overrides

    train_o, _ = split_overrides(merged)
    extra = [
        f"method={method}", f"data.path={data_path}", f"run.name={run_name}",
        f"run.storage_path={setup.storage}/runs", "run.progress=false", "eval.every=1",
        f"run.num_workers={space.trial.num_workers}", f"run.cpus_per_worker={space.trial.cpus_per_worker}",
    ] + ([f"tracking.tracking_uri={setup.tracking_uri}"] if setup.tracking_uri else [])
    if data_path != cfg.data.path:  # the trial's own prepared copy, made from `prep`, not data.prepare
        extra.append("data.prepare=null")
    return TrainConfig.from_yaml(setup.base_config, setup.base_overrides + train_o + extra)


# -- inside a trial ----------------------------------------------------------------------------
def _objective_callback(objective):
    """A Train ``UserCallback`` forwarding each validation report to Tune with the objective.
    Reports without validation metrics are not forwarded (every Tune result carries the metric
    ASHA and the searcher read). Built inside the trial (it needs the trial's Tune session)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            m = dict(metrics[0])
            final = any(k.startswith("final_val/") for k in m)
            scored = objective.score(m, "final_val" if final else "val")
            if scored is None:
                return
            m.update(scored)
            m["final"] = float(final)
            super().after_report(run_context, [m], checkpoint)

    return ObjectiveReport()


def trial_fn(config: dict[str, Any], setup: SweepSetup) -> None:
    import pandas as pd
    import pyarrow.parquet as pq
    from ray import tune

    from ray_pinet.training.trainer import fit
    from ray_pinet.tuning.objective import Objective, reference_metrics

    # Tune starts trials in their own trial directory; configs name data relative to where the
    # sweep was started (on a multi-node cluster: absolute paths on shared storage).
    if Path(setup.cwd).is_dir():
        os.chdir(setup.cwd)
    trial_id = tune.get_context().get_trial_id()
    import ray

    from ray_pinet.tuning.placement import remove_trial_groups

    orphans = remove_trial_groups(own=False, orphans=True)  # left by trials that Tune stopped
    free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
    print(f"[ray-pinet] trial {trial_id}: {config}  (cluster CPUs free {free:g} of {total:g}; "
          f"removed {orphans} orphaned placement group(s))", flush=True)
    space = setup.tune_space
    cfg = run_config(setup, decode_values(space, dict(config)), f"{setup.name}-{trial_id}", space.method)
    strata = json.loads((Path(cfg.data.path) / "strata.json").read_text())
    K = int(strata["num_strata"])
    users = pq.read_table(Path(cfg.data.path) / "users.parquet", columns=["user_id", "stratum"]).to_pandas()
    ref = reference_metrics(pd.read_parquet(setup.reference_outcomes), users, K, cfg.eval.k)
    objective = Objective(space.objective, ref, K, cfg.eval.k)
    objective.check()
    tags = {"sweep": setup.name, "trial_id": trial_id,
            **{f"tune.{k}": json.dumps(v) for k, v in config.items()}}
    try:
        fit(cfg, parent_run_id=setup.parent_run_id, tags=tags, callbacks=[_objective_callback(objective)])
    finally:
        remove_trial_groups(own=True, orphans=True)  # the Train run leaves its group (placement.py)


# -- the driver --------------------------------------------------------------------------------
def default_point(setup: SweepSetup) -> dict[str, Any]:
    """The base config's value of every searched key: evaluated first, so the report can set the
    tuned result against the untuned defaults."""
    from ray_pinet.config_base import flatten

    space = setup.tune_space
    cfg, prep = resolve_trial(setup.base_config, setup.base_overrides, dict(space.fixed), space.method)
    flat = flatten(cfg.to_dict())
    pflat = flatten(to_dict(prep)) if prep is not None else {}
    point = {}
    for key, dom in space.space.items():
        value = pflat[key[len("prepare."):]] if key.startswith("prepare.") else flat[key]
        point[key] = encode_value(dom, value)
    return point


def make_search(space: TuneSpace, setup: SweepSetup, include_defaults: bool, point: Optional[dict] = None):
    """The search algorithm; ``point``: the defaults' values (computed from the base config when None)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    algo = space.search.algorithm
    points = [point if point is not None else default_point(setup)] if include_defaults and algo != "grid" else None
    if algo in ("random", "grid"):
        # TuneConfig.max_concurrent_trials does not reach an explicitly passed generator.
        return BasicVariantGenerator(points_to_evaluate=points, random_state=space.search.seed,
                                     max_concurrent=space.search.max_concurrent)
    if algo == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:  # pragma: no cover - depends on the extra
            raise RuntimeError("search.algorithm optuna needs `pip install ray-pinet[optuna]`") from exc
        import optuna

        searcher = OptunaSearch(points_to_evaluate=points,
                                sampler=optuna.samplers.TPESampler(seed=space.search.seed))
    else:
        try:
            from ray.tune.search.hyperopt import HyperOptSearch
        except ImportError as exc:  # pragma: no cover
            raise RuntimeError("search.algorithm hyperopt needs `pip install hyperopt`") from exc
        searcher = HyperOptSearch(points_to_evaluate=points, random_state_seed=space.search.seed)
    if space.search.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=space.search.max_concurrent)
    return searcher


def max_iterations(cfg) -> int:
    """Reports a trial can make: one per stage-1 and stage-2 epoch, plus the final one."""
    return cfg.optim.max_epochs + (cfg.stage2.max_epochs if cfg.uses_plugins else 0) + 1


@dataclass
class TrialRow:
    trial_id: str
    values: dict
    iterations: int
    finished: bool  # reached its final report (not stopped by ASHA, not errored)
    feasible: bool
    objective: float
    metrics: dict
    error: Optional[str] = None
    run_id: Optional[str] = None
    curve: list = field(default_factory=list)  # (iteration, objective value before any guard penalty)


def collect(grid) -> list[TrialRow]:
    rows = []
    for res in grid:
        m = dict(res.metrics or {})
        cfg = dict(res.config or {})
        rows.append(TrialRow(
            trial_id=str(m.get("trial_id") or Path(res.path).name),
            values=cfg,
            iterations=int(m.get("training_iteration", 0) or 0),
            finished=bool(m.get("final", 0.0)) and res.error is None,
            feasible=bool(m.get("feasible", 0.0)),
            objective=float(m.get("objective", float("nan"))),
            metrics={k: v for k, v in m.items() if isinstance(v, (int, float))},
            error=None if res.error is None else str(res.error).splitlines()[0][:300],
            curve=_curve(res),
        ))
    # A restored ResultGrid lists trials in whatever order the experiment state
    # holds them; sort so the summary and report read the same on every run.
    return sorted(rows, key=lambda r: r.trial_id)


def _curve(res) -> list:
    df = getattr(res, "metrics_dataframe", None)
    if df is None or "objective_value" not in df or "training_iteration" not in df:
        return []
    return [(int(i), float(v)) for i, v in zip(df["training_iteration"], df["objective_value"]) if v == v]


def _defaults_row(rows: list[TrialRow], point: dict) -> Optional[dict]:
    """The trial that ran the base config's values (the untuned defaults), if any did."""
    for r in rows:
        if all(json.dumps(r.values.get(k)) == json.dumps(v) for k, v in point.items()):
            return dataclasses.asdict(r)
    return None


def best_trial(rows: list[TrialRow]) -> Optional[TrialRow]:
    """Highest objective among finished, feasible trials (validation only)."""
    ok = [r for r in rows if r.finished and r.feasible and math.isfinite(r.objective)]
    return max(ok, key=lambda r: r.objective) if ok else None


def reference_run(setup: SweepSetup, reference_checkpoint: Optional[str]) -> dict:
    """Train (or reuse) the reference joint run and write its per-user validation outcomes.
    Cached in ``<sweep>/reference.json``: a resumed sweep does not retrain it."""
    from ray_pinet.training.trainer import fit
    from ray_pinet.tuning.objective import checkpoint_outcomes

    sweep = Path(setup.storage)
    cache = sweep / "reference.json"
    if cache.exists():
        return json.loads(cache.read_text())
    info: dict[str, Any] = {}
    if reference_checkpoint:
        ckpt = reference_checkpoint
    else:
        print(f"\n=== sweep {setup.name}: reference joint run (base config + fixed values) ===", flush=True)
        cfg = run_config(setup, {}, f"{setup.name}-reference-joint", "joint")
        res = fit(cfg, parent_run_id=setup.parent_run_id, tags={"sweep": setup.name, "role": "reference"})
        ckpt = res.checkpoint_path
        info.update(run_id=res.run_id, final=res.final)
    outcomes = checkpoint_outcomes(ckpt, "valid")
    outcomes.to_parquet(setup.reference_outcomes, index=False)
    info.update(checkpoint=ckpt, users=len(outcomes))
    cache.write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def run_sweep(space_path: str, config: Optional[str], overrides: list[str], name: Optional[str] = None,
              storage: str = "runs/tune", register_as: Optional[str] = None,
              reference_checkpoint: Optional[str] = None, include_defaults: bool = True,
              num_samples: Optional[int] = None, smoke: bool = False) -> dict:
    """Run (or resume) a sweep; returns the summary written to ``<sweep>/summary.json``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from ray_pinet.config import TrainConfig
    from ray_pinet.tracking import mlflow_utils as mu
    from ray_pinet.local_ray import start_ray
    from ray_pinet.training.trainer import ensure_prepared
    from ray_pinet.tuning.report import write_report
    from ray_pinet.tuning.space import load_space, param_space

    twotower = load_space(space_path, config, overrides).method in TWOTOWER_METHODS
    if smoke:  # the settings of the space's own kind (ray_pinet/smoke.py)
        overrides = smoke_overrides("twotower" if twotower else "sequence", config, overrides)
    space = load_space(space_path, config, overrides)
    if num_samples:
        space.search.num_samples = int(num_samples)
    if twotower:
        from ray_pinet.tuning.twotower_sweep import run_twotower_sweep

        if smoke:
            space.fixed.update({"optim.epochs": 2, "eval.every": 1})
            space.search.num_samples = min(space.search.num_samples, 2)
        return run_twotower_sweep(space, config, overrides, name, storage, include_defaults)
    if smoke:  # the space's own epoch budget would win over the base config's smoke overrides
        space.fixed.update({"optim.max_epochs": 2, "stage2.max_epochs": 1, "optim.max_minutes": 0})
        space.search.num_samples = min(space.search.num_samples, 2)
    base = TrainConfig.from_yaml(config, overrides)
    name = name or f"tune-{Path(space_path).stem}-{Path(base.data.path).name}"
    sweep_dir = Path(storage).expanduser().resolve() / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    ensure_prepared(base, progress=base.run.progress)
    if not ray.is_initialized():
        start_ray()

    uri, parent = sweep_parent_run(base, name, space, {"space_file": str(space_path)})
    setup = SweepSetup(name=name, base_config=config, base_overrides=list(overrides),
                       space=to_dict(space), storage=str(sweep_dir), tracking_uri=uri,
                       parent_run_id=parent, reference_outcomes=str(sweep_dir / "reference_outcomes.parquet"),
                       cwd=os.getcwd(), seed=space.search.seed)
    (sweep_dir / "command.json").write_text(json.dumps(
        {"space": str(space_path), "config": config, "overrides": overrides, "name": name}, indent=2))
    try:
        reference = reference_run(setup, reference_checkpoint)
        probe = run_config(setup, {}, "probe", space.method)
        # The trial function only waits on its Train run, whose workers hold the real CPUs; Tune
        # refuses an empty request, so it asks for a sliver (search.max_concurrent bounds how
        # many Train runs queue for workers at once).
        trainable = tune.with_resources(tune.with_parameters(trial_fn, setup=setup), {"CPU": 0.01})
        tune_dir = sweep_dir / "tune"
        if tune.Tuner.can_restore(str(tune_dir / name)):
            print(f"sweep {name}: resuming from {tune_dir / name}", flush=True)
            tuner = tune.Tuner.restore(str(tune_dir / name), trainable, resume_unfinished=True,
                                       resume_errored=True)
        else:
            scheduler = None
            if space.scheduler.kind == "asha":
                # max_t above the last report: ASHA stops a trial that reaches max_t, and a
                # trial stopped at its final report would be killed before its model is logged.
                scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_iterations(probe) + 1,
                                          grace_period=space.scheduler.grace_period,
                                          reduction_factor=space.scheduler.reduction_factor)
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(space),
                tune_config=tune.TuneConfig(
                    metric="objective", mode="max", num_samples=space.search.num_samples,
                    max_concurrent_trials=space.search.max_concurrent or None,
                    scheduler=scheduler, search_alg=make_search(space, setup, include_defaults),
                ),
                run_config=tune.RunConfig(name=name, storage_path=str(tune_dir), verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=1)),
            )
        grid = tuner.fit()
        rows = collect(grid)
        for r in rows:
            if uri:
                r.run_id = mu.find_run(uri, base.tracking.experiment, f"{name}-{r.trial_id}")
                if r.run_id and not r.finished:  # Tune killed it (ASHA) mid-run: close its run
                    mu.finish_run(uri, r.run_id, status="FAILED" if r.error else "KILLED")
        best = best_trial(rows)
        summary = {"name": name, "sweep_dir": str(sweep_dir), "reference": reference,
                   "trials": [dataclasses.asdict(r) for r in rows],
                   "best": dataclasses.asdict(best) if best else None,
                   "defaults": _defaults_row(rows, default_point(setup)),
                   "registered": None}
        if best is not None and uri and best.run_id and base.tracking.log_model:
            from ray_pinet.tracking.registry import register_best

            summary["registered"] = register_best(
                uri, best.run_id, register_as or f"ray-pinet-{Path(base.data.path).name}",
                sweep=name, trial_dir=str(sweep_dir), objective=best.objective,
                data_path=_trial_data_path(uri, best.run_id))
        (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
        files = write_report(summary, space, sweep_dir)
        if uri and parent:
            for f in files:
                mu.log_artifact(uri, parent, f, "report")
            if best is not None:
                mu.log_metrics(uri, parent, {f"best/{k}": v for k, v in best.metrics.items()
                                             if k.startswith(("final_val/", "test/", "objective"))})
            mu.finish_run(uri, parent)
        return summary
    except BaseException:
        if uri and parent:
            mu.finish_run(uri, parent, status="FAILED")
        raise


def sweep_parent_run(base, name: str, space: TuneSpace, tags: Optional[dict] = None):
    """(tracking URI, parent run id) of a sweep, (None, None) without tracking. The same default
    store as `train` and `compare` (<run.storage_path>/mlflow.db); a rerun of a finished sweep
    reopens its parent run rather than starting a second one."""
    from ray_pinet.tracking import mlflow_utils as mu

    if not base.tracking.enabled:
        return None, None
    uri = mu.resolve_tracking_uri(base.tracking.tracking_uri, local_or_uri(base.run.storage_path))
    parent = mu.find_run(uri, base.tracking.experiment, name)
    if parent is None:
        parent, _ = mu.start_or_resume_run(
            uri, base.tracking.experiment, name,
            {"space": json.loads(json.dumps(to_dict(space))), "base": base.to_dict()},
            tags={"sweep": name, "role": "sweep", **(tags or {})})
    return uri, parent


def _trial_data_path(uri: str, run_id: str) -> Optional[str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).data.params.get("data.path")
