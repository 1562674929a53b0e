"""The sections every kind of run shares (``tracking``, ``run``): the sequence kind's
``TrainConfig`` holds them as they are, ``TwoTowerConfig`` subclasses them for its defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Optional

from ray_pinet.config_base import ConfigError, require

RUN_NAME_BAD = re.compile(r"[/\\'\"`\x00-\x1f\x7f]")


@dataclass
class TrackingConfig:
    # None: $MLFLOW_TRACKING_URI if set, else a SQLite store in the run storage directory.
    tracking_uri: Optional[str] = None
    experiment: str = "ray-pinet"
    log_model: bool = True
    enabled: bool = True
    # Registered-model name: when set, `train` registers the finished run's served model as a
    # new version of it in the MLflow Model Registry (needs log_model). None: nothing registered.
    register_as: Optional[str] = None

    def validate(self) -> None:
        require(bool(self.experiment.strip()), "experiment", "a non-empty name", self.experiment)
        require(self.tracking_uri is None or bool(self.tracking_uri.strip()), "tracking_uri",
                "a URI or null", self.tracking_uri)
        if self.register_as is not None:
            require(bool(self.register_as.strip()), "register_as", "a model name or null", self.register_as)
            # Registering happens after training: refused here, not after the run.
            require(self.enabled and self.log_model, "register_as",
                    "unset unless tracking.enabled and tracking.log_model are true", self.register_as)


@dataclass
class RunSection:
    name: str = "ml-latest-small-pinet"
    storage_path: str = "runs"  # Ray Train storage: checkpoints live in <storage_path>/<name>
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    seed: int = 0
    torch_threads: int = 0  # 0 = cores / workers
    max_failures: int = 0
    progress: bool = True
    collective_timeout_s: int = 600
    # Checkpoint directory (holding state.pt) of a finished run whose trained backbone starts
    # this pinet run: stage 1 is skipped. `train --method joint --method pinet` sets it to the
    # joint run when pinet's stage 1 would be joint training (ga prior power/alpha=0 or
    # interaction_share): same data, model and schedule give the same backbone, so it is
    # trained once. The path must be readable by every worker (shared storage on a cluster).
    init_from: Optional[str] = None
    # Checkpoint directory of a finished run whose backbone *initialises* stage 1 (which then
    # trains as usual): how `finetune` continues from joint's backbone.
    warm_start: Optional[str] = None
    # Where each worker trains (training/device.py): auto = the GPU Ray Train reserved for the
    # worker (run.gpus_per_worker > 0), else cpu; outside Ray (the Ray-free Engine) cuda when
    # torch sees one. cuda without a GPU (or in a Ray worker without a reserved one) is an error.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # GPUs Ray reserves per worker (fractions share a GPU); 0 = CPU workers (use_gpu off).
    gpus_per_worker: float = 0.0
    # bf16: the forward and the loss run under bfloat16 autocast (parameters, GA weights, the
    # reduced gradient and the optimizer stay fp32/fp64). Changes the results: not resume-free.
    precision: Literal["fp32", "bf16"] = "fp32"
    # A worker's training rows stay on its device when they take at most this many MB there;
    # larger shards stay in host memory (pinned on CUDA) and each batch is copied, one ahead.
    device_data_mb: float = 2048.0

    def validate(self) -> None:
        # The name is a folder under storage_path and an MLflow tag searched by value.
        require(bool(self.name) and self.name not in (".", "..") and not RUN_NAME_BAD.search(self.name),
                "name", "a non-empty name without / \\ quotes or control characters", self.name)
        require(bool(self.storage_path.strip()), "storage_path", "a directory", self.storage_path)
        require(self.num_workers >= 1, "num_workers", ">= 1", self.num_workers)
        if self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker must be > 0", key="cpus_per_worker")
        require(0 <= self.seed < 2**63, "seed", "in [0, 2^63)", self.seed)
        require(self.torch_threads >= 0, "torch_threads", ">= 0 (0 = cores / workers)", self.torch_threads)
        require(self.max_failures >= -1, "max_failures", ">= 0 (or -1: retry without limit, as Ray Train)",
                self.max_failures)
        require(self.collective_timeout_s >= 1, "collective_timeout_s", ">= 1", self.collective_timeout_s)
        for key in ("init_from", "warm_start"):
            value = getattr(self, key)
            require(value is None or bool(value.strip()), key, "a checkpoint directory or null", value)
        require(self.gpus_per_worker >= 0, "gpus_per_worker", ">= 0 (0 = CPU workers)", self.gpus_per_worker)
        # A worker holding a GPU reservation while training on its CPU wastes the GPU silently.
        require(self.gpus_per_worker == 0 or self.device != "cpu", "gpus_per_worker",
                "0 when run.device is cpu (set run.device to cuda or auto to train on the GPUs)",
                self.gpus_per_worker)
        # NCCL needs one GPU per rank: workers sharing a GPU (fractions) fail to form the group.
        require(self.num_workers == 1 or self.gpus_per_worker == 0 or self.gpus_per_worker >= 1,
                "gpus_per_worker", "0 or >= 1 with more than one worker (NCCL needs a GPU per rank)",
                self.gpus_per_worker)
        require(self.device_data_mb >= 0, "device_data_mb",
                ">= 0 (0 = training rows always in host memory)", self.device_data_mb)
