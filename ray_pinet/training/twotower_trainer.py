"""Driver and Ray Train worker of ``ray-pinet twotower``: pair data -> TorchTrainer.fit -> MLflow.

The loop itself is ``twotower_loop`` (no Ray). Each worker reads the pair splits of its own
users (``user % W == rank``) from the prepared Parquet files, which therefore must be on storage
that every worker reads (the same path on a single machine; shared storage on a cluster).
Every epoch is checkpointed by rank 0, so relaunching the same ``run.name`` resumes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from ray_pinet.data.pairs import load_meta, prepare_pairs
from ray_pinet.storage_uri import check_reachable, local_or_uri, uri_of
from ray_pinet.training.trainer import FitResult
from ray_pinet.training.twotower_loop import TwoTowerRun, run_epochs, select
from ray_pinet.training.worker import _mlflow_logger
from ray_pinet.twotower_config import TwoTowerConfig

STATE_FILE = "twotower.pt"


def ensure_pairs(cfg: TwoTowerConfig, progress: bool = True) -> Path:
    """``data.output``, prepared from ``cfg.data`` when it is missing. Prepared data made with
    other data settings is an error (naming the keys), never silently reused or overwritten."""
    from ray_pinet.config_base import ConfigError, config_diff, format_diff, to_dict
    from ray_pinet.data.pairs import SPLITS
    from ray_pinet.errors import DataError

    path = Path(cfg.data.output)
    if not (path / "meta.json").exists():
        prepare_pairs(cfg.data, progress=progress)
        return path.resolve()
    missing = [f for f in ("prepare_config.json", "users.parquet", "items.parquet",
                           *(f"{s}.parquet" for s in SPLITS)) if not (path / f).is_file()]
    if missing:
        raise DataError(f"data.output is not complete pair data (an interrupted prepare?): it lacks "
                        f"{', '.join(missing)}; delete the folder (ray-pinet twotower prepares it again) "
                        "or set data.output to a new directory", file=str(path))
    try:
        stored = json.loads((path / "prepare_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"not valid JSON ({exc}): delete the folder to prepare it again",
                        file=str(path / "prepare_config.json")) from None
    differ = config_diff(stored, to_dict(cfg.data), free=("output",))
    if differ:
        diffs = format_diff(differ, "data.", "{key}: prepared {old!r}, asked {new!r}")
        raise ConfigError(f"{path} holds pair data prepared with other settings ({diffs}): "
                          "set data.output to a new directory, or delete it to prepare again")
    return path.resolve()


def load_checkpoint_state(checkpoint_dir: str) -> dict:
    """A two-tower checkpoint (``twotower.pt``), read with ``weights_only=True`` (``checkpoint_io``)."""
    from ray_pinet.checkpoint_io import load_weights

    return load_weights(os.path.join(checkpoint_dir, STATE_FILE))


def twotower_train_func(config: dict[str, Any]) -> None:
    import ray.train

    cfg = TwoTowerConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.run.torch_threads or max(1, (os.cpu_count() or 1) // world))
    from ray_pinet.training.device import resolve_device

    # run.device once per worker (auto: the GPU Ray Train gave it); the loop places everything there
    run = TwoTowerRun(cfg, config["path"], rank, world, device=resolve_device(cfg.run.device))
    history: list[dict] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            snap = load_checkpoint_state(d)
        run.load_state(snap["run"])
        history = snap["history"]
        if rank == 0:
            print(f"[ray-pinet] twotower resumed after epoch {run.epoch}", flush=True, file=sys.__stdout__)
    log = _mlflow_logger(config.get("mlflow")) if rank == 0 else (lambda m, s: None)

    def report(row: dict, run: TwoTowerRun) -> None:
        metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        state = run.state()  # collective (OneBP's user rows live on their ranks): every rank
        log(metrics, int(row["epoch"]))
        if rank != 0:
            ray.train.report(metrics)
            return
        d = tempfile.mkdtemp(prefix="ray-pinet-twotower-")
        try:
            torch.save({"run": state, "history": history + [row], "config": cfg.to_dict()},
                       os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def report_and_keep(row: dict, run: TwoTowerRun) -> None:
        # Checkpoint (and report to Ray Train) on evaluated epochs only: an epoch of MF on ML-100K
        # takes 0.3 s, a checkpoint round trip about as long. A restart redoes at most
        # eval.every - 1 epochs; the rows in between travel in the next checkpoint's history.
        if any(k.startswith("test/") for k in row):
            report(row, run)
        else:
            log({k: float(v) for k, v in row.items() if isinstance(v, (int, float))}, int(row["epoch"]))
        history.append(row)

    # Train V2 patches print() and also tees stdout: sys.__stdout__ prints each line once.
    say = (lambda s: print(f"[ray-pinet] {s}", flush=True, file=sys.__stdout__)) if cfg.run.progress else None
    run_epochs(run, report_and_keep, history=history, say=say)  # history: early stopping resumes too


def fit_twotower(cfg: TwoTowerConfig, parent_run_id: Optional[str] = None,
                 tags: Optional[dict[str, str]] = None, callbacks: Optional[list] = None,
                 fresh: bool = False) -> FitResult:
    """Train ``cfg`` on Ray Train (``run.num_workers`` workers) and log it to MLflow.
    ``callbacks``: ``ray.train.UserCallback``s of the Train run (a Tune trial forwards reports).
    A run name with a checkpoint resumes it only with the same config (``training/resume.py``);
    ``fresh``: move that run folder aside and train anew."""
    import ray

    from ray_pinet.tracking import mlflow_utils as mu
    from ray_pinet.training.resume import check_resume
    from ray_pinet.local_ray import start_ray
    from ray_pinet.training.trainer import fit_to_checkpoint, start_tracking, torch_trainer

    path = ensure_pairs(cfg, progress=cfg.run.progress)
    meta = load_meta(path)
    storage = local_or_uri(cfg.run.storage_path)
    check_reachable(storage, "run.storage_path")
    check_resume(TwoTowerConfig, cfg, storage, lambda d: load_checkpoint_state(str(d))["config"], fresh=fresh)
    if not ray.is_initialized():
        start_ray()
    config_dict = cfg.to_dict()
    uri, run_id, mlflow_info = start_tracking(
        cfg.tracking, cfg.run.name, config_dict, storage, parent_run_id,
        {"method": cfg.model.method, "sampler": cfg.model.sampler, "data": str(path), **(tags or {})},
        [path / name for name in ("meta.json", "report.json", "prepare_config.json")], fresh=fresh)
    trainer = torch_trainer(twotower_train_func, {"cfg": config_dict, "path": str(path), "mlflow": mlflow_info},
                            cfg.run, storage, callbacks=callbacks)
    ckpt = fit_to_checkpoint(trainer, cfg.run.name, uri, run_id)
    with ckpt.as_directory() as d:
        snap = load_checkpoint_state(d)
    history = snap["history"]
    final = select(history, cfg)
    final["train/seconds_per_epoch"] = sum(h["train/seconds"] for h in history) / len(history)
    out = FitResult(cfg, final, history, uri_of(ckpt.filesystem, ckpt.path), run_id, uri)
    if uri and run_id:
        _log_outputs(cfg, meta, final, history, uri, run_id)
        mu.finish_run(uri, run_id)
    return out


def _log_outputs(cfg: TwoTowerConfig, meta: dict, final: dict, history: list[dict], uri: str, run_id: str) -> None:
    from ray_pinet.tracking import mlflow_utils as mu
    from ray_pinet.tracking.plots import plot_twotower_curves
    from ray_pinet.training.worker import mlflow_key

    mu.log_metrics(uri, run_id, {mlflow_key(k): v for k, v in final.items()}, step=len(history))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "final_metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
        (tmp / "history.json").write_text(json.dumps(history))
        plot_twotower_curves(history, int(meta["num_strata"]), tmp / "twotower_curves.png")
        for f in ("final_metrics.json", "history.json"):
            mu.log_artifact(uri, run_id, tmp / f)
        mu.log_artifact(uri, run_id, tmp / "twotower_curves.png", "plots")


def format_final(final: dict[str, float], num_strata: int, prefix: str = "final") -> str:
    """Per-slice table of the selected test metrics (console / README)."""
    from ray_pinet.evaluation.protocol import slice_names

    cols = ["p@10", "r@10", "ndcg@10", "ndcg@20", "ohr@10", "uhr@10", "users"]
    lines = ["| slice | " + " | ".join(c.upper() if c != "users" else c for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for s in slice_names(num_strata):
        vals = []
        for c in cols:
            v = final.get(f"{prefix}/{s}/{c}")
            vals.append("-" if v is None else (f"{int(v)}" if c == "users" else f"{v:.4f}"))
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
