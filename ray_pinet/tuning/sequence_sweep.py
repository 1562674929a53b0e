"""The sequence kind's sweep (``ray-pinet tune`` on joint / pinet / reweight): trials that may restratify or
re-prepare the data, an objective measured against a reference joint run, and the winner registered in the
MLflow Model Registry (docs/design.md "Tuning").

1. the reference: a ``joint`` run of the base config + the space's ``fixed`` values (the untuned model users
   have today), evaluated once per user on validation (``objective.py``);
2. each trial resolves its config, gets its data (``ensure_trial_data``) and calls ``fit`` with a callback
   that turns every validation report into the objective and forwards it to Tune;
3. the best *feasible, finished* trial (selected on validation only) is registered.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import pyarrow.parquet as pq

from ray_pinet.config import TrainConfig
from ray_pinet.config_base import ConfigError, to_dict
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.pipeline import prepare
from ray_pinet.data.prepared import check_view, view_base
from ray_pinet.data.restratify import restratify
from ray_pinet.errors import DataError
from ray_pinet.tracking.registry import register_best
from ray_pinet.training.trainer import fit
from ray_pinet.tuning.objective import Objective, checkpoint_outcomes, reference_metrics
from ray_pinet.tuning.placement import remove_trial_groups
from ray_pinet.tuning.report import write_report
from ray_pinet.tuning.space import PREPARE_SECTIONS, TuneSpace, decode_values, extreme_values, split_overrides
from ray_pinet.tuning.trials import SweepKind, SweepSetup, fit_trial, run_overrides, start_trial


def check_space(space: TuneSpace, base_config: Optional[str], base_overrides: list[str]) -> None:
    """Every key and every end value of every domain resolves into a valid trial config."""
    for key in list(space.fixed) + list(space.space):
        _check_key(key)
    fixed = dict(space.fixed)
    for key, dom in space.space.items():
        for v in extreme_values(dom):
            resolve_trial(base_config, base_overrides, {**fixed, key: v}, space.method)
    resolve_trial(base_config, base_overrides, fixed, space.method)


def _check_key(key: str) -> None:
    if key.startswith("prepare."):
        section = key.split(".")[1] if key.count(".") >= 2 else ""
        if section not in PREPARE_SECTIONS:
            raise ConfigError(
                f"space/fixed key {key!r}: only prepare.strata.* and prepare.samples.* can vary "
                "between trials (source and cleaning decide which users are evaluated)")
    if key in ("method", "data.path", "data.prepare", "run.name", "run.storage_path", "run.seed"):
        raise ConfigError(f"space/fixed key {key!r} is set by the sweep itself")


def resolve_trial(base_config: Optional[str], base_overrides: list[str], values: dict[str, Any],
                  method: str):
    """(TrainConfig, PrepareConfig or None) of one trial: the base config + ``values``. The prepare config is
    None when the base config names no ``data.prepare`` and no prepare key varies."""
    train_o, prep_o = split_overrides(values)
    cfg = TrainConfig.from_yaml(base_config, base_overrides + train_o + [f"method={method}"])
    if not cfg.data.prepare:
        if prep_o:
            raise ConfigError("the space varies prepare.* keys (or model.max_len) but the base config "
                              "has no data.prepare to re-prepare the data from")
        return cfg, None
    prep = PrepareConfig.from_yaml(cfg.data.prepare, prep_o)
    if prep.samples.max_len != cfg.model.max_len:
        raise ConfigError(f"model.max_len={cfg.model.max_len} but prepare samples.max_len="
                          f"{prep.samples.max_len}: vary model.max_len (it sets both)")
    return cfg, prep


def prepared_path_for(base_path: str, prep) -> str:
    """Where a trial's prepared data (a copy or a restratified view) lives: next to the base data, named by
    the prepare config's hash, so trials with the same stratification and history length share one."""
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
    space = setup.tune_space
    merged = {**space.fixed, **values}
    cfg, prep = resolve_trial(setup.base_config, setup.base_overrides, merged, method)
    base_prep = PrepareConfig.from_yaml(cfg.data.prepare) if cfg.data.prepare else None
    data_path = ensure_trial_data(cfg, prep, base_prep)
    train_o, _ = split_overrides(merged)
    extra = [f"method={method}", f"data.path={data_path}", "eval.every=1"] + run_overrides(setup, run_name)
    if data_path != cfg.data.path:  # the trial's own prepared copy, made from `prep`, not data.prepare
        extra.append("data.prepare=null")
    return TrainConfig.from_yaml(setup.base_config, setup.base_overrides + train_o + extra)


def _scored(objective):
    """Each validation report's objective (intermediate on ``val/``, final on ``final_val/``);
    None for reports without validation metrics (``trials.report_callback`` drops them)."""
    def score(m: dict) -> Optional[dict]:
        final = any(k.startswith("final_val/") for k in m)
        scored = objective.score(m, "final_val" if final else "val")
        return None if scored is None else {**scored, "final": float(final)}

    return score


def trial_fn(config: dict[str, Any], setup: SweepSetup) -> None:
    import ray

    trial_id, tags = start_trial(setup, config)
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
    fit_trial(cfg, setup, tags, _scored(objective))


def max_iterations(cfg) -> int:
    """Reports a trial can make: one per stage-1 and stage-2 epoch, plus the final one."""
    return cfg.optim.max_epochs + (cfg.stage2.max_epochs if cfg.uses_plugins else 0) + 1


def reference_run(setup: SweepSetup, reference_checkpoint: Optional[str]) -> dict:
    """Train (or reuse) the reference joint run and write its per-user validation outcomes.
    Cached in ``<sweep>/reference.json``: a resumed sweep does not retrain it."""
    cache = Path(setup.storage) / "reference.json"
    if cache.exists():
        return json.loads(cache.read_text())
    info: dict[str, Any] = {}
    ckpt = reference_checkpoint
    if not ckpt:
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


def max_t(setup: SweepSetup) -> int:
    # above the last report: ASHA stops a trial that reaches max_t, and a trial stopped at its
    # final report would be killed before its model is logged.
    return max_iterations(run_config(setup, {}, "probe", setup.tune_space.method)) + 1


def register(best, uri: Optional[str], base: TrainConfig, register_as: Optional[str], name: str,
             sweep_dir: Path) -> Optional[dict]:
    """The best trial's served model, registered (and @champion) when the sweep tracks models."""
    if best is None or not uri or not best.run_id or not base.tracking.log_model:
        return None
    from mlflow.tracking import MlflowClient

    data_path = MlflowClient(tracking_uri=uri).get_run(best.run_id).data.params.get("data.path")
    return register_best(uri, best.run_id, register_as or f"ray-pinet-{Path(base.data.path).name}",
                         sweep=name, trial_dir=str(sweep_dir), objective=best.objective, data_path=data_path)


SEQUENCE_SWEEP = SweepKind(
    check_space=check_space, resolve=resolve_trial, trial_fn=trial_fn, max_t=max_t,
    default_name=lambda space_path, space, base: f"tune-{Path(space_path).stem}-{Path(base.data.path).name}",
    reference=reference_run, register=register, objective_name=lambda space: None, write_report=write_report,
)
