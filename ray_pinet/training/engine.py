"""The whole training procedure of one run, Ray-free.

``Engine`` runs stage 1 (backbone: joint = pooled mean, pinet = GA), then for ``pinet`` stage 2
(one plugin per stratum), then the final validation/test evaluation. It talks to the outside
only through three callables, so the same code runs in one process (tests, the single-process
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

import numpy as np
import torch

from ray_pinet.config import TrainConfig
from ray_pinet.evaluation.bootstrap import paired_intervals
from ray_pinet.evaluation.protocol import evaluate, metric_key, slice_names, stratum_name, user_outcomes
from ray_pinet.methods.ga import Prior, method_prior
from ray_pinet.methods.sampled_softmax import NegativeSampler
from ray_pinet.methods.transfer import Discriminator
from ray_pinet.models.registry import build_model
from ray_pinet.training.batches import EvalRows, TrainRows
from ray_pinet.training.collectives import all_gather_rows, all_reduce_max_, broadcast_module_, rank_and_world
from ray_pinet.training.early_stopping import EarlyStopping
from ray_pinet.training.loop import EpochSetup, item_optimizers, run_epoch
from ray_pinet.training.shards import shard_range
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


def compose_plugin_states(plugins: torch.nn.Module, best: dict[int, dict], num_strata: int) -> dict:
    """One plugin state whose stratum-s part comes from ``best[s]`` (stratum s's best epoch).

    A stratum's part is the s-th child of every ModuleList of length K, and row s of every
    tensor stacked over strata (leading dim K); anything else is shared and is taken from the
    latest best state. Strata never improved keep the current values.
    """
    current = plugins.state_dict()
    per_stratum_lists = [name for name, m in plugins.named_modules()
                         if isinstance(m, torch.nn.ModuleList) and len(m) == num_strata]
    out = {k: v.clone() for k, v in current.items()}
    for s, state in sorted((int(s), st) for s, st in best.items()):
        for key, value in state.items():
            owner = next((n for n in per_stratum_lists if key.startswith(f"{n}.")), None)
            if owner is not None:
                idx = int(key[len(owner) + 1 :].split(".", 1)[0])
                if idx == s:
                    out[key] = value.clone()
            elif value.dim() >= 1 and value.shape[0] == num_strata:
                out[key][s] = value[s]
    return out


class Engine:
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
        # Decided once by the caller (training/device.resolve_device); the model and rows are
        # placed here, the models themselves never look at devices.
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
                     if cfg.method == "transfer" else None)
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

    # -- checkpoint state ----------------------------------------------------------------------
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

    # -- helpers ---------------------------------------------------------------------------
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

    # -- stage 1 ---------------------------------------------------------------------------
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

    # -- stage 2 ---------------------------------------------------------------------------
    def stage2(self) -> None:
        """One plugin per stratum, trained on its own stratum's units (methods.md §1.4).

        Frozen backbone (default): the loss weights are 1/N_s (prior ``stratum_mean``), so the
        slice of the plugins that serves stratum s receives exactly its own-stratum mean
        gradient. Every plugin early-stops on its own stratum's validation metric: routing by
        stratum means plugin s alone decides stratum s's scores, so the best epochs of different
        plugins can be combined. Unfrozen: backbone and plugins follow the GA-weighted loss,
        the backbone at ``backbone_lr_scale`` × lr, selection on the "all" metric.
        """
        s2 = self.cfg.stage2
        if self.state.stage == 1:  # entering stage 2 (not resuming inside it)
            self._enter_stage2()
        self.model.use_plugins = True
        setup, opt = self._stage2_setup()
        stoppers = self._stage2_stoppers()
        t_start = time.perf_counter()
        while self.state.epoch < s2.max_epochs:
            epoch = self.state.epoch
            stats = run_epoch(setup, 10_000 + epoch, progress=self._progress(2, epoch))
            val = self._evaluate(self.valid_rows)
            metrics = {"stage": 2.0, "epoch": float(epoch), **stats.as_metrics("train"),
                       **{f"val/{k}": v for k, v in val.items()}}
            done = self._stage2_select(stoppers, val)
            self.state.epoch += 1
            done = self._out_of_time(t_start, s2.max_minutes) or done
            self.say(f"stage 2 epoch {epoch:3d}  loss {metrics['train/loss']:.4f}  "
                     f"{self._fmt(metrics, 'val')}")
            t_start = self._close_epoch(metrics, {"stage2": opt}, t_start)
            if done:
                break
        self._finish_stage2()

    def _enter_stage2(self) -> None:
        """Start stage 2 on the stage-1 model: fresh selection and optimizer, and the identity
        plugins (= the stage-1 model) as the first candidate of every stratum, so a plugin is
        kept only if it beats the backbone on its stratum's validation (``plugin_base``)."""
        K = self.K
        self.state.stage, self.state.epoch, self.state.stage_elapsed_s = 2, 0, 0.0
        self.opt_state = {}
        self.model.reset_plugins()  # identity on the trained backbone (DIN: copy its head)
        self.model.use_plugins = True
        val0 = self._evaluate(self.valid_rows)
        self.state.plugin_best = [self._val_metric(val0, stratum_name(s, K)) for s in range(K)]
        self.state.plugin_bad = [0] * K
        self.state.plugin_best_state = {s: copy.deepcopy(self.model.plugins.state_dict()) for s in range(K)}
        self.state.plugin_base = list(self.state.plugin_best)  # what each plugin must beat
        self.state.best_value, self.state.bad_evals = self._val_metric(val0, "all"), 0
        self.state.best_model = copy.deepcopy(self.model.state_dict())

    def _stage2_setup(self) -> tuple[EpochSetup, torch.optim.Optimizer]:
        """Stage 2's epochs and Adam (its state restored on resume): the plugins alone under the
        ``stratum_mean`` prior (frozen backbone), else the plugins and the backbone (at
        ``backbone_lr_scale`` × lr) under the method's prior."""
        cfg, s2 = self.cfg, self.cfg.stage2
        plugin_params = list(self.model.plugin_parameters())
        backbone = list(self.model.backbone_parameters())
        groups = [{"params": plugin_params, "lr": s2.lr}]
        if s2.freeze_backbone:
            for p in backbone:
                p.requires_grad_(False)
            params, prior = plugin_params, Prior("stratum_mean")
        else:
            groups.append({"params": backbone, "lr": cfg.optim.lr * s2.backbone_lr_scale,
                           "weight_decay": cfg.optim.weight_decay})
            params, prior = plugin_params + backbone, self._method_prior()
        opt = torch.optim.Adam(groups)
        if "stage2" in self.opt_state:
            opt.load_state_dict(self.opt_state["stage2"])
        return self._epoch_setup(params, [opt], prior, use_plugins=True), opt

    def _stage2_stoppers(self) -> list[EarlyStopping]:
        """Frozen backbone: plugin s's early stopping on its own stratum; else the run's selection."""
        s2 = self.cfg.stage2
        if not s2.freeze_backbone:
            return [self._selection(s2.patience)]
        return [EarlyStopping(s2.patience, best, bad)
                for best, bad in zip(self.state.plugin_best, self.state.plugin_bad)]

    def _stage2_select(self, stoppers: list[EarlyStopping], val: dict[str, float]) -> bool:
        """Update stage 2's selection with one validation; True when stage 2 is done. Frozen
        backbone: every plugin still training keeps its state at its stratum's new best."""
        if not self.cfg.stage2.freeze_backbone:
            self._select_model(stoppers[0], self._val_metric(val, "all"))
            return stoppers[0].stopped
        for s, stopper in enumerate(stoppers):
            if not stopper.stopped and stopper.update(self._val_metric(val, stratum_name(s, self.K))):
                self.state.plugin_best_state[s] = copy.deepcopy(self.model.plugins.state_dict())
        self.state.plugin_best = [st.best for st in stoppers]
        self.state.plugin_bad = [st.bad for st in stoppers]
        return all(st.stopped for st in stoppers)

    def _finish_stage2(self) -> None:
        """Serve each stratum's best plugin (frozen backbone: composed, then ``_decide_plugins``)
        or the run's best model, and make the backbone trainable again."""
        if self.cfg.stage2.freeze_backbone:
            if self.state.plugin_best_state:
                self.model.plugins.load_state_dict(
                    compose_plugin_states(self.model.plugins, self.state.plugin_best_state, self.K)
                )
            self._decide_plugins()
        elif self.state.best_model is not None:
            self.model.load_state_dict(self.state.best_model)
        for p in self.model.backbone_parameters():
            p.requires_grad_(True)

    def _decide_plugins(self) -> None:
        """Record which plugins are served (``plugin_kept``); with ``stage2.keep: significant``
        a plugin that beat the backbone on validation is kept only if the paired-bootstrap
        interval of its gain over its stratum's validation users lies above zero, and is reset
        to the identity otherwise. Collective (one gather); every rank decides on the same
        gathered rows, sorted by sample id, with the same seed, so all ranks agree for any W."""
        cfg, K = self.cfg, self.K
        s2 = cfg.stage2
        # A checkpoint from before plugin_base was a per-stratum list (absent, or the whole
        # validation dict) carries no usable base: every plugin counts as having won, as before.
        base = self.state.plugin_base if isinstance(self.state.plugin_base, list) else []
        base = base or [float("-inf")] * K
        won = [self.state.plugin_best[s] > base[s] for s in range(K)]
        self.state.plugin_kept = [float(w) for w in won]
        if s2.keep != "significant" or not any(won):
            return
        def per_user(use_plugins: bool) -> dict:
            self.model.use_plugins = use_plugins
            return user_outcomes(self.model, self.valid_rows, cfg.eval.k, cfg.eval.batch_size,
                                 cfg.eval.candidates > 0)

        base, plug = per_user(False), per_user(True)
        local = torch.stack([base["sample_id"].to(torch.float64), base["stratum"].to(torch.float64),
                             base["ndcg"], plug["ndcg"]], dim=1)
        rows = all_gather_rows(local)
        rows = rows[torch.argsort(rows[:, 0])].cpu().numpy()
        level = s2.keep_level
        iv = paired_intervals(rows[:, 2], rows[:, 3], rows[:, 1].astype(np.int64), K,
                              draws=s2.keep_draws, seed=cfg.run.seed, level=level)
        drop = []
        for s in (s for s in range(K) if won[s]):
            lo, hi = iv.get(stratum_name(s, K), (0.0, 0.0))
            if lo <= 0.0:
                drop.append(s)
            self.say(f"stage 2: plugin {stratum_name(s, K)} gain on validation {level:.0%} interval "
                     f"[{lo:+.1%}, {hi:+.1%}]: {'reset to the identity' if lo <= 0.0 else 'kept'}")
        if drop:
            # state_dict() shares storage with the parameters: copy before the in-place reset.
            composed = copy.deepcopy(self.model.plugins.state_dict())
            self.model.reset_plugins()  # the identity of every stratum
            identity = copy.deepcopy(self.model.plugins.state_dict())
            self.model.plugins.load_state_dict(composed)
            keep_states = {s: (identity if s in drop else composed) for s in range(K)}
            self.model.plugins.load_state_dict(compose_plugin_states(self.model.plugins, keep_states, K))
            for s in drop:
                self.state.plugin_kept[s] = 0.0
        self.model.use_plugins = True

    # -- whole run -------------------------------------------------------------------------
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
