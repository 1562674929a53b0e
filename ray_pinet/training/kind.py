"""What the one training shell (driver, worker entry, CLI, compare grid, Tune sweep) needs to
know of a training kind: ``Kind``, filled in once per kind in ``ray_pinet/kinds/``.

A kind is a config class, its methods, how its data is made and checked, the loop its Ray Train
workers run, how a finished run is summarised and logged, and how the commands present it. The
loops stay separate (their schedules and evaluation differ); everything around them is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


@dataclass
class FitResult:
    config: Any  # the kind's config (TrainConfig, TwoTowerConfig)
    final: dict[str, float]
    history: list[dict]
    checkpoint_path: Optional[str]
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    model_uri: Optional[str] = None
    meta: Any = None  # the kind's data description (RunMeta; the pair data's meta.json)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoopContext:
    """What a Ray Train worker hands its kind's loop (``Kind.loop``)."""

    cfg: Any
    meta: Any
    data_path: str
    rank: int
    world: int
    device: Any  # torch.device
    resume: Optional[dict]  # the checkpoint snapshot to resume from, None for a fresh start
    report: Callable[[dict, Optional[dict]], None]  # (metrics, snapshot or None) -> Ray Train
    log: Callable[[dict, int], None]  # MLflow metrics at a step (rank 0; a no-op elsewhere)
    say: Callable[[str], None]  # one console line


@dataclass(frozen=True)
class Kind:
    name: str
    config_class: type
    methods: tuple[str, ...]
    method_key: str  # the config key naming the method ("method", "model.method")
    reference: str  # the method every other is measured against in `compare`
    smoke: Callable[[Optional[str], list[str]], list[str]]  # (config file, overrides) -> smoke overrides
    smoke_fixed: dict[str, Any]  # Tune: what a smoke sweep fixes over the space's own budget
    # -- driver ------------------------------------------------------------------------------
    prepare: Callable[[Any, bool], Path]  # (cfg, progress) -> the data folder, made when missing
    check: Callable[[Any, Path], Any]  # (cfg, data folder) -> meta, after checks only the data allows
    data_changes: Callable[[Any, Any, dict], list]  # (cfg, meta, resumed snapshot) -> (key, old, new)
    tags: Callable[[Any], dict[str, str]]  # MLflow tags of a run
    data_files: tuple[str, ...]  # files of the data folder logged with a new MLflow run
    summarise: Callable[[Any, dict], tuple[dict, list]]  # (cfg, final snapshot) -> (final, history)
    log_outputs: Callable[..., Optional[str]]  # (cfg, meta, path, snap, final, history, uri, run_id)
    # -> the served model's URI
    # A method trained as several runs (sequence: separate, finetune): (cfg) -> a function
    # (cfg, fit_one, **fit kwargs) -> FitResult that calls ``fit_one`` per run; None: one run.
    multi_run: Callable[[Any], Optional[Callable[..., FitResult]]]
    # -- worker ------------------------------------------------------------------------------
    loop: Callable[[LoopContext], None]
    # -- commands ----------------------------------------------------------------------------
    describe: Callable[[Any], str]  # the line printed before a run
    result_table: Callable[[FitResult], str]  # per-slice table of a finished run
    comparison_table: Callable[[dict[str, FitResult]], str]  # several methods side by side
    report_metrics: Callable[[Any], tuple[list, list]]  # compare report (metrics, change metrics)
    # (cfg, the reference run's checkpoint and config, retrain_stage1) -> fit kwargs of a method run
    # after the reference of the same command or grid (sequence: pinet/finetune start from joint's)
    chain: Callable[..., dict] = lambda cfg, *_: {}
    backbone_key: Optional[str] = None  # the config key compare's --backbones sets (None: one model)
    compare_metrics: Callable[[dict], dict] = lambda final: final  # a run's final -> the report's test/*
