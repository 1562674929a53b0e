"""The training config: one validated dataclass tree, resolved once and carried everywhere.

``TrainConfig.from_yaml(path, overrides)`` is what the CLI, jobs, Tune trials and tests use;
``to_dict()`` is what travels with checkpoints and MLflow runs (``config.json``).
Every field has a default so a config file only states its difference from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ray_pinet.config_base import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from ray_pinet.models.config import ModelConfig, PluginConfig

METHODS = ("joint", "pinet")


@dataclass
class DataSection:
    # A directory written by `ray-pinet prepare` (docs/design.md has its layout).
    path: str = "prepared/ml-latest-small"
    # Optional prepare config: when `path` does not hold prepared data yet, train runs prepare first.
    prepare: Optional[str] = None


@dataclass
class GAConfig:
    """Gradient Aggregation, methods.md §1.2 and §1.6.

    prior: user_share / uniform / interaction_share (= joint training) / power:
    pi_s ∝ c_s^(1-alpha) * n_s^alpha with c_s the stratum's share of the global batch's units
    and n_s its share of training users (alpha = 0 is joint, 1 is user_share, < 0 head-heavy).
    unit: what one sample is in g = Σ_s π_s ḡ_s: a target position, or a user window whose loss
    is the mean over its positions.
    reduce: loss_weighted folds π_s/N_s into each sample's loss after a K-float count all-reduce,
    then all-reduces one flat gradient; stratum_sums backpropagates each stratum's loss sum and
    all-reduces [K gradient sums | K counts] in one flat buffer (the literal formulation; K× the
    traffic and K backward passes). Both are exact; tests prove they agree.
    """

    prior: Literal["user_share", "uniform", "interaction_share", "power"] = "power"
    alpha: float = 0.0
    unit: Literal["position", "user"] = "position"
    reduce: Literal["loss_weighted", "stratum_sums"] = "loss_weighted"


@dataclass
class Stage2Config:
    """PINet stage 2: one plugin per stratum on its own stratum's data (methods.md §1.4, §1.6)."""

    enabled: bool = True
    plugin: PluginConfig = field(default_factory=PluginConfig)
    freeze_backbone: bool = True
    backbone_lr_scale: float = 0.1  # only when freeze_backbone is false
    lr: float = 1e-3
    max_epochs: int = 20
    patience: int = 3  # per plugin, on its own stratum's validation metric
    max_minutes: float = 0.0  # 0 = no limit on stage 2's training time
    # Users not seen in training are routed to this stratum's plugin (0 = tail).
    unseen_stratum: int = 0

    def validate(self) -> None:
        if self.backbone_lr_scale < 0 or self.lr <= 0:
            raise ConfigError("lr must be > 0 and backbone_lr_scale >= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Global batch in training rows (user windows), split across workers by sample id.
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 5  # evaluations without improvement of the selection metric
    grad_clip: float = 0.0  # 0 = off; applied to the combined (global) gradient
    max_minutes: float = 0.0  # 0 = no limit; stage 1 stops at the next epoch boundary after it

    def validate(self) -> None:
        if self.batch_size < 1 or self.max_epochs < 1 or self.lr <= 0:
            raise ConfigError("batch_size and max_epochs must be >= 1 and lr > 0")


@dataclass
class EvalConfig:
    k: int = 10
    every: int = 1  # validate every n epochs
    batch_size: int = 256
    # Model selection (early stopping) uses this validation metric of the "all" slice.
    select_metric: Literal["ndcg", "hr", "auc", "gauc"] = "ndcg"
    # 0 = rank the full catalogue (history items masked); >0 = the prepared sampled candidates.
    candidates: int = 0


@dataclass
class TrackingConfig:
    # None: $MLFLOW_TRACKING_URI if set, else a SQLite store in the run storage directory.
    tracking_uri: Optional[str] = None
    experiment: str = "ray-pinet"
    log_model: bool = True
    enabled: bool = True


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

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError("cpus_per_worker must be > 0")


@dataclass
class TrainConfig:
    method: Literal["joint", "pinet"] = "pinet"
    loss: Literal["ce", "bce"] = "ce"
    data: DataSection = field(default_factory=DataSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    ga: GAConfig = field(default_factory=GAConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> None:
        if self.loss == "ce" and self.model.backbone == "din":
            raise ConfigError("loss 'ce' ranks the full catalogue at every position; din needs loss: bce")
        if self.model.backbone == "din" and self.eval.candidates == 0:
            raise ConfigError(
                "din scores (history, target) pairs and cannot rank the full catalogue cheaply: "
                "set eval.candidates > 0 (and samples.eval_candidates in prepare)"
            )
        if not math.isfinite(self.ga.alpha):
            raise ConfigError("ga.alpha must be finite")
        if self.run.init_from and self.method != "pinet":
            raise ConfigError("run.init_from starts pinet's stage 2 from a trained backbone; "
                              f"method is {self.method!r}")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "TrainConfig":
        return from_dict(cls, data or {})

    @classmethod
    def from_yaml(cls, path: str | Path | None, overrides: list[str] | None = None) -> "TrainConfig":
        raw = load_yaml(path) if path else {}
        return cls.from_dict(apply_overrides(raw, overrides))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @property
    def stage1_is_joint(self) -> bool:
        """True when pinet's stage 1 computes exactly joint training's gradient: the GA prior is
        the batch's interaction share (power with alpha = 0, or interaction_share itself)."""
        return self.ga.prior == "interaction_share" or (self.ga.prior == "power" and self.ga.alpha == 0.0)

    @property
    def uses_plugins(self) -> bool:
        return self.method == "pinet" and self.stage2.enabled
