"""``separate`` and ``finetune``: one backbone per stratum, as K runs of the same trainer.

Run s is a ``joint`` run on stratum s's training rows only (``data.train_strata = [s]``, exact under
data-parallel training: the global batches are drawn from those ids on every rank) whose model is selected on
stratum s's validation metric (``eval.select_slice``). ``finetune`` starts each from a trained joint backbone
(``run.warm_start``) with the ``finetune`` schedule; ``separate`` starts from scratch. The K models are
combined into a ``StratumEnsemble`` that routes each user to their stratum's model, evaluated on the whole
validation/test sets and logged to an MLflow run that is the parent of the K runs.

Evaluating the ensemble happens on the driver in one process: it holds K small models and reads the evaluation
splits once (full-ranking cost as in one worker). The per-stratum runs themselves train on the cluster like
any other run.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ray_pinet.config import TrainConfig
from ray_pinet.data.prepared import read_split
from ray_pinet.evaluation.protocol import evaluate, slice_names
from ray_pinet.models.ensemble import StratumEnsemble
from ray_pinet.storage_uri import local_or_uri
from ray_pinet.tracking import mlflow_utils as mu
from ray_pinet.training.batches import EvalRows
from ray_pinet.training.checkpoint import load_state
from ray_pinet.training.kind import FitResult
from ray_pinet.training.resume import RESUME_FREE
from ray_pinet.training.run_inputs import ensure_prepared, load_run_meta
from ray_pinet.training.sequence_outputs import log_served_model, rebuild_model


def _sub_config(cfg: TrainConfig, stratum: int, name: str, base_checkpoint: Optional[str]) -> TrainConfig:
    d = copy.deepcopy(cfg.to_dict())
    d["method"] = "joint"
    d["data"]["train_strata"] = [stratum]
    d["eval"]["select_slice"] = name
    d["run"]["name"] = f"{cfg.run.name}-{name}"
    d["run"]["init_from"] = None
    if cfg.needs.from_joint:
        d["run"]["warm_start"] = base_checkpoint
        ft = cfg.finetune
        d["optim"].update(lr=ft.lr, max_epochs=ft.max_epochs, patience=ft.patience, max_minutes=ft.max_minutes)
        d["eval"]["every"] = 1
    return TrainConfig.from_dict(d)


def base_joint_config(cfg: TrainConfig) -> TrainConfig:
    """The joint run that ``finetune`` starts from when none is given."""
    d = copy.deepcopy(cfg.to_dict())
    d["method"] = "joint"
    d["run"]["name"] = f"{cfg.run.name}-base-joint"
    d["run"]["init_from"] = d["run"]["warm_start"] = None
    return TrainConfig.from_dict(d)


def fit_per_stratum(cfg: TrainConfig, fit_one: Callable[..., FitResult],
                    base_checkpoint: Optional[str] = None, progress: Optional[bool] = None,
                    parent_run_id: Optional[str] = None, tags: Optional[dict[str, str]] = None,
                    fresh: bool = False):
    """``fit_one(cfg, ...)``: the driver's one-run ``fit``, called for the base joint run and
    each stratum's run. ``fresh``: every run of it starts anew, their run folders moved aside,
    under a new parent MLflow run."""
    progress = cfg.run.progress if progress is None else progress
    path = ensure_prepared(cfg, progress=progress)
    meta = load_run_meta(path)
    K = meta.num_strata
    names = slice_names(K)[:K]
    storage = local_or_uri(cfg.run.storage_path)
    uri = run_id = None
    if cfg.tracking.enabled:
        uri = mu.resolve_tracking_uri(cfg.tracking.tracking_uri, storage)
        run_id, _ = mu.start_or_resume_run(
            uri, cfg.tracking.experiment, cfg.run.name, cfg.to_dict(),
            tags={"method": cfg.method, "backbone": cfg.model.backbone, "data": str(path), **(tags or {})},
            parent_run_id=parent_run_id, fresh=fresh, free=RESUME_FREE,
        )
    t0 = time.perf_counter()
    extra: dict = {}
    with mu.failed_on_error(uri, run_id):
        if cfg.needs.from_joint and base_checkpoint is None:
            print(f"finetune: training its joint base first ({cfg.run.name}-base-joint)", flush=True)
            base = fit_one(base_joint_config(cfg), progress=progress, parent_run_id=run_id, fresh=fresh)
            base_checkpoint = base.checkpoint_path
            extra["base_train_seconds"] = base.final.get("train_seconds", 0.0)
        subs = []
        for s, name in enumerate(names):
            sub_cfg = _sub_config(cfg, s, name, base_checkpoint)
            print(f"\n--- {cfg.method}: stratum {name} ({sub_cfg.run.name}) ---", flush=True)
            subs.append(fit_one(sub_cfg, progress=progress, parent_run_id=run_id,
                            tags={"parent_method": cfg.method, "stratum": name}, fresh=fresh))
        members = [rebuild_model(load_state(sub.checkpoint_path))[0] for sub in subs]
        model = StratumEnsemble(members).eval()
        L = cfg.model.max_len
        final: dict[str, float] = {}
        for split, prefix in (("valid", "final_val"), ("test", "test")):
            rows = EvalRows(read_split(path, split), L)
            metrics = evaluate(model, rows, K, k=cfg.eval.k, batch_size=cfg.eval.batch_size,
                               candidates=cfg.eval.candidates > 0)
            final.update({f"{prefix}/{k}": v for k, v in metrics.items()})
        final["train_seconds"] = float(sum(sub.final.get("train_seconds", 0.0) for sub in subs))
        final["wall_seconds"] = time.perf_counter() - t0
        model_uri = None
        if uri and run_id:
            mu.log_metrics(uri, run_id, final, step=0)
            with tempfile.TemporaryDirectory() as tmp:
                f = Path(tmp) / "final_metrics.json"
                f.write_text(json.dumps({**final, "members": [s.checkpoint_path for s in subs]},
                                        indent=2, sort_keys=True))
                mu.log_artifact(uri, run_id, f, None)
            if cfg.tracking.log_model:
                model_uri = log_served_model(cfg, model, uri, run_id, path)
            mu.finish_run(uri, run_id)
    extra["members"] = [sub.checkpoint_path for sub in subs]
    extra["member_finals"] = [sub.final for sub in subs]
    return FitResult(cfg, final, [], None, run_id, uri, model_uri=model_uri, meta=meta, extra=extra)
