"""Stage 2 of a PINet run: one plugin per stratum on the stage-1 backbone (methods.md §1.4).

``PluginStage`` is mixed into ``training.engine.Engine``: it uses the engine's model, state,
evaluation and epoch helpers, and keeps its collectives in the same order on every rank.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from ray_pinet.evaluation.bootstrap import paired_intervals
from ray_pinet.evaluation.protocol import stratum_name, user_outcomes
from ray_pinet.methods.ga import Prior
from ray_pinet.training.collectives import all_gather_rows
from ray_pinet.training.early_stopping import EarlyStopping
from ray_pinet.training.loop import EpochSetup, run_epoch


def compose_plugin_states(plugins: torch.nn.Module, best: dict[int, dict], num_strata: int) -> dict:
    """One plugin state whose stratum-s part comes from ``best[s]`` (stratum s's best epoch).

    A stratum's part is the s-th child of every ModuleList of length K, and row s of every tensor stacked over
    strata (leading dim K); anything else is shared and is taken from the latest best state. Strata never
    improved keep the current values."""
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


class PluginStage:
    def stage2(self) -> None:
        """One plugin per stratum, trained on its own stratum's units (methods.md §1.4).

        Frozen backbone (default): the loss weights are 1/N_s (prior ``stratum_mean``), so the slice of the
        plugins that serves stratum s receives exactly its own-stratum mean gradient. Every plugin early-stops
        on its own stratum's validation metric: routing by stratum means plugin s alone decides stratum s's
        scores, so the best epochs of different plugins can be combined. Unfrozen: backbone and plugins follow
        the GA-weighted loss, the backbone at ``backbone_lr_scale`` × lr, selection on the "all" metric."""
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
        """Stage 2's epochs and Adam (its state restored on resume), for either mode of ``stage2``."""
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
