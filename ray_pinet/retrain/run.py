"""``ray-pinet retrain``: the daily job. New date partitions -> activeness recomputed over history
plus new data -> candidate warm-started from the registered version -> both scored on the
newest holdout per stratum -> registered only if no stratum regresses beyond the tolerance.
A drift report (stratum shares, thresholds, metric deltas) goes to the candidate's MLflow run.

Exit codes of the command: 0 = registered (or nothing new to train on), 3 = candidate rejected
(the registered version stays), 2 = bad input/config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ray_pinet.config import TrainConfig
from ray_pinet.config_base import ConfigError, apply_overrides, load_yaml
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.pipeline import prepare
from ray_pinet.data.prepared import read_split
from ray_pinet.evaluation.bootstrap import paired_intervals
from ray_pinet.evaluation.protocol import outcome_metrics, user_outcomes
from ray_pinet.models.registry import build_model
from ray_pinet.outputs import replaced_dir, write_file
from ray_pinet.retrain import warm
from ray_pinet.retrain.gate import drift, gate, report_markdown
from ray_pinet.retrain.partitions import Partition, canonical_columns, discover, select
from ray_pinet.storage_uri import is_remote
from ray_pinet.tracking import mlflow_utils as mu
from ray_pinet.tracking.plots import plot_retrain
from ray_pinet.tracking.registry import register_run
from ray_pinet.training.batches import EvalRows
from ray_pinet.training.checkpoint import load_state
from ray_pinet.training.run_inputs import load_run_meta
from ray_pinet.training.sequence_outputs import rebuild_model
from ray_pinet.training.trainer import fit

GATE_METRICS = ("ndcg", "hr", "auc", "gauc")
REJECTED = 3


@dataclass
class RetrainOptions:
    logs: str  # root of the date=YYYY-MM-DD partitions
    model_name: str  # registered model: warm start source, gate reference, where the candidate goes
    through: Optional[str] = None  # last partition date to use (default: the newest)
    checkpoint: Optional[str] = None  # warm-start from this checkpoint instead of the registry
    tolerance: float = 0.005  # largest relative loss of any slice's gate metric that still registers
    metric: str = "ndcg"
    force: bool = False  # retrain even when there is no new partition
    prepare_overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.metric not in GATE_METRICS:
            raise ConfigError(f"--metric {self.metric!r} is not one of {list(GATE_METRICS)}")
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError(f"--tolerance must be in [0, 1), got {self.tolerance}")
        if "'" in self.model_name and '"' in self.model_name:  # mlflow_utils.filter_literal
            raise ConfigError(f"--model {self.model_name!r} holds both quote characters, which MLflow's "
                              "search filters cannot express: drop one of them")


def prepared_dir(base: TrainConfig, through: str) -> Path:
    base_path = Path(base.data.path)
    return base_path.parent / f"{base_path.name}-through-{through}"


def prepare_partitions(base: TrainConfig, parts: list[Partition], out: Path, overrides: list[str],
                       progress: bool) -> Path:
    """Prepare history + new partitions into ``out`` with the base prepare config's cleaning,
    strata and sample settings (activeness recomputed over all of them). Reused when ``out``
    already holds exactly these partitions."""
    record = {"through": parts[-1].date, "partitions": [p.date for p in parts]}
    marker = out / "partitions.json"
    if (out / "strata.json").exists() and marker.exists() and json.loads(marker.read_text()) == record:
        print(f"prepared data for {record['through']} already at {out}: reused", flush=True)
        return out
    if not base.data.prepare:
        raise ConfigError("retrain needs data.prepare in the train config: its cleaning, strata and "
                          "samples settings are applied to the partitions")
    raw = load_yaml(base.data.prepare)
    cols = canonical_columns(parts[0])
    raw["source"] = {"format": "parquet", "path": [p.path for p in parts], "timestamp_unit": "s",
                     "columns": {c: c for c in cols if c in ("user_id", "item_id", "timestamp", "rating", "behavior")}}
    raw["output"] = str(out)
    prepare(PrepareConfig.from_dict(apply_overrides(raw, overrides)), progress=progress)
    write_file(marker, json.dumps(record, indent=2))  # atomic: a torn marker would mislabel the data
    return out


def write_report(out: Path, summary: dict, uri: str, run_id: str) -> None:
    """The report folder ``out`` (summary.json, drift.json, drift.md, drift.png), also logged to
    the candidate's MLflow run. It appears whole or not at all: a retrain failing here (a plot,
    the tracking server) leaves the previous report of this run name as it was. ``warm_start/``
    (the candidate's start, written there before the fit) stays in the folder."""
    with replaced_dir(out, keep=("warm_start",)) as new:
        (new / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
        (new / "drift.json").write_text(json.dumps({"drift": summary["drift"], "gate": summary["gate"]}, indent=2))
        (new / "drift.md").write_text(report_markdown(summary))
        plot_retrain(summary["gate"], summary["drift"], new / "drift.png")
        for f in ("summary.json", "drift.json", "drift.md", "drift.png"):
            mu.log_artifact(uri, run_id, new / f, "retrain")


def retrain(config: Optional[str], overrides: list[str], opts: RetrainOptions) -> dict:
    """Run one retrain; returns its summary (also written to <storage>/retrain/<run>/summary.json)."""
    opts.validate()
    base, storage, uri = _checked_base(config, overrides)
    parts = select(discover(opts.logs), opts.through)
    through = parts[-1].date
    inc = warm.from_checkpoint(opts.checkpoint) if opts.checkpoint else warm.from_registry(uri, opts.model_name)
    new_parts = [p.date for p in parts if inc is None or inc.through is None or p.date > inc.through]
    print(f"retrain through {through}: {len(parts)} partition(s), new since the incumbent: "
          f"{new_parts or 'none'}; incumbent: {inc.source if inc else 'none (first training)'}", flush=True)
    summary: dict = {"through": through, "partitions": [p.date for p in parts], "new_partitions": new_parts,
                     "incumbent": inc.source if inc else None, "registered": None}
    if inc is not None and not new_parts and not opts.force:
        summary["decision"] = "up-to-date"
        print(f"{inc.source} was trained through {inc.through}: nothing new (--force to retrain anyway)")
        return summary

    data = prepare_partitions(base, parts, prepared_dir(base, through), opts.prepare_overrides, base.run.progress)
    cfg = TrainConfig.from_dict(apply_overrides(base.to_dict(), [
        f"data.path={data}", "data.prepare=null", f"run.name={base.run.name}-through-{through}"]))
    meta = load_run_meta(data)
    inc_model = None if inc is None else _warm_start(inc, cfg, meta, data, storage, summary)
    res = fit(cfg, tags={"retrain.through": through, "retrain.incumbent": summary["incumbent"] or "none"})
    g = _gate(cfg, meta, data, res, inc_model, opts, summary)
    summary.update({"drift": drift(inc.strata if inc else None, meta.strata), "candidate_run": res.run_id,
                    "data": str(data), "decision": "registered" if g.accepted else "rejected"})
    # Both outcomes are registered (the candidate stays findable beside its incumbent); only a
    # candidate that passes the gate takes @champion, a rejected one is tagged with why.
    tags = {"data.through": through, "method": cfg.method, "run_name": cfg.run.name,
            "retrain.parent": inc.source if inc else "none", "retrain.decision": summary["decision"],
            "retrain.gate": json.dumps({r.slice: None if r.change is None else round(r.change, 5) for r in g.rows})}
    if not g.accepted:
        tags["retrain.rejected_because"] = "; ".join(g.reasons)[:5000]
    reg = register_run(uri, res.run_id, opts.model_name, tags, str(data), make_champion=g.accepted)
    summary["registered"] = reg["uri"] if g.accepted else None
    summary["registered_without_alias"] = None if g.accepted else reg["uri"]
    summary["champion"] = reg["champion"]

    out = storage / "retrain" / cfg.run.name
    write_report(out, summary, uri, res.run_id)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for key in ("retrain.decision", "retrain.rejected_because"):  # the candidate run gets them too
        if key in tags:
            client.set_tag(res.run_id, key, tags[key])
    summary["report_dir"] = str(out)
    return summary


def _checked_base(config: Optional[str], overrides: list[str]) -> tuple[TrainConfig, Path, str]:
    """(base config, local storage folder, tracking URI), refusing what retrain cannot do."""
    base = TrainConfig.from_yaml(config, overrides)
    if not base.tracking.enabled or not base.tracking.log_model:
        raise ConfigError("retrain registers models: tracking.enabled and tracking.log_model must be true")
    if base.run.init_from or base.run.warm_start:
        raise ConfigError("retrain chooses the warm start itself (--checkpoint or the registered "
                          "version): leave run.init_from / run.warm_start unset")
    if is_remote(base.run.storage_path):  # never Path-resolved: it would become <cwd>/s3:/...
        raise ConfigError(f"run.storage_path={base.run.storage_path!r}: retrain writes its drift reports and "
                          "warm-start weights under run.storage_path, which must be a local (or mounted) "
                          "path; object-storage URIs are for prepare, train and twotower")
    storage = Path(base.run.storage_path).expanduser().resolve()
    return base, storage, mu.resolve_tracking_uri(base.tracking.tracking_uri, str(storage))


def _warm_start(inc, cfg: TrainConfig, meta, data: Path, storage: Path, summary: dict):
    """The incumbent on the new vocabulary (its scoring model); sets ``cfg.run.warm_start`` to
    the same weights written as a checkpoint."""
    if int(inc.strata["num_strata"]) != meta.num_strata:
        raise ConfigError(f"the incumbent has {inc.strata['num_strata']} strata, the new data "
                          f"{meta.num_strata}: retrain keeps the stratification's K")
    torch.manual_seed(cfg.run.seed)  # the new items' rows: the candidate's seeded initialisation
    template = build_model(cfg.model, meta.num_items, meta.num_strata,
                           cfg.stage2.plugin if cfg.uses_plugins else None)
    # One remap serves both: the warm start of the candidate and the incumbent's scoring model.
    inc_model, state, vocab = warm.on_vocabulary(inc, warm.item_ids(data / "items.parquet"), template)
    cfg.run.warm_start = warm.write_warm_checkpoint(
        state, cfg.to_dict(), meta.__dict__, storage / "retrain" / cfg.run.name / "warm_start")
    summary["vocabulary"] = vocab.to_dict()
    print(f"warm start from {inc.source}: {vocab.kept} items kept, {vocab.added} new, "
          f"{vocab.dropped} gone", flush=True)
    return inc_model


def _gate(cfg: TrainConfig, meta, data: Path, res, inc_model, opts: RetrainOptions, summary: dict):
    """Candidate and incumbent on the newest holdout (the new data's test split: one code path,
    the new strata), and the per-stratum gate between them."""
    rows = EvalRows(read_split(data, "test"), cfg.model.max_len)
    k, K = cfg.eval.k, meta.num_strata

    def score(model):  # evaluate() without the collectives, keeping the per-user outcomes
        out = user_outcomes(model, rows, k, cfg.eval.batch_size, cfg.eval.candidates > 0)
        return outcome_metrics(out, out["stratum"], K, k), out

    cand, cand_out = score(rebuild_model(load_state(res.checkpoint_path))[0])
    inc_metrics = intervals = None
    metric = f"{opts.metric}@{k}" if opts.metric in ("ndcg", "hr") else opts.metric
    if inc_model is not None:
        inc_metrics, inc_out = score(inc_model)
        per_user = {"ndcg": "ndcg", "hr": "hit"}.get(opts.metric)
        if per_user:
            intervals = paired_intervals(inc_out[per_user].numpy(), cand_out[per_user].numpy(),
                                         cand_out["stratum"].numpy(), K, seed=cfg.run.seed)
    g = gate(inc_metrics, cand, K, metric, opts.tolerance, intervals)
    summary.update({"gate": g.to_dict(), "candidate": cand, "incumbent_metrics": inc_metrics})
    return g
