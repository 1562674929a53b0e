"""The one driver of both training kinds: data -> TorchTrainer.fit -> MLflow run.

``fit(cfg)`` finds the kind of ``cfg`` (``ray_pinet/kinds``), lets it prepare and check its data,
runs its loop on ``run.num_workers`` Ray Train workers (``worker.train_func``) and summarises and
logs the result. Relaunching with the same ``run.name`` and ``run.storage_path`` resumes: Ray
Train V2 hands the latest checkpoint of that run to the workers (``ray.train.get_checkpoint``),
and the MLflow run tagged with that name is reopened.

Ray is imported here and in ``worker.py`` (``training/__init__.py`` lists the lazy uses elsewhere).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ray_pinet.kinds import kind_of
from ray_pinet.local_ray import start_ray
from ray_pinet.storage_uri import check_reachable, local_or_uri, run_storage, uri_of
from ray_pinet.tracking import mlflow_utils as mu
from ray_pinet.training.checkpoint import load_state
from ray_pinet.training.device import backend_for
from ray_pinet.training.kind import FitResult, Kind
from ray_pinet.training.resume import RESUME_FREE, check_resume
from ray_pinet.training.run_inputs import absolute_checkpoint_paths
from ray_pinet.training.worker import train_func


def fit(cfg: Any, progress: Optional[bool] = None, parent_run_id: Optional[str] = None,
        tags: Optional[dict[str, str]] = None, callbacks: Optional[list] = None, fresh: bool = False,
        **kind_args: Any) -> FitResult:
    """Train ``cfg`` (a TrainConfig or TwoTowerConfig) on Ray Train and log it to MLflow (a child
    of ``parent_run_id`` when given). A method that is several runs (``separate`` / ``finetune``,
    ``training/per_stratum.py``; ``kind_args``: its ``base_checkpoint``) calls ``fit`` per run.
    ``callbacks``: ``ray.train.UserCallback``s of the Train run (a Tune trial forwards its
    reports with one). A run name with a checkpoint resumes it if its config is this one
    (``training/resume.py``); ``fresh``: move that run folder aside and train anew."""
    kind = kind_of(cfg)
    cfg = absolute_checkpoint_paths(cfg)
    multi = kind.multi_run(cfg)
    if multi is not None:
        return multi(cfg, fit, progress=progress, parent_run_id=parent_run_id, tags=tags, fresh=fresh,
                     **kind_args)
    return fit_run(kind, cfg, progress, parent_run_id, tags, callbacks, fresh)


def fit_run(kind: Kind, cfg: Any, progress: Optional[bool], parent_run_id: Optional[str],
            tags: Optional[dict[str, str]], callbacks: Optional[list], fresh: bool) -> FitResult:
    import ray

    progress = cfg.run.progress if progress is None else progress
    path = kind.prepare(cfg, progress)
    meta = kind.check(cfg, path)
    storage = local_or_uri(cfg.run.storage_path)
    check_reachable(storage, "run.storage_path")
    _check_resume(kind, cfg, meta, storage, fresh)
    if not ray.is_initialized():
        start_ray()
    config_dict = cfg.to_dict()
    uri, run_id, mlflow_info = start_tracking(
        cfg.tracking, cfg.run.name, config_dict, storage, parent_run_id,
        {**kind.tags(cfg), "data": str(path), **(tags or {})}, [path / f for f in kind.data_files], fresh=fresh)
    loop_config = {"kind": kind.name, "cfg": config_dict, "meta": meta, "mlflow": mlflow_info,
                   "data_path": str(Path(path).resolve())}
    trainer = torch_trainer(train_func, loop_config, cfg.run, storage, callbacks=callbacks)
    ckpt = fit_to_checkpoint(trainer, cfg.run.name, uri, run_id)
    with ckpt.as_directory() as d:
        snap = load_state(d)
    final, history = kind.summarise(cfg, snap)
    out = FitResult(cfg, final, history, uri_of(ckpt.filesystem, ckpt.path), run_id, uri, meta=meta)
    if uri and run_id:
        out.model_uri = kind.log_outputs(cfg, meta, path, snap, final, history, uri, run_id)
        mu.finish_run(uri, run_id)
    return out


def _check_resume(kind: Kind, cfg: Any, meta: Any, storage: str, fresh: bool) -> None:
    """``resume.check_resume``: the config, and what the kind checks of the data, against the
    checkpoint a relaunch would resume."""
    stored: dict = {}

    def checkpoint_config(ckpt: Path) -> dict:
        stored.update(load_state(str(ckpt)))
        return stored["config"]

    try:
        check_resume(kind.config_class, cfg, storage, checkpoint_config, fresh=fresh,
                     extra=lambda _ckpt: kind.data_changes(cfg, meta, stored))
    finally:
        stored.clear()  # the checkpoint's weights: not kept on the driver for the whole run


def start_tracking(tracking, run_name: str, config_dict: dict, storage: str, parent_run_id: Optional[str],
                   tags: dict[str, str], data_files: list[Path],
                   fresh: bool = False) -> tuple[Optional[str], Optional[str], Optional[dict]]:
    """(tracking URI, run id, the workers' MLflow info) of a new or resumed run named ``run_name``
    (all None with ``tracking.enabled=false``); a new run gets the existing ``data_files``.
    ``fresh``: always a new MLflow run (the run's training starts anew)."""
    if not tracking.enabled:
        return None, None, None
    uri = mu.resolve_tracking_uri(tracking.tracking_uri, storage)
    run_id, resumed = mu.start_or_resume_run(uri, tracking.experiment, run_name, config_dict, tags=tags,
                                             parent_run_id=parent_run_id, fresh=fresh, free=RESUME_FREE)
    if not resumed:
        for f in data_files:
            if f.exists():
                mu.log_artifact(uri, run_id, f, "data")
    return uri, run_id, {"tracking_uri": uri, "run_id": run_id}


def torch_trainer(train_loop, loop_config: dict, run, storage: str, callbacks: Optional[list] = None):
    """The TorchTrainer of a run section: ``run.num_workers`` workers, each with
    ``run.gpus_per_worker`` GPUs (0: CPU workers) and collectives on nccl when they hold GPUs,
    gloo otherwise; a checkpoint kept per report (the last two), ``run.max_failures`` restarts.
    No Ray Datasets: each worker reads its own block of the data files (training/shards.py)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = run.gpus_per_worker > 0
    resources = {"CPU": run.cpus_per_worker, **({"GPU": run.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=backend_for("cuda" if use_gpu else "cpu"),
                                 timeout_s=run.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run.name, **run_storage(storage), checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             callbacks=callbacks or None),
    )


def fit_to_checkpoint(trainer, name: str, uri: Optional[str], run_id: Optional[str]):
    """``trainer.fit()`` -> its last checkpoint; the MLflow run is marked FAILED if the fit raises."""
    with mu.failed_on_error(uri, run_id):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {name!r} ended without a checkpoint")
    return result.checkpoint
