"""The whole training procedure of one run, Ray-free.

``Engine`` runs stage 1 (backbone: joint = pooled mean, pinet = GA), then for ``pinet`` stage 2
(one plugin per stratum, ``stage2.PluginStage``), then the final validation/test evaluation. It talks to the
outside only through three callables, so the same code runs in one process (tests, the single-process
reference) and inside a Ray Train worker (``worker.py`` supplies Ray's report/checkpoint):

* ``report(metrics, state | None)``: once per epoch on every rank (state only on rank 0),
* ``log(metrics, step)``: rank 0 only (MLflow),
* ``say(text)``: rank 0 only (console).

All control decisions (early stopping, the time limit, plugin stopping) are taken from
all-reduced values, so every rank takes the same branch and runs the same collectives.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ray_pinet.config import TrainConfig
from ray_pinet.evaluation.protocol import evaluate, metric_key, slice_names, stratum_name
from ray_pinet.methods.ga import Prior, method_prior
from ray_pinet.methods.sampled_softmax import NegativeSampler
from ray_pinet.methods.transfer import Discriminator
from ray_pinet.models.registry import build_model
from ray_pinet.training.batches import EvalRows, TrainRows
from ray_pinet.training.collectives import all_reduce_max_, broadcast_module_, rank_and_world
from ray_pinet.training.early_stopping import EarlyStopping
from ray_pinet.training.loop import EpochSetup, item_optimizers, run_epoch
from ray_pinet.training.shards import shard_range
from ray_pinet.training.stage2 import PluginStage
from ray_pinet.training.transfer_epoch import transfer_epoch

ReportFn = Callable[[dict, Optional[dict]], None]


def to_cpu(obj: Any) -> Any:
    """A deep copy of ``obj`` with every tensor on the CPU: what a snapshot holds, so a
    checkpoint written on a GPU loads on a CPU (and the other way round)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class RunMeta:
    """What the workers need to know about the prepared data (sent from the driver)."""

    num_items: int
    num_strata: int
    num_train_samples: int
    user_share: list[float]
    interaction_share: list[float]
    train_negatives: int = 0
    strata: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineState:
    stage: int = 1
    epoch: int = 0  # next epoch to run in the current stage
    # The EarlyStopping state (best, bad) of the model selection and of each plugin (stage 2,
    # frozen backbone), kept as plain numbers: checkpoints hold plain data only.
    best_value: float = float("-inf")
    bad_evals: int = 0
    best_model: Optional[dict] = None
    stage1_done: bool = False
    plugin_best: list[float] = field(default_factory=list)
    plugin_bad: list[int] = field(default_factory=list)
    plugin_best_state: dict[int, list] = field(default_factory=dict)  # stratum -> its best tensors
    plugin_base: list[float] = field(default_factory=list)  # stratum s's metric, backbone alone
    plugin_kept: list[float] = field(default_factory=list)  # 1.0 where stratum s's plugin is served
    history: list[dict] = field(default_factory=list)
    stage1_test: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0  # training time of the whole run
    stage_elapsed_s: float = 0.0  # training time of the current stage (time limits)
    # "stage S epoch E" each time the run was restarted from a checkpoint (worker failure,
    # relaunch): the proof that a recovery lost at most the epoch in flight.
    resumed_at: list[str] = field(default_factory=list)


class Engine(PluginStage):
    def __init__(
        self,
        cfg: TrainConfig,
        meta: RunMeta,
        train_table,
        valid_table,
        test_table,
        report: ReportFn,
        log: Callable[[dict, int], None] = lambda m, s: None,
        say: Callable[[str], None] = print,
        resume_state: Optional[dict] = None,
        init_backbone: Optional[dict] = None,
        warm_backbone: Optional[dict] = None,
        device: torch.device = torch.device("cpu"),
    ):
        self.cfg, self.meta = cfg, meta
        # Decided once by the caller (training/device.resolve_device); the model and rows are placed here.
        self.device = torch.device(device)
        self.rank, self.world = rank_and_world()
        self.report, self.log = report, log
        self.say = say if self.rank == 0 else (lambda s: None)
        L = cfg.model.max_len
        n_neg = meta.train_negatives if cfg.loss == "bce" else 0
        if cfg.loss == "bce" and n_neg < 1:
            raise ValueError("loss 'bce' needs sampled negatives: prepare with samples.train_negatives >= 1")
        self.train_rows = TrainRows(train_table, L, meta.num_train_samples, n_neg, self.device,
                                    cfg.run.device_data_mb)
        block = shard_range(meta.num_train_samples, self.rank, self.world)
        if (self.train_rows.first, self.train_rows.first + len(self.train_rows)) != block:
            # e.g. every rank handed the whole table: each would train on all rows, counted W times
            raise ValueError(f"rank {self.rank}/{self.world} holds training samples {self.train_rows.first}.."
                             f"{self.train_rows.first + len(self.train_rows) - 1}, its block is "
                             f"{block[0]}..{block[1] - 1} (training/shards.py::read_shard reads it)")
        # loss sampled_softmax: Q from the training target counts of every rank (collective)
        self.sampler = (NegativeSampler.from_config(self.train_rows, meta.num_items, cfg)
                        if cfg.loss == "sampled_softmax" else None)
        self.valid_rows = EvalRows(valid_table, L)
        self.test_rows = EvalRows(test_table, L)
        self.K = meta.num_strata
        torch.manual_seed(cfg.run.seed)
        self.model = build_model(
            cfg.model, meta.num_items, self.K, cfg.stage2.plugin if cfg.uses_plugins else None
        )
        self.model.use_plugins = False
        self.model.to(self.device)
        # transfer's stratum discriminator (training only: it is not part of the served model).
        self.disc = (Discriminator(cfg.model.dim, self.K, cfg.transfer.disc_hidden)
                     if cfg.needs.adversarial else None)
        if self.disc is not None:
            self.disc.to(self.device)
        broadcast_module_(self.model)  # identical start on every rank (the seed already does it)
        if self.disc is not None:
            broadcast_module_(self.disc)
        if cfg.eval.select_slice not in slice_names(self.K):
            raise ValueError(f"eval.select_slice={cfg.eval.select_slice!r} is not one of {slice_names(self.K)}")
        self.train_ids = None  # None = every training row
        if cfg.data.train_strata is not None:
            bad = [s for s in cfg.data.train_strata if s >= self.K]
            if bad:
                raise ValueError(f"data.train_strata {bad}: the data has {self.K} strata (0..{self.K - 1})")
            self.train_ids = self.train_rows.subset(cfg.data.train_strata)
            self.say(f"training on strata {cfg.data.train_strata}: {self.train_ids.total:,} of "
                     f"{meta.num_train_samples:,} training rows")
        self.state = EngineState()
        self.opt_state: dict[str, Any] = {}
        if resume_state is not None:
            self._restore(resume_state)
        elif init_backbone is not None:
            # Stage 1 was trained by another run (run.init_from): take its backbone as is.
            self.model.backbone.load_state_dict(init_backbone)
            self.state.stage1_done = True
            self.say("stage 1: backbone taken from run.init_from; training starts at stage 2")
        elif warm_backbone is not None:
            self.model.backbone.load_state_dict(warm_backbone)
            self.say("stage 1 starts from the backbone of run.warm_start")

    def snapshot(self, optimizers: dict[str, torch.optim.Optimizer]) -> dict:
        return {
            "engine": to_cpu(self.state.__dict__),
            "model": to_cpu(self.model.state_dict()),
            "use_plugins": self.model.use_plugins,
            "aux": None if self.disc is None else to_cpu(self.disc.state_dict()),
            "optimizers": {k: to_cpu(o.state_dict()) for k, o in optimizers.items()},
            "config": self.cfg.to_dict(),
            "meta": self.meta.__dict__,
        }

    def _restore(self, snap: dict) -> None:
        self.state = EngineState(**snap["engine"])
        self.model.load_state_dict(snap["model"])
        self.model.use_plugins = snap.get("use_plugins", False)
        if self.disc is not None and snap.get("aux") is not None:
            self.disc.load_state_dict(snap["aux"])
        self.opt_state = snap.get("optimizers", {})
        self.state.resumed_at.append(f"stage {self.state.stage} epoch {self.state.epoch}")

    def _evaluate(self, rows: EvalRows) -> dict[str, float]:
        return evaluate(
            self.model, rows, self.K, k=self.cfg.eval.k, batch_size=self.cfg.eval.batch_size,
            candidates=self.cfg.eval.candidates > 0,
        )

    def _val_metric(self, val: dict[str, float], slice_name: str) -> float:
        return val.get(metric_key(slice_name, self.cfg.eval.select_metric, self.cfg.eval.k), float("-inf"))

    def _method_prior(self) -> Prior:
        return method_prior(self.cfg, self.meta.user_share, self.meta.interaction_share)

    def _epoch_setup(self, params: list, optimizers: list, prior: Prior, use_plugins: bool) -> EpochSetup:
        return EpochSetup(self.model, params, optimizers, self.train_rows, self.meta.num_train_samples,
                          self.cfg, self.K, prior, use_plugins, self.train_ids, self.sampler)

    def _selection(self, patience: int) -> EarlyStopping:
        """Early stopping of the run's model selection, over ``best_value``/``bad_evals``."""
        return EarlyStopping(patience, self.state.best_value, self.state.bad_evals)

    def _select_model(self, selection: EarlyStopping, value: float) -> bool:
        """One evaluation of the selection metric; a new best keeps the model (``best_model``)."""
        improved = selection.update(value)
        self.state.best_value, self.state.bad_evals = selection.best, selection.bad
        if improved:
            self.state.best_model = copy.deepcopy(self.model.state_dict())
        return improved

    def _agree_stop(self, local_flag: bool) -> bool:
        # on the collective device (nccl reduces CUDA tensors only); read once per epoch
        t = torch.tensor([1.0 if local_flag else 0.0], dtype=torch.float64, device=self.device)
        return bool(all_reduce_max_(t)[0] > 0)

    def _out_of_time(self, t_start: float, limit: float) -> bool:
        elapsed = self.state.stage_elapsed_s + (time.perf_counter() - t_start)
        return self._agree_stop(limit > 0 and elapsed > 60.0 * limit)

    def _progress(self, stage: int, epoch: int):
        if self.rank != 0 or not self.cfg.run.progress:
            return None
        from tqdm.auto import tqdm

        bar = {"b": None}

        def update(step: int, total: int) -> None:
            if bar["b"] is None:
                bar["b"] = tqdm(total=total, desc=f"stage {stage} epoch {epoch}", leave=False,
                                mininterval=5.0, unit="batch")
            bar["b"].update(1)
            if step == total:
                bar["b"].close()

        return update

    def _close_epoch(self, metrics: dict, optimizers: dict, t_start: float) -> float:
        """Add the epoch's time to the run's and the stage's, then report the epoch; returns the
        next epoch's start time."""
        dt = time.perf_counter() - t_start
        self.state.elapsed_s += dt
        self.state.stage_elapsed_s += dt
        t_next = time.perf_counter()
        self._emit(metrics, optimizers, step=len(self.state.history))
        return t_next

    def _emit(self, metrics: dict, optimizers: dict, step: int) -> None:
        self.state.history.append({"step": step, **metrics})
        self.log(metrics, step)
        snap = self.snapshot(optimizers) if self.rank == 0 else None
        self.report(metrics, snap)

    def _fmt(self, metrics: dict, prefix: str) -> str:
        k = self.cfg.eval.k
        parts = []
        for name in slice_names(self.K):
            v = metrics.get(f"{prefix}/{name}/ndcg@{k}")
            if v is not None:
                parts.append(f"{name} ndcg@{k} {v:.4f}")
        return "  ".join(parts)

    def stage1(self) -> None:
        cfg = self.cfg
        params = list(self.model.backbone_parameters())
        # Adam, plus lazy Adam for the item table with optim.item_exchange=rows
        opts = dict(zip(("stage1", "stage1_items"), item_optimizers(self.model, params, cfg, cfg.optim.lr)))
        for key, opt in opts.items():
            if key in self.opt_state:
                opt.load_state_dict(self.opt_state[key])
        setup = self._epoch_setup(params, list(opts.values()), self._method_prior(), use_plugins=False)
        selection = self._selection(cfg.optim.patience)
        t_start = time.perf_counter()
        while self.state.epoch < cfg.optim.max_epochs and not self.state.stage1_done:
            epoch = self.state.epoch
            if self.disc is not None:
                stats = transfer_epoch(self.model, self.disc, self.train_rows, self.meta.num_train_samples,
                                       cfg, epoch, progress=self._progress(1, epoch))
            else:
                stats = run_epoch(setup, epoch, progress=self._progress(1, epoch))
            metrics = {"stage": 1.0, "epoch": float(epoch), **stats.as_metrics("train")}
            improved = False
            if (epoch + 1) % cfg.eval.every == 0:
                val = self._evaluate(self.valid_rows)
                metrics.update({f"val/{k}": v for k, v in val.items()})
                improved = self._select_model(selection, self._val_metric(val, cfg.eval.select_slice))
            self.state.epoch += 1
            out_of_time = self._out_of_time(t_start, cfg.optim.max_minutes)
            if out_of_time:
                self.say(f"stage 1: time limit of {cfg.optim.max_minutes} min reached")
            self.say(
                f"stage 1 epoch {epoch:3d}  loss {metrics['train/loss']:.4f}  "
                f"{metrics['train/positions_per_s']:.0f} pos/s  {self._fmt(metrics, 'val')}"
                + ("  *" if improved else "")
            )
            self.state.stage1_done = selection.stopped or out_of_time
            t_start = self._close_epoch(metrics, opts, t_start)
        self.state.stage1_done = True
        if self.state.best_model is not None:
            self.model.load_state_dict(self.state.best_model)

    def run(self) -> dict[str, float]:
        """Train (or finish a resumed run) and return the final validation/test metrics."""
        t0 = time.perf_counter()
        final: dict[str, float] = {}
        if self.state.stage == 1:
            self.stage1()
        if self.cfg.uses_plugins:
            if self.state.stage == 1:
                # Backbone-only scores of the stage-1 model: the reference the plugins must beat.
                self.model.use_plugins = False
                self.state.stage1_test = {
                    f"stage1_test/{k}": v for k, v in self._evaluate(self.test_rows).items()
                }
            if self.state.stage in (1, 2):
                self.stage2()
            self.model.use_plugins = True
        final.update(self.state.stage1_test)
        for s, kept in enumerate(self.state.plugin_kept):
            final[f"stage2/kept/{stratum_name(s, self.K)}"] = kept
        final.update({f"final_val/{k}": v for k, v in self._evaluate(self.valid_rows).items()})
        final.update({f"test/{k}": v for k, v in self._evaluate(self.test_rows).items()})
        final["train_seconds"] = self.state.elapsed_s
        final["wall_seconds"] = time.perf_counter() - t0
        self.state.stage = 3
        self.say("final test: " + self._fmt(final, "test"))
        self._emit(final, {}, step=len(self.state.history))
        return final
