"""What runs on each Ray Train worker, for either kind: the resumed checkpoint, the device, the
MLflow logger and Ray Train's report in; the kind's loop (``Kind.loop``) does the rest."""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import torch

from ray_pinet.kinds import kind_named
from ray_pinet.tracking import mlflow_utils as mu
from ray_pinet.training import checkpoint
from ray_pinet.training.device import resolve_device
from ray_pinet.training.kind import LoopContext


def mlflow_logger(info: Optional[dict]):
    """``log(metrics, step)`` into the run ``info`` names (a no-op without one)."""
    if not info:
        return lambda metrics, step: None
    return lambda metrics, step: mu.log_metrics(
        info["tracking_uri"], info["run_id"], {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step)


def train_func(config: dict[str, Any]) -> None:
    import ray.train

    kind = kind_named(config["kind"])
    cfg = kind.config_class.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.run.torch_threads or max(1, (os.cpu_count() or 1) // world))
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume = checkpoint.load_state(d)
    kind.loop(LoopContext(
        cfg=cfg, meta=config["meta"], data_path=config["data_path"], rank=rank, world=world,
        # Once per worker: Ray Train has set this worker's CUDA device (run.gpus_per_worker) by now.
        device=resolve_device(cfg.run.device),
        resume=resume, report=checkpoint.report,
        log=mlflow_logger(config.get("mlflow")) if rank == 0 else (lambda m, s: None),
        # Train V2 patches print() into its logger and, when stdout is wrapped, also tees it:
        # every line reached the console twice. sys.__stdout__ takes exactly one of the paths.
        say=lambda s: print(f"[ray-pinet] {s}", flush=True, file=sys.__stdout__),
    ))
