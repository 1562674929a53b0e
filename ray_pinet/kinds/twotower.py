"""The two-tower kind (``ray-pinet twotower``): OneBP, TwoBP, MF-BPR (uniform or AUC-NS
negatives) and NCF on (user, item) pair data, trained by ``training/twotower_loop.py``.

Each worker reads the pair splits of its own users (``user % W == rank``) from the prepared
Parquet files, which therefore must be on storage that every worker reads. Checkpoints are
written on evaluated epochs, so a relaunch of the same ``run.name`` resumes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

from ray_pinet.config_base import ConfigError, config_diff, format_diff, to_dict
from ray_pinet.data.pairs import SPLITS, load_meta, prepare_pairs
from ray_pinet.errors import DataError
from ray_pinet.evaluation.protocol import slice_table
from ray_pinet.methods.twotower_methods import METHODS as TWOTOWER_REGISTRY
from ray_pinet.tracking import mlflow_utils as mu
from ray_pinet.tracking.plots import plot_twotower_curves
from ray_pinet.training.kind import FitResult, Kind, LoopContext
from ray_pinet.training.twotower_loop import TwoTowerRun, run_epochs, select
from ray_pinet.twotower_config import TWOTOWER_METHODS, TwoTowerConfig

# compare's report columns (multi-item test sets: accuracy and AUC-NS's over-recommended-hot
# rate); labeled rows (ncf: Inverse Learning and its baselines) are scored pointwise.
METRICS = ("ndcg@10", "p@10", "r@10", "ohr@10")
CHANGE_METRICS = ("ndcg@10", "ohr@10")
NCF_METRICS = ("auc", "wauc", "ndcg@10", "ndcg@20")
NCF_CHANGE_METRICS = ("auc", "ndcg@10")
SMOKE = ["optim.max_epochs=2", "data.max_users=60", "model.dim=8", "eval.every=1"]


def smoke(config: Optional[str], overrides: list[str]) -> list[str]:
    """The smoke settings, then the user's ``--set``, then a ``-smoke`` suffix on the pair data
    folder and run name, the user's folder included: a smoke run's 60-user pairs never land
    where the same command's full run reads its data."""
    base = TwoTowerConfig.from_yaml(config, SMOKE + overrides)
    return SMOKE + overrides + [f"data.output={base.data.output}-smoke", f"run.name={base.run.name}-smoke"]


def ensure_pairs(cfg: TwoTowerConfig, progress: bool = True) -> Path:
    """``data.output``, prepared from ``cfg.data`` when it is missing. Prepared data made with
    other data settings is an error (naming the keys), never silently reused or overwritten."""
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


def loop(ctx: LoopContext) -> None:
    """One worker's ``run_epochs``; a checkpoint on every evaluated epoch."""
    cfg = ctx.cfg
    run = TwoTowerRun(cfg, ctx.data_path, ctx.rank, ctx.world, device=ctx.device)
    history: list[dict] = []
    if ctx.resume is not None:
        run.load_state(ctx.resume["run"])
        history = ctx.resume["history"]
        if ctx.rank == 0:
            ctx.say(f"twotower resumed after epoch {run.epoch}")

    def report(row: dict, run: TwoTowerRun) -> None:
        metrics = {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
        ctx.log(metrics, int(row["epoch"]))
        # Checkpoint (and report to Ray Train) on evaluated epochs only: an epoch of MF on ML-100K
        # takes 0.3 s, a checkpoint round trip about as long. A restart redoes at most
        # eval.every - 1 epochs; the rows in between travel in the next checkpoint's history.
        if any(k.startswith("test/") for k in row):
            state = run.state()  # collective (OneBP's user rows live on their ranks): every rank
            snap = {"run": state, "history": history + [row], "config": cfg.to_dict()}
            ctx.report(metrics, snap if ctx.rank == 0 else None)
        history.append(row)

    # history: early stopping resumes too
    run_epochs(run, report, history=history, say=ctx.say if cfg.run.progress else None)


def summarise(cfg: TwoTowerConfig, snap: dict) -> tuple[dict, list]:
    history = snap["history"]
    final = select(history, cfg)
    final["train/seconds_per_epoch"] = sum(h["train/seconds"] for h in history) / len(history)
    return final, history


def log_outputs(cfg: TwoTowerConfig, meta: dict, path: Path, snap: dict, final: dict, history: list,
                uri: str, run_id: str) -> None:
    mu.log_metrics(uri, run_id, final, step=len(history))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "final_metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
        (tmp / "history.json").write_text(json.dumps(history))
        plot_twotower_curves(history, int(meta["num_strata"]), tmp / "twotower_curves.png")
        for f in ("final_metrics.json", "history.json"):
            mu.log_artifact(uri, run_id, tmp / f)
        mu.log_artifact(uri, run_id, tmp / "twotower_curves.png", "plots")
    return None  # two-tower runs log no served model yet


def format_final(final: dict[str, float], num_strata: int, prefix: str = "final") -> str:
    """Per-slice table of the selected test metrics (console / README)."""
    cols = ["p@10", "r@10", "ndcg@10", "ndcg@20", "ohr@10", "uhr@10", "users"]
    return slice_table(final, num_strata, cols, prefix, [c.upper() if c != "users" else c for c in cols])


def describe(cfg: TwoTowerConfig) -> str:
    return (f"=== twotower {cfg.model.method} (sampler {cfg.model.sampler}) on {cfg.data.output}: "
            f"{cfg.optim.max_epochs} epochs, {cfg.run.num_workers} worker(s), run {cfg.run.name} ===")


def result_table(res: FitResult) -> str:
    return (f"{res.config.model.method}: test metrics ({res.config.eval.select_on} selection), "
            f"{res.final['train/seconds_per_epoch']:.2f} s per training epoch\n"
            + format_final(res.final, int(res.meta["num_strata"])))


def comparison_table(results: dict[str, FitResult]) -> str:
    lines = ["| method | NDCG@10 | P@10 | OHR@10 | s / epoch |", "|---|---|---|---|---|"]
    for m, r in results.items():
        cells = [f"{r.final.get(f'final/all/{k}', float('nan')):.4f}" for k in ("ndcg@10", "p@10", "ohr@10")]
        lines.append(f"| {m} | {' | '.join(cells)} | {r.final['train/seconds_per_epoch']:.2f} |")
    return "\n".join(lines)


def report_metrics(cfg: TwoTowerConfig) -> tuple[list, list]:
    labeled = TWOTOWER_REGISTRY[cfg.model.method].labeled  # labeled rows: pointwise metrics
    return (list(NCF_METRICS), list(NCF_CHANGE_METRICS)) if labeled else (list(METRICS), list(CHANGE_METRICS))


TWOTOWER = Kind(
    name="twotower", config_class=TwoTowerConfig, methods=TWOTOWER_METHODS, method_key="model.method",
    reference="twobp", smoke=smoke, smoke_fixed={"optim.max_epochs": 2, "eval.every": 1},
    prepare=ensure_pairs, check=lambda cfg, path: load_meta(path), data_changes=lambda cfg, meta, snap: [],
    tags=lambda cfg: {"method": cfg.model.method, "sampler": cfg.model.sampler},
    data_files=("meta.json", "report.json", "prepare_config.json"),
    summarise=summarise, log_outputs=log_outputs, multi_run=lambda cfg: None, loop=loop,
    describe=describe, result_table=result_table, comparison_table=comparison_table,
    report_metrics=report_metrics,
    # the selected test metrics (final/*) are what a compare report calls test/*
    compare_metrics=lambda final: {**final, **{"test/" + k[len("final/"):]: v for k, v in final.items()
                                               if k.startswith("final/")}},
)
