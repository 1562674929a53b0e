"""What runs on each Ray Train worker: its block of the data in, Engine, reports and checkpoints out.

This file, ``trainer.py`` and ``twotower_trainer.py`` are the only ones that import Ray Train.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import torch

from ray_pinet.config import TrainConfig
from ray_pinet.training.engine import Engine, RunMeta

STATE_FILE = "state.pt"


def _read_shard(path: str, name: str, rank: int, world: int) -> pa.Table:
    """This rank's block of split ``name`` (training/shards.py): only the row groups it holds."""
    from ray_pinet.training.shards import read_shard

    table, _ = read_shard(Path(path), name, rank, world)
    return table


def load_state(checkpoint_dir: str) -> dict:
    """The engine snapshot (``state.pt``) of a checkpoint directory, on the CPU. Loaded with
    ``weights_only=True`` (``checkpoint_io``): a file holding anything but tensors and plain values
    is refused (``RefusedCheckpoint``, a ``DataError`` naming it) and nothing in it runs."""
    from ray_pinet import storage_uri
    from ray_pinet.checkpoint_io import load_weights

    if storage_uri.is_remote(checkpoint_dir):  # a checkpoint in object storage (run.storage_path)
        uri = storage_uri.join(checkpoint_dir, STATE_FILE)
        with tempfile.TemporaryDirectory() as tmp:
            return load_weights(storage_uri.download_file(uri, Path(tmp) / STATE_FILE), label=uri)
    return load_weights(os.path.join(checkpoint_dir, STATE_FILE))


def load_backbone_state(checkpoint_dir: str) -> dict:
    """The backbone weights (``backbone.`` keys, prefix removed) of a run's checkpoint."""
    snap = load_state(checkpoint_dir)
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in snap["model"].items() if k.startswith(prefix)}


def mlflow_key(key: str) -> str:
    # MLflow metric names allow letters, digits, _ - . / and spaces, not '@'.
    return key.replace("@", "_at_")


def _mlflow_logger(info: Optional[dict]):
    if not info:
        return lambda metrics, step: None
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=info["tracking_uri"])
    run_id = info["run_id"]

    def log(metrics: dict, step: int) -> None:
        import time

        ts = int(time.time() * 1000)
        batch = [Metric(mlflow_key(k), float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        for i in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
            client.log_batch(run_id, metrics=batch[i : i + 900])

    return log


def train_func(config: dict[str, Any]) -> None:
    import ray.train

    from ray_pinet.checkpoint_io import save_weights

    cfg = TrainConfig.from_dict(config["train"])
    meta = RunMeta(**config["meta"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.run.torch_threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)

    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = load_state(d)

    def report(metrics: dict, snap: Optional[dict]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if snap is None:
            ray.train.report(clean)
            return
        d = tempfile.mkdtemp(prefix="ray-pinet-ckpt-")
        try:
            save_weights(snap, os.path.join(d, STATE_FILE))
            ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    init_backbone = warm_backbone = None
    if resume is None and cfg.run.init_from:
        init_backbone = load_backbone_state(cfg.run.init_from)
    if resume is None and cfg.run.warm_start:
        warm_backbone = load_backbone_state(cfg.run.warm_start)

    from ray_pinet.training.device import resolve_device

    # Once per worker: Ray Train has set this worker's CUDA device (run.gpus_per_worker) by now.
    device = resolve_device(cfg.run.device)
    engine = Engine(
        cfg, meta, *(_read_shard(config["data_path"], s, rank, world) for s in ("train", "valid", "test")),
        device=device,
        report=report,
        log=_mlflow_logger(config.get("mlflow")) if rank == 0 else (lambda m, s: None),
        # Train V2 patches print() into its logger and, when stdout is wrapped, also tees it:
        # every line reached the console twice. sys.__stdout__ takes exactly one of the paths.
        say=lambda s: print(f"[ray-pinet] {s}", flush=True, file=sys.__stdout__),
        resume_state=resume,
        init_backbone=init_backbone,
        warm_backbone=warm_backbone,
    )
    if resume is not None and rank == 0:
        print(f"[ray-pinet] resumed at stage {engine.state.stage}, epoch {engine.state.epoch} "
              f"(world size {world})", flush=True, file=sys.__stdout__)
    engine.run()
