"""What a finished sequence run leaves: the model rebuilt from its checkpoint, the MLflow
metrics, plots and served model, and the console tables."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq

from ray_pinet.config import TrainConfig
from ray_pinet.evaluation.protocol import slice_names, slice_table
from ray_pinet.models.registry import build_model
from ray_pinet.serving import ScoringModule, log_served_pyfunc
from ray_pinet.storage_uri import same_place
from ray_pinet.tracking import mlflow_utils as mu
from ray_pinet.tracking.plots import plot_activeness, plot_final_bars, plot_stratum_curves
from ray_pinet.training.engine import RunMeta


def rebuild_model(snap: dict):
    """(the trained RecModel, its TrainConfig, its RunMeta) from a checkpoint state (``state.pt``)."""
    cfg = TrainConfig.from_dict(snap["config"])
    meta = RunMeta(**snap["meta"])
    model = build_model(cfg.model, meta.num_items, meta.num_strata,
                        cfg.stage2.plugin if cfg.uses_plugins else None)
    model.load_state_dict(snap["model"])
    model.use_plugins = bool(snap.get("use_plugins", False))
    model.eval()
    return model, cfg, meta


def log_run_outputs(cfg: TrainConfig, meta: RunMeta, path: Path, snap: dict, final: dict, history: list,
                    uri: str, run_id: str) -> Optional[str]:
    """Final metrics, per-stratum plots and (``tracking.log_model``) the served model of a run."""
    mu.log_metrics(uri, run_id, {k: v for k, v in final.items() if isinstance(v, (int, float))},
                   step=len(history))
    slices = slice_names(meta.num_strata)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plot_stratum_curves(history, slices, cfg.eval.k, tmp / "stratum_metrics.png")
        plot_final_bars(final, slices, cfg.eval.k, tmp / "test_metrics_by_stratum.png")
        users = pq.read_table(path / "users.parquet", columns=["activeness", "stratum"])
        plot_activeness(users.column("activeness").to_numpy(), users.column("stratum").to_numpy(),
                        tmp / "activeness_histogram.png", title=f"activeness ({path.name})")
        (tmp / "final_metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
        for f in ("stratum_metrics.png", "test_metrics_by_stratum.png", "activeness_histogram.png",
                  "final_metrics.json"):
            mu.log_artifact(uri, run_id, tmp / f, "plots" if f.endswith(".png") else None)
    if not cfg.tracking.log_model:
        return None
    # The item-index vocabulary beside the run (retrain reads it; the served model carries its own).
    mu.log_artifact(uri, run_id, path / "items.parquet", "vocab")
    return log_served_model(cfg, rebuild_model(snap)[0], uri, run_id, path, meta=meta)


def log_served_model(cfg: TrainConfig, model, uri: str, run_id: str, data_path,
                     meta: Optional[RunMeta] = None) -> Optional[str]:
    """Log ``model`` as the run's served model on raw ids (``serving.log_served_pyfunc``: the
    exported ``ScoringModule`` graph with ``data_path``'s vocabulary and users); its URI.
    With ``meta`` (a single RecModel, not a per-stratum ensemble) its weights also go to
    ``mlflow_utils.MODEL_STATE_ARTIFACT`` as plain data: what ``retrain`` warm-starts from."""
    if meta is not None:
        mu.log_model_state(uri, run_id, cfg.to_dict(), dict(meta.__dict__), model.state_dict(),
                           getattr(model, "use_plugins", False))
    if not model.supports_full:  # DIN scores given candidates only: no catalogue to rank
        print(f"ray-pinet: {cfg.model.backbone} scores candidates, not the catalogue: no served model "
              "logged (its weights are in the run's checkpoint)", file=sys.stderr)
        return None
    return log_served_pyfunc(uri, run_id, ScoringModule(model, cfg.stage2.unseen_stratum), cfg.model.max_len,
                             data_path)


def format_table(final: dict[str, float], num_strata: int, k: int = 10, prefix: str = "test") -> str:
    """Per-stratum table of the final metrics (plain text, for the console and the README)."""
    return slice_table(final, num_strata, [f"ndcg@{k}", f"hr@{k}", "auc", "gauc", "users"], prefix)


def comparison_table(results: dict) -> str:
    """NDCG@k / HR@k per slice for each method, with the change against the first (joint)."""
    methods = list(results)
    base = methods[0]
    first = results[base]
    k = first.config.eval.k
    lines = ["| slice | metric | " + " | ".join(methods) + f" | change vs {base} |",
             "|---|---|" + "---|" * len(methods) + "---|"]
    for s in slice_names(first.meta.num_strata):
        for m in (f"ndcg@{k}", f"hr@{k}", "auc"):
            vals = [results[x].final.get(f"test/{s}/{m}") for x in methods]
            b, last = vals[0], vals[-1]
            delta = f"{100.0 * (last - b) / b:+.1f}%" if b and last is not None else "-"
            lines.append(f"| {s} | {m} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals)
                         + f" | {delta} |")
    return "\n".join(lines)


def reuse_joint(cfg: TrainConfig, joint_checkpoint: Optional[str], joint_data: Optional[str],
                retrain_stage1: bool = False) -> Optional[str]:
    """Reuse a finished joint run where a method's first stage is joint training on the same data: pinet with
    a joint-equivalent stage 1 starts stage 2 from its backbone (``cfg.run.init_from`` is set in place, unless
    ``retrain_stage1``); ``finetune`` fine-tunes it (returned, for ``fit``'s ``base_checkpoint``). A run on
    other data (e.g. K = 4 buckets) trains its own."""
    if not joint_checkpoint or not joint_data or not same_place(cfg.data.path, joint_data):
        return None
    if cfg.needs.plugins and cfg.stage1_is_joint and not cfg.run.init_from and not retrain_stage1:
        cfg.run.init_from = joint_checkpoint
    return joint_checkpoint if cfg.needs.from_joint else None
