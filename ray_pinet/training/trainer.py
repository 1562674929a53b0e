"""Driver side of ``ray-pinet train``: prepared data -> TorchTrainer.fit -> MLflow run.

Relaunching with the same ``run.name`` and ``run.storage_path`` resumes: Ray Train V2 hands the
latest checkpoint of that run to the workers (``ray.train.get_checkpoint``), and the MLflow
run tagged with that name is reopened.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from ray_pinet.config import TrainConfig
from ray_pinet.evaluation.protocol import slice_names
from ray_pinet.training.engine import RunMeta
from ray_pinet.training.worker import STATE_FILE, ShardBySampleId, load_state, train_func

SPLITS = ("train", "valid", "test")


@dataclass
class FitResult:
    config: Any  # TrainConfig (TwoTowerConfig for `ray-pinet twotower` runs)
    final: dict[str, float]
    history: list[dict]
    checkpoint_path: Optional[str]
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    model_uri: Optional[str] = None
    meta: Optional[RunMeta] = None
    extra: dict[str, Any] = field(default_factory=dict)


def init_local_ray() -> None:
    """Start a local Ray instance (no ``RAY_ADDRESS``) or join the cluster it names.

    Locally we advertise at least 4 logical CPUs: Train workers and the controller hold CPU
    reservations, and on a 2-core box Ray Data's ingest would otherwise get a budget of zero
    and stall (ray-notes §6). The work itself is still bounded by the real cores.
    """
    import ray

    env_vars = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
                # Ray Data bars from every worker interleave into noise; the workers print one
                # line per epoch instead.
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    if os.environ.get("RAY_ADDRESS"):
        # A cluster: gloo must use the nodes' real interface (set GLOO_SOCKET_IFNAME in the node
        # environment if it needs choosing: cluster/ manifests do), never loopback. Keys already
        # in our environment came with the job's runtime_env, and Ray refuses a driver
        # runtime_env that sets them again.
        ray.init(runtime_env={"env_vars": {k: v for k, v in env_vars.items() if k not in os.environ}})
    else:
        # One machine: gloo over loopback (its default interface lookup fails in containers).
        # The dashboard serves the State API that Train V2's PlacementGroupCleaner polls
        # (without it: a warning every few seconds and no clean-up of orphaned placement
        # groups) and the Ray dashboard users expect; loopback only. The cleaner finds the State
        # API by auto-detection, which with a second Ray instance on the machine picks the other
        # one, does not find our controller there and removes our workers' placement group
        # (seen: a retrain beside a `ray start --head` cluster died with "placement group was
        # removed"); naming our dashboard in the workers' environment pins it to ours.
        port = free_local_port(8265)
        env = {"env_vars": {**env_vars, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}}
        # address="local": always a new instance. Without it ray.init joins a `ray start`
        # cluster running on this host, with loopback gloo and a dashboard port it rejects.
        ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=port, runtime_env=env)


def free_local_port(preferred: int) -> int:
    """``preferred`` when it is free on 127.0.0.1, else a free port the OS picks."""
    import socket

    for candidate in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free TCP port on 127.0.0.1")


def ensure_prepared(cfg: TrainConfig, progress: bool = True) -> Path:
    """The prepared-data directory, running ``prepare`` first when it is missing."""
    path = Path(cfg.data.path)
    if (path / "strata.json").exists():
        return path
    if not cfg.data.prepare:
        raise FileNotFoundError(
            f"no prepared data at {path} (no strata.json): run `ray-pinet prepare` first "
            "or set data.prepare to a prepare config"
        )
    from ray_pinet.config_base import apply_overrides, from_dict, load_yaml
    from ray_pinet.data.config import PrepareConfig
    from ray_pinet.data.pipeline import prepare

    raw = apply_overrides(load_yaml(cfg.data.prepare), [f"output={path}"])
    prepare(from_dict(PrepareConfig, raw), progress=progress)
    return path


def load_run_meta(path: Path) -> RunMeta:
    strata = json.loads((path / "strata.json").read_text())
    pconf = json.loads((path / "prepare_config.json").read_text())
    items = pq.ParquetFile(path / "items.parquet").metadata.num_rows
    n_train = sum(pq.ParquetFile(f).metadata.num_rows for f in sorted((path / "train").glob("*.parquet")))
    return RunMeta(
        num_items=int(items),
        num_strata=int(strata["num_strata"]),
        num_train_samples=int(n_train),
        user_share=[float(x) for x in strata["priors"]["user_share"]],
        interaction_share=[float(x) for x in strata["priors"]["interaction_share"]],
        train_negatives=int(pconf["samples"]["train_negatives"]),
        strata=strata,
    )


def _check_compatible(cfg: TrainConfig, meta: RunMeta, path: Path) -> None:
    pconf = json.loads((path / "prepare_config.json").read_text())
    L = int(pconf["samples"]["max_len"])
    if cfg.model.max_len != L:
        raise ValueError(f"model.max_len={cfg.model.max_len} but {path} was prepared with samples.max_len={L}")
    if cfg.eval.candidates and int(pconf["samples"]["eval_candidates"]) < cfg.eval.candidates:
        raise ValueError(
            f"eval.candidates={cfg.eval.candidates} but {path} holds "
            f"{pconf['samples']['eval_candidates']} sampled candidates per row"
        )


def read_splits(path: Path) -> dict:
    """The three prepared splits as Ray Datasets (read lazily, sharded in ``ShardBySampleId``).

    Ray 2.60's DataSourceV2 Parquet reader plans each execution with a ListFiles task that took
    8 s per dataset on a 2-core node (6 executions per 2-worker fit: ~60 s before the first
    step, benchmarks/results/ingest.md); the V1 reader lists on the driver and its executions
    take 0.1-0.5 s once workers are warm. The flag is read when the dataset is planned, so it
    is set here, on the driver, for these reads only. Each Dataset deep-copies the context when
    it is created, so the workers' shard iterators also get no progress bars: theirs never
    closed and were redrawn into the console for the whole run; rank 0 prints one line per
    epoch instead.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous = ctx.use_datasource_v2, ctx.enable_progress_bars
    ctx.use_datasource_v2, ctx.enable_progress_bars = False, False
    try:
        return {s: ray.data.read_parquet(str((path / s).resolve())) for s in SPLITS}
    finally:
        ctx.use_datasource_v2, ctx.enable_progress_bars = previous


def check_init_from(cfg: TrainConfig, meta: RunMeta, key: str = "init_from") -> None:
    """run.init_from / run.warm_start must be a finished checkpoint of the same model on the
    same data."""
    where = getattr(cfg.run, key)
    state = Path(where) / STATE_FILE
    if not state.exists():
        raise ValueError(f"run.{key}={where!r}: no {STATE_FILE} there")
    snap = load_state(where)
    other = TrainConfig.from_dict(snap["config"])
    if other.model != cfg.model:
        raise ValueError(f"run.{key}={where!r} holds model {other.model}, this run has {cfg.model}")
    if Path(other.data.path).resolve() != Path(cfg.data.path).resolve() or snap["meta"]["num_items"] != meta.num_items:
        raise ValueError(f"run.{key}={where!r} was trained on {other.data.path}, "
                         f"this run reads {cfg.data.path}")
    if snap["engine"].get("stage", 1) != 3:
        raise ValueError(f"run.{key}={where!r} is not a finished run (stage "
                         f"{snap['engine'].get('stage')}): finish or resume it first")


def absolute_checkpoint_paths(cfg: TrainConfig) -> TrainConfig:
    """``run.init_from`` / ``run.warm_start`` as absolute paths: the driver checks them relative
    to its working directory, but Ray Train workers run in directories of their own."""
    paths = {k: str(Path(v).expanduser().resolve()) for k in ("init_from", "warm_start")
             if (v := getattr(cfg.run, k))}
    return replace(cfg, run=replace(cfg.run, **paths)) if paths else cfg


def fit(
    cfg: TrainConfig,
    progress: Optional[bool] = None,
    parent_run_id: Optional[str] = None,
    tags: Optional[dict[str, str]] = None,
    base_checkpoint: Optional[str] = None,
    callbacks: Optional[list] = None,
) -> FitResult:
    """Train one run of ``cfg`` on Ray Train and log it to MLflow (a child of ``parent_run_id``
    when given). ``separate`` / ``finetune`` are K runs, one per stratum: see ``per_stratum``
    (``base_checkpoint``: the joint run that ``finetune`` starts from; trained first if None).
    ``callbacks``: ``ray.train.UserCallback``s of the Train run (a Tune trial forwards its
    reports with one)."""
    from ray_pinet.config import PER_STRATUM_METHODS

    cfg = absolute_checkpoint_paths(cfg)

    if cfg.method in PER_STRATUM_METHODS:
        from ray_pinet.training.per_stratum import fit_per_stratum

        return fit_per_stratum(cfg, base_checkpoint, progress=progress, parent_run_id=parent_run_id, tags=tags)
    import ray

    from ray_pinet.tracking import mlflow_utils as mu

    progress = cfg.run.progress if progress is None else progress
    path = ensure_prepared(cfg, progress=progress)
    meta = load_run_meta(path)
    _check_compatible(cfg, meta, path)
    if cfg.run.init_from:
        check_init_from(cfg, meta)
    if cfg.run.warm_start:
        check_init_from(cfg, meta, "warm_start")
    if not ray.is_initialized():
        init_local_ray()
    storage = str(Path(cfg.run.storage_path).expanduser().resolve())
    config_dict = cfg.to_dict()

    uri, run_id, mlflow_info = start_tracking(
        cfg.tracking, cfg.run.name, config_dict, storage, parent_run_id,
        {"method": cfg.method, "backbone": cfg.model.backbone, "data": str(path), **(tags or {})},
        [path / name for name in ("strata.json", "report.json", "prepare_config.json")])
    trainer = torch_trainer(
        train_func, {"train": config_dict, "meta": meta.__dict__, "mlflow": mlflow_info}, cfg.run, storage,
        callbacks=callbacks, datasets=read_splits(path), dataset_config=ShardBySampleId.make())
    ckpt = fit_to_checkpoint(trainer, cfg.run.name, uri, run_id)
    with ckpt.as_directory() as d:
        snap = load_state(d)
    history = snap["engine"]["history"]
    final = {k: v for k, v in history[-1].items() if k != "step"}
    out = FitResult(cfg, final, history, ckpt.path, run_id, uri, meta=meta)
    if uri and run_id:
        out.model_uri = _log_run_outputs(cfg, meta, path, snap, final, history, uri, run_id)
        mu.finish_run(uri, run_id)
    return out


def start_tracking(tracking, run_name: str, config_dict: dict, storage: str, parent_run_id: Optional[str],
                   tags: dict[str, str], data_files: list[Path]) -> tuple[Optional[str], Optional[str], Optional[dict]]:
    """(tracking URI, run id, the workers' MLflow info) of a new or resumed run named ``run_name``
    (all None with ``tracking.enabled=false``); a new run gets the existing ``data_files``."""
    from ray_pinet.tracking import mlflow_utils as mu

    if not tracking.enabled:
        return None, None, None
    uri = mu.resolve_tracking_uri(tracking.tracking_uri, storage)
    run_id, resumed = mu.start_or_resume_run(uri, tracking.experiment, run_name, config_dict, tags=tags,
                                             parent_run_id=parent_run_id)
    if not resumed:
        for f in data_files:
            if f.exists():
                mu.log_artifact(uri, run_id, f, "data")
    return uri, run_id, {"tracking_uri": uri, "run_id": run_id}


def torch_trainer(train_loop, loop_config: dict, run, storage: str, callbacks: Optional[list] = None, **data):
    """The TorchTrainer of a run section: gloo, ``run.num_workers`` workers, a checkpoint kept per
    report (the last two), ``run.max_failures`` restarts. ``data``: datasets / dataset_config."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="gloo", timeout_s=run.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=run.num_workers, resources_per_worker={"CPU": run.cpus_per_worker}),
        run_config=RunConfig(name=run.name, storage_path=storage, checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             callbacks=callbacks or None),
        **data,
    )


def fit_to_checkpoint(trainer, name: str, uri: Optional[str], run_id: Optional[str]):
    """``trainer.fit()`` -> its last checkpoint; the MLflow run is marked FAILED if the fit raises."""
    from ray_pinet.tracking import mlflow_utils as mu

    try:
        result = trainer.fit()
    except BaseException:
        if uri and run_id:
            mu.finish_run(uri, run_id, status="FAILED")
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {name!r} ended without a checkpoint")
    return result.checkpoint


def rebuild_model(snap: dict):
    """The trained RecModel from a checkpoint state (``state.pt``)."""
    from ray_pinet.models.registry import build_model

    cfg = TrainConfig.from_dict(snap["config"])
    meta = RunMeta(**snap["meta"])
    model = build_model(cfg.model, meta.num_items, meta.num_strata,
                        cfg.stage2.plugin if cfg.uses_plugins else None)
    model.load_state_dict(snap["model"])
    model.use_plugins = bool(snap.get("use_plugins", False))
    model.eval()
    return model, cfg, meta


def _log_run_outputs(cfg, meta, path, snap, final, history, uri, run_id) -> Optional[str]:
    from ray_pinet.tracking import mlflow_utils as mu
    from ray_pinet.tracking.plots import plot_activeness, plot_final_bars, plot_stratum_curves

    mu.log_metrics(uri, run_id, {k: v for k, v in final.items() if isinstance(v, (int, float))},
                   step=len(history))
    slices = slice_names(meta.num_strata)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plot_stratum_curves(history, slices, cfg.eval.k, tmp / "stratum_metrics.png")
        plot_final_bars(final, slices, cfg.eval.k, tmp / "test_metrics_by_stratum.png")
        users = pq.read_table(path / "users.parquet", columns=["activeness", "stratum"])
        plot_activeness(users.column("activeness").to_numpy(), users.column("stratum").to_numpy(),
                        tmp / "activeness_histogram.png", title=f"activeness ({path.name})")
        (tmp / "final_metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
        for f in ("stratum_metrics.png", "test_metrics_by_stratum.png", "activeness_histogram.png",
                  "final_metrics.json"):
            mu.log_artifact(uri, run_id, tmp / f, "plots" if f.endswith(".png") else None)
    if not cfg.tracking.log_model:
        return None
    # The served model takes item indices: its vocabulary travels with it (retrain needs it too).
    mu.log_artifact(uri, run_id, path / "items.parquet", "vocab")
    return log_served_model(cfg, meta.num_strata, rebuild_model(snap)[0], uri, run_id)


def log_served_model(cfg: TrainConfig, num_strata: int, model, uri: str, run_id: str) -> str:
    """Log ``model`` wrapped in ``ScoringModule`` (with an input example) to the run; its URI."""
    from ray_pinet.serving import ScoringModule
    from ray_pinet.tracking import mlflow_utils as mu

    example = np.zeros((2, 1 + cfg.model.max_len), dtype=np.int64)
    example[:, 0] = [0, num_strata - 1]
    example[:, -3:] = [[1, 2, 3], [3, 2, 1]]
    return mu.log_scoring_model(uri, run_id, ScoringModule(model, cfg.stage2.unseen_stratum), example)


def reuse_joint(cfg: TrainConfig, joint_checkpoint: Optional[str], joint_data: Optional[str],
                retrain_stage1: bool = False) -> Optional[str]:
    """Reuse a finished joint run where a method's first stage is joint training on the same
    data: pinet with a joint-equivalent stage 1 starts stage 2 from its backbone
    (``cfg.run.init_from`` is set in place, unless ``retrain_stage1``); ``finetune`` fine-tunes
    it (returned, for ``fit``'s ``base_checkpoint``). A run on other data (e.g. K = 4 buckets)
    trains its own."""
    if not joint_checkpoint or not joint_data or Path(cfg.data.path).resolve() != Path(joint_data).resolve():
        return None
    if cfg.method == "pinet" and cfg.stage1_is_joint and not cfg.run.init_from and not retrain_stage1:
        cfg.run.init_from = joint_checkpoint
    return joint_checkpoint if cfg.method == "finetune" else None


def format_table(final: dict[str, float], num_strata: int, k: int = 10, prefix: str = "test") -> str:
    """Per-stratum table of the final metrics (plain text, for the console and the README)."""
    slices = slice_names(num_strata)
    cols = [f"ndcg@{k}", f"hr@{k}", "auc", "gauc", "users"]
    lines = ["| slice | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in slices:
        vals = []
        for c in cols:
            v = final.get(f"{prefix}/{s}/{c}")
            vals.append("-" if v is None else (f"{int(v)}" if c == "users" else f"{v:.4f}"))
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
