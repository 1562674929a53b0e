"""What runs on each Ray Train worker: shards in, Engine, reports and checkpoints out.

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


class ShardBySampleId:
    """Ray Data ingest: rank r of W receives the rows with ``sample_id % W == r`` of every split.

    Unlike the default ``streaming_split(equal=True)`` this drops no rows and is a fixed
    function of (sample_id, W), which is what makes W workers compute exactly what one process
    computes (see ``batches.py``). Built lazily as a ``ray.train.DataConfig`` subclass so this
    module imports without Ray.
    """

    @staticmethod
    def make():
        import ray.train

        class _ShardBySampleId(ray.train.DataConfig):
            def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
                out = [{} for _ in range(world_size)]
                for name, ds in datasets.items():
                    for r in range(world_size):
                        out[r][name] = ds.map_batches(
                            _keep_residue, fn_kwargs={"rank": r, "world": world_size},
                            batch_format="pyarrow", batch_size=None,
                        ).iterator()
                return out

        return _ShardBySampleId(datasets_to_split=[])


def _keep_residue(batch: pa.Table, rank: int, world: int) -> pa.Table:
    import numpy as np

    ids = batch.column("sample_id").to_numpy()
    return batch.filter(pa.array(np.asarray(ids % world == rank)))


def _read_shard(name: str) -> pa.Table:
    import ray.train

    from ray.data import DataContext

    # One console line per epoch from rank 0 says more than W interleaved Ray Data bars.
    DataContext.get_current().enable_progress_bars = False
    it = ray.train.get_dataset_shard(name)
    parts = list(it.iter_batches(batch_format="pyarrow", batch_size=8192))
    if not parts:
        raise ValueError(f"worker received no rows of split {name!r}")
    return pa.concat_tables(parts)


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
        cfg, meta, _read_shard("train"), _read_shard("valid"), _read_shard("test"),
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
