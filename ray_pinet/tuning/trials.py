"""What every sweep shares, whatever its kind: the setup shipped to trials, the search algorithm, the defaults
trial, the rows of a finished ``ResultGrid``, the best trial and the sweep's parent MLflow run."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ray_pinet.config_base import flatten, from_dict, to_dict
from ray_pinet.storage_uri import local_or_uri
from ray_pinet.tracking import mlflow_utils as mu
from ray_pinet.training.trainer import fit
from ray_pinet.tuning.placement import remove_trial_groups
from ray_pinet.tuning.space import TuneSpace, encode_value


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
        return from_dict(TuneSpace, self.space)


@dataclass(frozen=True)
class SweepKind:
    """What ``sweep.run_sweep`` needs of a training kind's sweep (``sequence_sweep.py``,
    ``twotower_sweep.py``); registered by kind name in ``sweep.SWEEPS``."""

    check_space: Callable[[TuneSpace, Optional[str], list[str]], None]  # every key resolves, or ConfigError
    resolve: Callable[..., tuple[Any, Any]]  # (config, overrides, values, method) -> (cfg, prepare cfg)
    trial_fn: Callable[[dict, "SweepSetup"], None]  # one trial (runs in Tune)
    max_t: Callable[["SweepSetup"], int]  # ASHA's max_t: above a trial's last report
    default_name: Callable[[str, TuneSpace, Any], str]  # (space file, space, base cfg) -> sweep name
    reference: Callable[["SweepSetup", Optional[str]], Optional[dict]]  # what trials are measured against
    register: Callable[..., Optional[dict]]  # (best, uri, base, register_as, name, sweep_dir) -> registered
    objective_name: Callable[[TuneSpace], Optional[str]]
    write_report: Callable[[dict, TuneSpace, Path], list[Path]]


def default_point(space: TuneSpace, cfg: Any, prep: Any = None) -> dict[str, Any]:
    """The base config's value (``cfg``, and ``prep`` for ``prepare.*`` keys) of every searched
    key: evaluated first, so the report can set the tuned result against the untuned defaults."""
    flat = flatten(cfg.to_dict())
    pflat = flatten(to_dict(prep)) if prep is not None else {}
    point = {}
    for key, dom in space.space.items():
        value = pflat[key[len("prepare."):]] if key.startswith("prepare.") else flat[key]
        point[key] = encode_value(dom, value)
    return point


def start_trial(setup: SweepSetup, config: dict) -> tuple[str, dict]:
    """(trial id, MLflow tags) of the trial running here, after moving to the sweep's working
    directory: Tune starts trials in their own trial directory; configs name data relative to
    where the sweep was started (on a multi-node cluster: absolute paths on shared storage)."""
    from ray import tune

    if Path(setup.cwd).is_dir():
        os.chdir(setup.cwd)
    trial_id = tune.get_context().get_trial_id()
    return trial_id, {"sweep": setup.name, "trial_id": trial_id,
                      **{f"tune.{k}": json.dumps(v) for k, v in config.items()}}


def run_overrides(setup: SweepSetup, run_name: str) -> list[str]:
    """The overrides of every run a sweep trains: its name and folder, the trial resources, the
    sweep's tracking store."""
    trial = setup.tune_space.trial
    tracking = [f"tracking.tracking_uri={setup.tracking_uri}"] if setup.tracking_uri else []
    return [f"run.name={run_name}", f"run.storage_path={setup.storage}/runs", "run.progress=false",
            f"run.num_workers={trial.num_workers}", f"run.cpus_per_worker={trial.cpus_per_worker}"] + tracking


def fit_trial(cfg: Any, setup: SweepSetup, tags: dict, score: Callable[[dict], Optional[dict]]):
    """``fit`` of a trial's run, each report forwarded to Tune (``report_callback``); the
    placement group the Train run leaves behind is removed when it ends (placement.py)."""
    try:
        return fit(cfg, parent_run_id=setup.parent_run_id, tags=tags, callbacks=[report_callback(score)])
    finally:
        remove_trial_groups(own=True, orphans=True)


def report_callback(score: Callable[[dict], Optional[dict]]):
    """A Train ``UserCallback`` forwarding each report to Tune with ``score(metrics)``'s keys
    added (the objective ASHA and the searcher read); a report scored None is not forwarded.
    Built inside the trial (it needs the trial's Tune session)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            extra = score(dict(metrics[0]))
            if extra is not None:
                super().after_report(run_context, [{**metrics[0], **extra}], checkpoint)

    return ObjectiveReport()


def make_search(space: TuneSpace, point: Optional[dict]):
    """The search algorithm; ``point``: the defaults' values, evaluated first (None: no defaults trial)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    algo = space.search.algorithm
    points = [point] if point is not None and algo != "grid" else None
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


def defaults_row(rows: list[TrialRow], point: dict) -> Optional[dict]:
    """The trial that ran the base config's values (the untuned defaults), if any did."""
    for r in rows:
        if all(json.dumps(r.values.get(k)) == json.dumps(v) for k, v in point.items()):
            return dataclasses.asdict(r)
    return None


def best_trial(rows: list[TrialRow]) -> Optional[TrialRow]:
    """Highest objective among finished, feasible trials (validation only)."""
    ok = [r for r in rows if r.finished and r.feasible and math.isfinite(r.objective)]
    return max(ok, key=lambda r: r.objective) if ok else None


def sweep_parent_run(base, name: str, space: TuneSpace, tags: Optional[dict] = None):
    """(tracking URI, parent run id) of a sweep, (None, None) without tracking. The same default
    store as `train` and `compare` (<run.storage_path>/mlflow.db); a rerun of a finished sweep
    reopens its parent run rather than starting a second one."""
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
