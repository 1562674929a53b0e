"""Config of ``ray-pinet twotower``: two-tower MF on (user, item) pairs (methods.md §3, §4).

Methods (``model.method``):
* ``onebp``: InfoNCE, item tower by backprop, user tower by the moving aggregation
  u ← β·u + (1−β)·v⁺ (Chen & Wang, §3);
* ``twobp``: the same MF + InfoNCE with both towers backpropagated (OneBP's baseline);
* ``bpr``: MF-BPR with a pluggable negative sampler, ``uniform`` (RNS) or ``auc_ns`` (§4);
* ``ncf``: GMF / NeuMF on labeled rows plus one sampled unlabeled item per row, trained with
  ``model.loss``: ``bce`` (the sampled item as a negative), ``idl`` (Inverse Dual Loss on the
  sampled item, §5.2), ``tce`` / ``rce`` (DenoisingRec's truncated / reweighted BCE, §5.5), or
  ``ig`` (the Inverse Gradient meta-step, §5.3, ``training/inverse_gradient.py``).

Defaults are the ML-100K rows of the papers' READMEs (OneBP: batch 1024, lr 5e-4, weight decay
1e-5, d 32, β 0.99, T 1, N 5) except the number of epochs (2000 there; see docs/results.md for what
we ran). Key names are the sequence kind's (``optim.max_epochs``, ``optim.weight_decay``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union, get_args

from ray_pinet.config_base import ConfigError, FileConfig, require
from ray_pinet.config_sections import RunSection, TrackingConfig
from ray_pinet.data.config import SourceConfig, StrataConfig
from ray_pinet.methods.auc_ns_config import AucNsConfig
from ray_pinet.methods.needs import TWOTOWER_NEEDS

# Each name's loss, data and tower rules: methods/twotower_methods.py; its needs: methods/needs.py.
TwoTowerMethodName = Literal["onebp", "twobp", "bpr", "ncf"]
TWOTOWER_METHODS = get_args(TwoTowerMethodName)
# Keys that took the sequence kind's names: a file that still says the old one is told the new.
RENAMED = {"optim.epochs": "optim.max_epochs", "optim.l2": "optim.weight_decay"}


@dataclass
class PairSource(SourceConfig):
    """The raw log (data/config.py SourceConfig), defaulting to MovieLens-100K."""

    format: str = "movielens_100k"
    path: Union[str, list[str]] = "../shared/data/ml-100k/u.data"


@dataclass
class PairDataSection:
    """Raw log -> dense (user, item) positives -> seeded random row split (methods.md §3.2)."""

    source: PairSource = field(default_factory=PairSource)
    output: str = "prepared/ml-100k-pairs"
    # Every row is a positive (as coded in OneBP and AUC-NS); set e.g. 4.0 for a "liked" view.
    min_rating: Optional[float] = None
    # Labeled rows (Inverse Learning, methods.md §5.5): every row is kept with label
    # 1[rating > label_threshold] (the code's Thre = 2). None: no label column (implicit positives).
    label_threshold: Optional[float] = None
    test_share: float = 0.2  # random 80/20 row split, as the published files
    # Share of the non-test rows held out for validation (0 = the published protocol, which
    # selects epochs on test; > 0 enables eval.select_on = validation).
    valid_share: float = 0.0
    split_seed: int = 2022
    strata: StrataConfig = field(default_factory=StrataConfig)  # activeness = training rows per user
    hot_share: float = 0.15  # hot items for OHR/OCR/UHR/UCR: top 15 % by popularity (full data)
    max_users: Optional[int] = None  # keep the first n users by dense id (smoke tests)

    def validate(self) -> None:
        if not 0.0 < self.test_share < 1.0:
            raise ConfigError(f"data.test_share must be in (0, 1), got {self.test_share}")
        if not 0.0 <= self.valid_share < 1.0:
            raise ConfigError(f"data.valid_share must be in [0, 1), got {self.valid_share}")
        if not 0.0 < self.hot_share <= 1.0:
            raise ConfigError(f"data.hot_share must be in (0, 1], got {self.hot_share}")
        if self.max_users is not None and self.max_users < 2:
            raise ConfigError(f"data.max_users must be >= 2, got {self.max_users}")
        if self.label_threshold is not None and self.min_rating is not None:
            raise ConfigError("data.label_threshold keeps every rating as a labeled row; unset data.min_rating")
        require(bool(self.output.strip()), "output", "a directory", self.output)
        require(self.split_seed >= 0, "split_seed", ">= 0", self.split_seed)


@dataclass
class TwoTowerModel:
    method: TwoTowerMethodName = "onebp"
    dim: int = 32
    temperature: float = 1.0  # InfoNCE: s = <u, v> / T
    num_negatives: int = 5  # N per positive (uniform, without replacement, from I_u⁻)
    sampler: Literal["uniform", "auc_ns"] = "uniform"
    auc_ns: AucNsConfig = field(default_factory=AucNsConfig)
    # ncf only
    backbone: Literal["gmf", "neumf"] = "gmf"
    num_layers: int = 3  # NeuMF's MLP tower
    dropout: float = 0.0
    loss: Literal["bce", "idl", "tce", "rce", "ig"] = "idl"
    tce_drop_rate: float = 0.2  # T-CE: largest share of rows dropped
    tce_num_gradual: int = 30000  # T-CE: steps over which the drop rate grows to tce_drop_rate
    rce_alpha: float = 0.2  # R-CE weight exponent
    # ig (Inverse Gradient, methods.md §5.3-5.4): as_coded reproduces the public code's sign
    # steps and unzeroed gradients; clean uses SGD candidates and a persistent Adam
    ig_mode: Literal["as_coded", "clean"] = "as_coded"
    ig_train_ratio: float = 0.9  # first share of the labeled training rows (file order) = D_tr
    ig_sample_lr: float = 1e-3  # step size of the forward / inverse candidates
    # onebp only
    beta: float = 0.99  # u ← β·u + (1−β)·v⁺
    ema_granularity: Literal["batch", "epoch"] = "batch"  # batch: as coded; epoch: as the paper says
    duplicate_rule: Literal["last_write", "mean"] = "last_write"  # several rows of one user in a batch

    def validate(self) -> None:
        if self.dim < 1 or self.num_negatives < 1:
            raise ConfigError("model.dim and model.num_negatives must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"model.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"model.beta must be in [0, 1), got {self.beta}")
        if not 0.0 < self.ig_train_ratio < 1.0 or self.ig_sample_lr <= 0:
            raise ConfigError("model: ig_train_ratio must be in (0, 1) and ig_sample_lr > 0")
        if not 0.0 <= self.tce_drop_rate < 1.0 or self.tce_num_gradual < 0 or self.num_layers < 1:
            raise ConfigError("model: tce_drop_rate in [0, 1), tce_num_gradual >= 0, num_layers >= 1")
        require(0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)", self.dropout)
        require(self.rce_alpha >= 0, "rce_alpha", ">= 0", self.rce_alpha)
        if self.sampler == "auc_ns" and not TWOTOWER_NEEDS[self.method].auc_ns:
            raise ConfigError("model.sampler=auc_ns picks one hard negative per positive for the BPR "
                              f"loss; use model.method=bpr (got {self.method!r})")


@dataclass
class TwoTowerOptim:
    lr: float = 5e-4
    weight_decay: float = 1e-5  # Adam's (the papers' "l2", as coded)
    batch_size: int = 1024  # global batch of training pairs, split across workers by user
    max_epochs: int = 200
    lr_milestones: list[int] = field(default_factory=list)  # MultiStepLR epochs (AUC-NS: 20, 60, 80)
    lr_gamma: float = 0.1

    def validate(self) -> None:
        require(self.lr > 0, "lr", "> 0", self.lr)
        require(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        require(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        require(self.max_epochs >= 1, "max_epochs", ">= 1", self.max_epochs)
        m = self.lr_milestones  # one beyond optim.max_epochs is never reached (short runs keep them)
        require(all(a >= 1 for a in m) and all(a < b for a, b in zip(m, m[1:])), "lr_milestones",
                "strictly increasing epochs >= 1", m)
        require(self.lr_gamma > 0, "lr_gamma", "> 0", self.lr_gamma)


@dataclass
class TwoTowerEval:
    # Cut-offs of every reported metric (the papers' P/R/F1/NDCG@5/10/20 tables); select_metric
    # names its own. Not the sequence kind's one `eval.k`: that is both its only reported cut-off
    # and its selection metric's, so the two keys hold different things.
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    every: int = 1  # evaluate every n epochs (and after the last)
    batch_size: int = 512  # users scored at once
    # test_best_epoch: each test metric at its own best test epoch (the published code's report);
    # validation: every test metric at the epoch of best validation `select_metric` (needs
    # data.valid_share > 0). Both are reported whenever a validation split exists.
    select_on: Literal["test_best_epoch", "validation"] = "test_best_epoch"
    select_metric: str = "ndcg@10"
    # Early stop after this many evaluations without a better validation `select_metric`
    # (0 = train all optim.max_epochs; needs data.valid_share > 0).
    patience: int = 0

    def validate(self) -> None:
        if not self.ks or min(self.ks) < 1 or self.every < 1 or self.batch_size < 1 or self.patience < 0:
            raise ConfigError("eval: ks must be positive cut-offs, every and batch_size >= 1, patience >= 0")


@dataclass
class TwoTowerRun(RunSection):
    name: str = "ml-100k-onebp"
    seed: int = 2022  # the published code's seed


@dataclass
class TwoTowerTracking(TrackingConfig):
    # Subclasses, not default_factory lambdas: a YAML or --set that names one key of the section
    # builds it from the class, and would silently drop a lambda's defaults.
    experiment: str = "ray-pinet-twotower"
    log_model: bool = False  # two-tower runs log no served model yet


@dataclass
class TwoTowerConfig(FileConfig):
    data: PairDataSection = field(default_factory=PairDataSection)
    model: TwoTowerModel = field(default_factory=TwoTowerModel)
    optim: TwoTowerOptim = field(default_factory=TwoTowerOptim)
    eval: TwoTowerEval = field(default_factory=TwoTowerEval)
    run: TwoTowerRun = field(default_factory=TwoTowerRun)
    tracking: TwoTowerTracking = field(default_factory=TwoTowerTracking)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "TwoTowerConfig":
        """``FileConfig.from_dict``, after refusing a ``RENAMED`` key with its new name (the
        generic check would only call it unknown)."""
        for old, new in RENAMED.items():
            section, key = old.split(".")
            if isinstance((data or {}).get(section), Mapping) and key in data[section]:
                raise ConfigError(f"{old} was renamed to {new}: rename the key (config file, --set, "
                                  "Tune space)", key=old)
        return super().from_dict(data)

    def validate(self) -> None:
        if self.eval.select_on == "validation" and self.data.valid_share == 0:
            raise ConfigError("eval.select_on=validation needs data.valid_share > 0")
        if self.eval.patience and self.data.valid_share == 0:
            raise ConfigError("eval.patience (early stopping on validation) needs data.valid_share > 0")
        metric, _, k = self.eval.select_metric.partition("@")
        method = self.model.method
        if TWOTOWER_NEEDS[method].labeled:
            if self.data.label_threshold is None:
                raise ConfigError(f"model.method={method} trains on labeled rows: set data.label_threshold "
                                  "(e.g. 2)")
            if self.eval.select_metric not in ("bce", "auc", "wauc") and not (
                    metric == "ndcg" and k.isdigit() and int(k) in self.eval.ks):
                raise ConfigError(f"eval.select_metric for {method} must be bce|auc|wauc|ndcg@k, "
                                  f"got {self.eval.select_metric!r}")
        elif metric not in ("p", "r", "f1", "ndcg") or not k.isdigit() or int(k) not in self.eval.ks:
            raise ConfigError(f"eval.select_metric must be p|r|f1|ndcg@k with k in eval.ks={self.eval.ks}, "
                              f"got {self.eval.select_metric!r}")
        if self.run.init_from or self.run.warm_start:
            raise ConfigError("run.init_from / run.warm_start are not supported by twotower runs")
        # Neither would happen: the two-tower driver logs no served model (and registers none).
        if self.tracking.log_model or self.tracking.register_as:
            raise ConfigError("tracking.log_model / tracking.register_as: two-tower runs log no served "
                              "model; set tracking.log_model=false and leave tracking.register_as unset")
