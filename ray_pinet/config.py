"""The training config: one validated dataclass tree, resolved once and carried everywhere.

``TrainConfig.from_yaml(path, overrides)`` is what the CLI, jobs, Tune trials and tests use;
``to_dict()`` is what travels with checkpoints and MLflow runs (``config.json``).
Every field has a default so a config file only states its difference from them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from ray_pinet.config_base import ConfigError, FileConfig, require
from ray_pinet.config_sections import RunSection, TrackingConfig
from ray_pinet.methods.needs import SEQUENCE_NEEDS, SequenceNeeds
from ray_pinet.models.config import ModelConfig, PluginConfig

# joint / pinet: one backbone. reweight: joint with static per-stratum sample weights (to the
# user-share prior). transfer: Yin et al. (methods.md §2). separate / finetune: one backbone per
# stratum (K runs of the trainer on one stratum's rows each, `training/per_stratum.py`).
# What each one needs: methods/needs.py.
Method = Literal["joint", "pinet", "separate", "finetune", "reweight", "transfer"]
METHODS = get_args(Method)
assert METHODS == tuple(SEQUENCE_NEEDS), "the config's Literal and the needs table name the same methods"


@dataclass
class DataSection:
    # A directory written by `ray-pinet prepare` (docs/design.md has its layout).
    path: str = "prepared/ml-latest-small"
    # Optional prepare config: when `path` does not hold prepared data yet, train runs prepare first.
    prepare: Optional[str] = None
    # Train on these strata's rows only (None = all). Evaluation always covers every stratum.
    # `separate` and `finetune` set it per stratum; exact under data-parallel training (the
    # global batches are drawn from the selected ids, identically on every rank).
    train_strata: Optional[list[int]] = None

    def validate(self) -> None:
        require(bool(self.path.strip()), "path", "a prepared-data directory", self.path)
        require(self.prepare is None or bool(self.prepare.strip()), "prepare",
                "a prepare config file or null", self.prepare)


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
    bucket_cap_mb: loss_weighted all-reduces the gradient in buckets of about this size while the
    backward still runs (25 MB: DDP's default); a parameter is never split, so a large item table
    is one bucket of its own.
    """

    prior: Literal["user_share", "uniform", "interaction_share", "power"] = "power"
    alpha: float = 0.0
    unit: Literal["position", "user"] = "position"
    reduce: Literal["loss_weighted", "stratum_sums"] = "loss_weighted"
    bucket_cap_mb: float = 25.0


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
    # Which trained plugins are served (frozen backbone). best: plugin s's best epoch whenever it beat the
    # backbone on stratum s's validation users at all. significant: only when the paired-bootstrap interval
    # (keep_level) of that gain over the stratum's validation users lies above zero; otherwise stratum s keeps
    # the backbone's scores (identity plugin). On ml-latest-small (122 head / 488 tail validation users)
    # plugins kept by "best" lowered test NDCG@10 in 2 of 3 seeds (docs/results.md).
    keep: Literal["best", "significant"] = "best"
    keep_level: float = 0.95
    keep_draws: int = 1000

    def validate(self) -> None:
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.backbone_lr_scale >= 0, "backbone_lr_scale", ">= 0", self.backbone_lr_scale)
        require(self.max_epochs >= 1, "max_epochs", ">= 1", self.max_epochs)
        require(self.patience >= 1, "patience", ">= 1 (evaluations without improvement)", self.patience)
        require(self.max_minutes >= 0, "max_minutes", ">= 0 (0 = no limit)", self.max_minutes)
        require(self.unseen_stratum >= 0, "unseen_stratum", "a stratum id >= 0", self.unseen_stratum)
        require(0.0 < self.keep_level < 1.0, "keep_level", "in (0, 1)", self.keep_level)
        require(self.keep_draws >= 100, "keep_draws", ">= 100", self.keep_draws)


@dataclass
class FinetuneConfig:
    """``finetune`` (baseline): joint training, then one copy of the backbone per stratum trained
    on that stratum's rows only (no GA), selected on that stratum's validation metric."""

    lr: float = 1e-4
    max_epochs: int = 20
    patience: int = 2
    max_minutes: float = 0.0

    def validate(self) -> None:
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.max_epochs >= 1, "max_epochs", ">= 1", self.max_epochs)
        require(self.patience >= 1, "patience", ">= 1 (evaluations without improvement)", self.patience)
        require(self.max_minutes >= 0, "max_minutes", ">= 0 (0 = no limit)", self.max_minutes)


@dataclass
class ReweightConfig:
    """``reweight`` (baseline): static per-stratum weights w_s = (n_s / C_s)^power, n_s the stratum's share of
    training users and C_s its share of training interactions (strata.json); the loss is the w-weighted mean
    over the global batch. power 1 = reweighted to the user-share prior (tail up-weighted); 0 = joint."""

    power: float = 1.0


@dataclass
class TransferConfig:
    """``transfer`` (baseline): Yin et al., KDD 2020, methods.md §2 (first-order Reptile over user
    tasks + head/tail discriminator behind gradient reversal).

    One iteration: ``trajectories`` parallel inner loops of ``inner_steps`` tasks each (a task =
    ``users_per_task`` training rows of distinct users), fresh inner Adam (``inner_lr``) per trajectory; outer
    update θ ← θ + outer_lr · mean_j(θ_k^j − θ_0). One epoch visits every training row once. ``trajectories``
    must be a multiple of the worker count: trajectory j takes the j-th of ``trajectories`` contiguous blocks
    of sample ids, inside one rank's block whatever W (training/shards.py).
    """

    inner_steps: int = 5
    inner_lr: float = 1e-3
    outer_lr: float = 1.0
    users_per_task: int = 1
    trajectories: int = 4
    adv_weight: float = 0.1  # λ; 0 disables the adversarial part
    disc_hidden: int = 0  # 0 = model.dim

    def validate(self) -> None:
        if min(self.inner_steps, self.users_per_task, self.trajectories) < 1:
            raise ConfigError("transfer.inner_steps, users_per_task and trajectories must be >= 1")
        if self.inner_lr <= 0 or self.outer_lr <= 0 or self.adv_weight < 0:
            raise ConfigError("transfer.inner_lr and outer_lr must be > 0, adv_weight >= 0")
        require(self.disc_hidden >= 0, "disc_hidden", ">= 0 (0 = model.dim)", self.disc_hidden)


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
    # How a rank lays out its windows of a global batch. padded: one left-padded row of max_len
    # per window. packed: windows side by side in rows without padding (training/packing.py;
    # sasrec only; same global batches, same GA gradient up to float rounding). auto: packed
    # where the backbone and method allow it (sasrec, not transfer), else padded.
    batching: Literal["auto", "padded", "packed"] = "auto"
    # How the item table's gradient crosses workers in stage 1 (stage 2 keeps dense). dense: with
    # every other parameter (one flat all-reduce). rows: only the rows some rank touched, stepped by lazy Adam
    # (torch.optim.SparseAdam; training/sparse_rows.py): a step's cost no longer grows with the
    # catalogue. Needs a sampled loss (bce, sampled_softmax), weight_decay 0 and grad_clip 0.
    item_exchange: Literal["dense", "rows"] = "dense"

    def validate(self) -> None:
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        require(self.max_epochs >= 1, "max_epochs", ">= 1", self.max_epochs)
        require(self.patience >= 1, "patience", ">= 1 (evaluations without improvement)", self.patience)
        require(self.grad_clip >= 0, "grad_clip", ">= 0 (0 = off)", self.grad_clip)
        require(self.max_minutes >= 0, "max_minutes", ">= 0 (0 = no limit)", self.max_minutes)


@dataclass
class SampledSoftmaxConfig:
    """``loss: sampled_softmax`` (methods/sampled_softmax.py, docs/design.md "Sampled softmax"):
    each position's softmax runs over its target and ``num_negatives`` items shared by the whole
    global batch, drawn with replacement from Q ∝ (training count + 1)^beta (``unigram``) or
    Q = 1/M (``uniform``), the same ids on every rank (keyed by seed, epoch and step).
    in_batch: also the global batch's targets (gathered from every rank) as negatives.
    logq: subtract log(expected count) from each negative's logit, so the softmax's denominator
    is an unbiased estimate of the full one; false only as an ablation."""

    # 4096: within 1 % of full `ce` on Beauty where 1024 lost 8 % (BENCHMARKS.md 6.1), and at 10^6
    # items still 145x `ce`'s step with the row-sparse table (6.2).
    num_negatives: int = 4096
    proposal: Literal["uniform", "unigram"] = "unigram"
    beta: float = 0.75
    in_batch: bool = False
    logq: bool = True

    def validate(self) -> None:
        require(self.num_negatives >= 1, "num_negatives", ">= 1", self.num_negatives)
        require(math.isfinite(self.beta) and self.beta >= 0, "beta", "a finite number >= 0", self.beta)


@dataclass
class EvalConfig:
    k: int = 10
    every: int = 1  # validate every n epochs
    batch_size: int = 256
    # Model selection (early stopping) uses this validation metric of the "all" slice.
    select_metric: Literal["ndcg", "hr", "auc", "gauc"] = "ndcg"
    # The slice whose validation metric selects the model: "all", or a stratum name (tail, head
    # with 2 strata; s0, s1.. with more). `separate` / `finetune` select each stratum's model on
    # its own stratum. Which strata exist is known from the data: the driver checks it against
    # strata.json before Ray Train starts (trainer._check_compatible).
    select_slice: str = "all"
    # 0 = rank the full catalogue (history items masked); >0 = the prepared sampled candidates.
    candidates: int = 0

    def validate(self) -> None:
        require(self.k >= 1, "k", ">= 1 (the cut-off of HR@k / NDCG@k)", self.k)
        require(self.every >= 1, "every", ">= 1 (validate every n epochs)", self.every)
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        require(self.candidates >= 0, "candidates", ">= 0 (0 = full catalogue)", self.candidates)
        require(re.fullmatch(r"all|tail|head|s\d+", self.select_slice) is not None, "select_slice",
                "all, tail, head (2 strata) or s0, s1, ... (more strata)", self.select_slice)


@dataclass
class TrainConfig(FileConfig):
    method: Method = "pinet"
    loss: Literal["ce", "bce", "sampled_softmax"] = "ce"
    data: DataSection = field(default_factory=DataSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    ga: GAConfig = field(default_factory=GAConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampled: SampledSoftmaxConfig = field(default_factory=SampledSoftmaxConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    reweight: ReweightConfig = field(default_factory=ReweightConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    run: RunSection = field(default_factory=RunSection)

    def validate(self) -> None:
        if self.loss == "ce" and self.model.backbone == "din":
            raise ConfigError("loss 'ce' ranks the full catalogue at every position; din needs loss: bce")
        if self.loss == "sampled_softmax" and self.model.backbone == "din":
            raise ConfigError("loss=sampled_softmax scores shared candidates by a dot product with the "
                              "sequence state; din scores (history, item) pairs: use loss: bce", key="loss")
        if self.loss == "sampled_softmax" and self.needs.adversarial:
            raise ConfigError("loss=sampled_softmax: transfer's task loop computes full-softmax ce or bce "
                              "losses; use loss: ce or bce with method transfer", key="loss")
        if self.model.backbone == "din" and self.eval.candidates == 0:
            raise ConfigError("din scores (history, target) pairs and cannot rank the full catalogue "
                              "cheaply: set eval.candidates > 0 (and samples.eval_candidates in prepare)")
        if not (math.isfinite(self.ga.bucket_cap_mb) and self.ga.bucket_cap_mb > 0):
            raise ConfigError(f"ga.bucket_cap_mb must be a positive number of megabytes, got {self.ga.bucket_cap_mb}")
        strata = self.data.train_strata
        if strata is not None and (not strata or min(strata) < 0):
            raise ConfigError(f"data.train_strata must be a non-empty list of stratum ids >= 0, got {strata}")
        if self.run.warm_start and self.run.init_from:
            raise ConfigError("run.warm_start and run.init_from exclude each other")
        if self.needs.adversarial and self.model.backbone == "din":
            raise ConfigError("transfer needs a sequence backbone (sasrec, gru4rec): its "
                              "discriminator reads the sequence state")
        if self.needs.adversarial and self.transfer.trajectories % self.run.num_workers:
            raise ConfigError(f"transfer.trajectories={self.transfer.trajectories} must be a multiple "
                              f"of run.num_workers={self.run.num_workers}")
        if self.optim.batching == "packed" and self.model.backbone != "sasrec":
            raise ConfigError(f"optim.batching=packed needs the sasrec backbone (its attention masks "
                              f"each packed window); {self.model.backbone} takes padded (or auto)")
        if self.optim.batching == "packed" and self.needs.adversarial:
            raise ConfigError("optim.batching=packed: transfer's task loop reads whole padded rows "
                              "(its discriminator takes each row's last state); use padded (or auto)")
        if self.optim.item_exchange == "rows":
            why = None
            if self.loss == "ce":
                why = "loss ce gives every item row a gradient at every step (use bce or sampled_softmax)"
            elif self.model.backbone == "din" or self.needs.adversarial:
                why = f"{self.method if self.needs.adversarial else 'din'} keeps the dense item table"
            elif self.optim.weight_decay > 0 or self.optim.grad_clip > 0:
                why = ("lazy Adam has no weight decay, and clipping needs the dense norm: "
                       "set optim.weight_decay=0 and optim.grad_clip=0")
            elif self.ga.reduce != "loss_weighted":
                why = "ga.reduce=stratum_sums backpropagates per stratum; use loss_weighted"
            if why:
                raise ConfigError(f"optim.item_exchange=rows: {why}", key="optim.item_exchange")
        if self.run.init_from and not self.needs.plugins:
            raise ConfigError("run.init_from starts pinet's stage 2 from a trained backbone; "
                              f"method is {self.method!r}")

    @property
    def needs(self) -> SequenceNeeds:
        """What ``method`` needs (methods/needs.py): the training code asks it instead of comparing names."""
        return SEQUENCE_NEEDS[self.method]

    @property
    def packed(self) -> bool:
        """Whether training batches are packed (``optim.batching``, auto resolved)."""
        if self.optim.batching == "auto":
            return self.model.backbone == "sasrec" and not self.needs.adversarial
        return self.optim.batching == "packed"

    @property
    def stage1_is_joint(self) -> bool:
        """True when pinet's stage 1 computes exactly joint training's gradient: the GA prior is
        the batch's interaction share (power with alpha = 0, or interaction_share itself)."""
        return self.ga.prior == "interaction_share" or (self.ga.prior == "power" and self.ga.alpha == 0.0)

    @property
    def uses_plugins(self) -> bool:
        return self.needs.plugins and self.stage2.enabled
