"""What each ``ray-pinet`` subcommand runs (``cli.py`` parses and dispatches here). Imported only once a
command runs: it pulls in torch, Ray and MLflow, which ``ray-pinet --help`` does not need."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import pyarrow as pa

from ray_pinet.compare.grid import build_cells, load_done, run_grid
from ray_pinet.compare.report import write_report
from ray_pinet.config_base import ConfigError
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.sources import first_row, read_log
from ray_pinet.kinds import kind_named
from ray_pinet.outputs import refuse_input_inside
from ray_pinet.retrain.partitions import check_seconds, date_range, write_partitions
from ray_pinet.retrain.run import REJECTED, RetrainOptions, retrain
from ray_pinet.storage_uri import local_or_uri
from ray_pinet.tracking import mlflow_utils as mu
from ray_pinet.tracking.registry import register_run
from ray_pinet.training.resume import move_aside
from ray_pinet.training.trainer import fit
from ray_pinet.tuning.sweep import run_sweep


def check_output_file(path: Optional[str], flag: str) -> None:
    """An output file named on the command line must be writable where it is: refused before
    training, not when the results are written."""
    if path is None:
        return
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {parent} does not exist")
    if Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: is a directory")


def get_key(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def run_train(args: argparse.Namespace) -> int:
    """``train`` and ``twotower``: each ``--method`` in turn, then their comparison."""
    kind = kind_named(args.kind)
    overrides = list(args.set)
    if args.smoke_test:
        overrides = kind.smoke(args.config, overrides)
    cfg = kind.config_class.from_yaml(args.config, overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    check_output_file(args.json, "--json")
    methods = args.method or [get_key(cfg, kind.method_key)]
    results = {}
    for method in methods:
        mcfg = kind.config_class.from_yaml(args.config, overrides + [f"{kind.method_key}={method}"] + (
            [f"run.name={cfg.run.name}-{method}"] if len(methods) > 1 else []))
        ref = results.get(kind.reference)
        extra = kind.chain(mcfg, ref and ref.checkpoint_path, ref and ref.config, getattr(args, "retrain_stage1", False))
        print(f"\n{kind.describe(mcfg)}", flush=True)
        res = fit(mcfg, fresh=args.fresh, **extra)
        results[method] = res
        print("\n" + kind.result_table(res))
        if res.run_id:
            print(f"MLflow run {res.run_id} at {res.tracking_uri}")
        if mcfg.tracking.register_as:
            reg = register_result(res)
            print(f"registered: {reg['uri']}" + (" (@champion)" if reg["champion"] else ""))
    if len(results) > 1:
        print("\n" + kind.comparison_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({m: r.final for m, r in results.items()}, f, indent=2, sort_keys=True)
    return 0


def register_result(res) -> dict:
    """Register a finished run's served model as ``tracking.register_as`` (idempotent)."""
    cfg = res.config
    if not (res.run_id and res.model_uri):
        raise ConfigError("tracking.register_as needs tracking.enabled=true and tracking.log_model=true")
    return register_run(res.tracking_uri, res.run_id, cfg.tracking.register_as,
                        {"method": cfg.method, "run_name": cfg.run.name}, cfg.data.path)


def run_compare(args: argparse.Namespace) -> int:
    kind = kind_named(args.kind)
    methods = args.methods or list(kind.methods)
    wrong = [m for m in methods if m not in kind.methods]
    if wrong:
        raise ConfigError(f"compare --kind {kind.name}: methods {wrong} are not among {list(kind.methods)}")
    reference = args.reference or kind.reference
    overrides, seeds = list(args.set), args.seeds
    if args.smoke_test:
        overrides, seeds = kind.smoke(args.config, overrides), seeds[:2]
    base = kind.config_class.from_yaml(args.config, overrides)  # validates the shared settings early
    cells = build_cells(methods, args.variant, reference)
    for c in cells:  # and every cell's overrides, before hours of training
        if c.method not in kind.methods:
            raise ConfigError(f"compare --kind {kind.name}: cell {c.label!r} has method {c.method!r}")
        kind.config_class.from_yaml(args.config, overrides + [f"{kind.method_key}={c.method}"] + c.overrides)
    # a kind without backbones to vary (two-tower: MF) names its one model "mf" in the report
    backbones = (args.backbones or [get_key(base, kind.backbone_key)]) if kind.backbone_key else ["mf"]
    metrics, change = kind.report_metrics(base)
    report_args = {"reference": reference, "metrics": metrics, "change_metrics": change}
    name = args.name or f"compare-{base.run.name}"
    output = Path(args.output or f"reports/{name}")
    command = "ray-pinet " + " ".join(shlex.quote(a) for a in args.argv)
    print(f"compare {name}: {len(cells)} cells x {len(backbones)} backbone(s) x {len(seeds)} seed(s) "
          f"-> {output}", flush=True)
    if args.report_only:
        if (output / "command.txt").exists():  # the grid's own command, not this one
            command = (output / "command.txt").read_text().strip()
        done = load_done(output / "cells.jsonl")
        if not done:
            print(f"ray-pinet compare: no finished cells in {output / 'cells.jsonl'}", file=sys.stderr)
            return 1
        files = write_report(list(done.values()), output, f"ray-pinet compare: {name}", command, **report_args)
        print(files["report.md"].read_text())
        return 0
    if args.fresh:
        kept = move_aside(output)
        if kept is not None:
            print(f"--fresh: grid {name!r} starts anew; its previous report folder is kept as {kept}")
    output.mkdir(parents=True, exist_ok=True)
    command = _record_command(output, command)
    uri = parent = None
    if base.tracking.enabled:
        uri = mu.resolve_tracking_uri(base.tracking.tracking_uri, local_or_uri(base.run.storage_path))
        parent, _ = mu.start_or_resume_run(
            uri, base.tracking.experiment, name,
            {"config": args.config, "overrides": overrides, "cells": [c.__dict__ for c in cells],
             "backbones": backbones, "seeds": seeds},
            tags={"kind": "compare"}, fresh=args.fresh,
        )
    with mu.failed_on_error(uri, parent):
        run_grid(kind, args.config, overrides, cells, backbones, seeds, name, output, parent, fresh=args.fresh)
        # The report covers every finished cell of the grid, as command.txt lists every command
        # that made one (an extension with more methods used to report only its own cells).
        files = write_report(list(load_done(output / "cells.jsonl").values()), output,
                             f"ray-pinet compare: {name}", command, **report_args)
    if uri and parent:
        for f in files.values():
            mu.log_artifact(uri, parent, f, "report")
        mu.finish_run(uri, parent)
    print("\n" + files["report.md"].read_text())
    print(f"report: {output}/report.md, {output}/report.html" + (f"; MLflow parent run {parent}" if parent else ""))
    return 0


def _record_command(output: Path, command: str) -> str:
    """Every command that added cells to this grid, one per line: a rerun with more methods or
    seeds extends the grid, and the report must show how each of its cells was made."""
    earlier = (output / "command.txt").read_text().splitlines() if (output / "command.txt").exists() else []
    commands = earlier if command in earlier else earlier + [command]
    (output / "command.txt").write_text("\n".join(commands) + "\n")
    return "\n".join(commands)


def run_tune(args: argparse.Namespace) -> int:
    # the sweep applies the smoke settings of its space's kind (Kind.smoke)
    summary = run_sweep(args.space, args.config, list(args.set), name=args.name, storage=args.storage,
                        register_as=args.register_as, reference_checkpoint=args.reference_checkpoint,
                        include_defaults=not args.no_defaults_trial, num_samples=args.num_samples,
                        smoke=args.smoke_test)
    sweep = summary["sweep_dir"]
    print("\n" + open(f"{sweep}/report.md").read())
    print(f"sweep directory: {sweep}")
    if summary["registered"]:
        print(f"registered: {summary['registered']['uri']} (@champion)")
    return 0 if summary["best"] else 1


def run_retrain(args: argparse.Namespace) -> int:
    overrides = kind_named("sequence").smoke(args.config, list(args.set)) if args.smoke_test else list(args.set)
    opts = RetrainOptions(logs=args.logs, model_name=args.model, through=args.through, checkpoint=args.checkpoint,
                          tolerance=args.tolerance, metric=args.metric, force=args.force,
                          prepare_overrides=list(args.prepare_set))
    summary = retrain(args.config, overrides, opts)
    if summary.get("report_dir"):
        print("\n" + open(f"{summary['report_dir']}/drift.md").read())
        print(f"retrain report: {summary['report_dir']}")
    where = summary["registered"] or summary.get("registered_without_alias")
    note = "" if not where else f" ({where}{', @champion' if summary['registered'] else ', without @champion'})"
    print(f"decision: {summary['decision']}{note}")
    return REJECTED if summary["decision"] == "rejected" else 0


def run_partition(args: argparse.Namespace) -> int:
    cfg = PrepareConfig.from_yaml(args.config)
    if cfg.source.format == "amazon_seq":
        raise ConfigError("source.format amazon_seq holds no time (its timestamps are positions in a "
                          "user's line): it cannot be split into date partitions")
    file_rows: list[int] = []
    table, files = read_log(cfg.source, file_rows)
    refuse_input_inside(args.output, [f for f in files if os.path.isabs(f)], "--output root")
    unit = cfg.source.timestamp_unit if cfg.source.format in ("csv", "parquet") else "s"
    per_second = {"ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}.get(unit)
    if per_second:  # partitions hold unix seconds (what retrain reads); source order breaks ties
        seconds = pa.array(table.column("timestamp").to_numpy() // per_second)
        table = table.set_column(table.schema.get_field_index("timestamp"), "timestamp", seconds)
        print(f"timestamps converted from {unit} to unix seconds (rounded down)")
    check_seconds(table, files, file_rows, first_row(cfg.source))
    lo, hi = date_range(table)
    print(f"{table.num_rows} events from {len(files)} file(s), {lo} .. {hi}")
    for part, n in write_partitions(table, args.output, args.cut, overwrite=args.overwrite):
        print(f"  {part.path}: {n} rows")
    return 0
