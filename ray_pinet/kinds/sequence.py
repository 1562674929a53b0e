"""The sequence kind (``ray-pinet train``): PINet and its baselines on leave-one-out samples of
a prepared folder, trained by ``training/engine.py``."""

from __future__ import annotations

from typing import Optional

from ray_pinet.config import METHODS, TrainConfig
from ray_pinet.training.checkpoint import load_backbone_state
from ray_pinet.training.engine import Engine
from ray_pinet.training.kind import FitResult, Kind, LoopContext
from ray_pinet.training.per_stratum import fit_per_stratum
from ray_pinet.training.run_inputs import check_run_inputs, ensure_prepared
from ray_pinet.training.sequence_outputs import comparison_table, format_table, log_run_outputs, reuse_joint
from ray_pinet.training.shards import read_shard

# compare's report columns, and those its change-against-the-reference table shows
METRICS = ("ndcg@10", "hr@10", "auc", "gauc")
CHANGE_METRICS = ("ndcg@10", "auc")
SMOKE = ["optim.max_epochs=2", "stage2.max_epochs=1", "model.dim=16", "model.num_blocks=1",
         "tracking.log_model=true", "finetune.max_epochs=1", "transfer.inner_steps=2"]


def smoke(config: Optional[str], overrides: list[str]) -> list[str]:
    return SMOKE + overrides  # a user's --set still wins


def loop(ctx: LoopContext) -> None:
    """One worker: its block of every split (``read_shard``) into an ``Engine``, which runs the
    stages and reports (and checkpoints) through ``ctx``."""
    cfg = ctx.cfg
    fresh = ctx.resume is None
    init = load_backbone_state(cfg.run.init_from) if fresh and cfg.run.init_from else None
    warm = load_backbone_state(cfg.run.warm_start) if fresh and cfg.run.warm_start else None
    tables = [read_shard(ctx.data_path, s, ctx.rank, ctx.world)[0] for s in ("train", "valid", "test")]
    engine = Engine(cfg, ctx.meta, *tables, device=ctx.device, report=ctx.report, log=ctx.log, say=ctx.say,
                    resume_state=ctx.resume, init_backbone=init, warm_backbone=warm)
    if not fresh and ctx.rank == 0:
        ctx.say(f"resumed at stage {engine.state.stage}, epoch {engine.state.epoch} (world size {ctx.world})")
    engine.run()


def summarise(cfg: TrainConfig, snap: dict) -> tuple[dict, list]:
    history = snap["engine"]["history"]
    return {k: v for k, v in history[-1].items() if k != "step"}, history


def data_changes(cfg: TrainConfig, meta, snap: dict) -> list:
    old = snap.get("meta", {})
    return [(f"data ({k} of {cfg.data.path})", old.get(k), getattr(meta, k))
            for k in ("num_items", "num_strata", "num_train_samples") if old.get(k) != getattr(meta, k)]


def multi_run(cfg: TrainConfig):
    return fit_per_stratum if cfg.needs.per_stratum else None


def chain(cfg: TrainConfig, joint_checkpoint: Optional[str], joint_cfg: Optional[TrainConfig],
          retrain_stage1: bool = False) -> dict:
    """``fit`` keyword arguments of a method trained after a joint run (of config ``joint_cfg``)
    of the same command or grid: ``reuse_joint`` (pinet's joint-equivalent stage 1, finetune's base)."""
    had_init = cfg.run.init_from
    base = reuse_joint(cfg, joint_checkpoint, joint_cfg and joint_cfg.data.path, retrain_stage1=retrain_stage1)
    if cfg.run.init_from and not had_init:
        print(f"pinet stage 1 = joint training (ga.prior={cfg.ga.prior}, alpha={cfg.ga.alpha}): starting "
              f"from the joint backbone ({cfg.run.init_from}); --retrain-stage1 to retrain")
    return {"base_checkpoint": base}


def describe(cfg: TrainConfig) -> str:
    return (f"=== {cfg.method}: {cfg.model.backbone} on {cfg.data.path} "
            f"({cfg.run.num_workers} worker(s), run {cfg.run.name}) ===")


def result_table(res: FitResult) -> str:
    return (f"{res.config.method} — test metrics per stratum\n"
            + format_table(res.final, res.meta.num_strata, res.config.eval.k))


SEQUENCE = Kind(
    name="sequence", config_class=TrainConfig, methods=METHODS, method_key="method", reference="joint",
    smoke=smoke, smoke_fixed={"optim.max_epochs": 2, "stage2.max_epochs": 1, "optim.max_minutes": 0},
    prepare=ensure_prepared, check=check_run_inputs, data_changes=data_changes,
    tags=lambda cfg: {"method": cfg.method, "backbone": cfg.model.backbone},
    data_files=("strata.json", "report.json", "prepare_config.json"),
    summarise=summarise, log_outputs=log_run_outputs, multi_run=multi_run, loop=loop,
    describe=describe, result_table=result_table, comparison_table=comparison_table,
    report_metrics=lambda cfg: (list(METRICS), list(CHANGE_METRICS)),
    chain=chain, backbone_key="model.backbone",
)
