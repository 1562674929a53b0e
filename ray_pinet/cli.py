"""``ray-pinet``: prepare | synth | train | compare | tune | retrain | partition | submit | twotower.

``main(argv)`` is importable so tests call the CLI in-process (no subprocess, no sys.argv).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from ray_pinet.config import METHODS
from ray_pinet.config_base import ConfigError
from ray_pinet.smoke import smoke_overrides
from ray_pinet.storage_uri import local_or_uri
from ray_pinet.twotower_config import TWOTOWER_METHODS


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="train config YAML (configs/*.yaml); defaults when omitted")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=5e-4 (repeatable)")
    p.add_argument("--method", action="append", choices=list(METHODS),
                   help="train these methods one after the other and print their comparison "
                        "(repeatable; default: the config's method)")
    p.add_argument("--smoke-test", action="store_true",
                   help="a tiny run (2 epochs, small model) to check the installation end to end")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--retrain-stage1", action="store_true",
                   help="with --method joint --method pinet: train pinet's stage 1 even when it "
                        "equals joint training (by default pinet then starts from joint's backbone)")
    p.add_argument("--json", metavar="PATH", help="write the final metrics of every method to this JSON file")
    p.add_argument("--fresh", action="store_true",
                   help="train anew under the same run.name: its previous run folder (checkpoints) is "
                        "moved aside to <name>.replaced-<time> (nothing deleted) and a new MLflow run "
                        "opened; without it a relaunch resumes, and only with an unchanged config")


def check_output_file(path: Optional[str], flag: str) -> None:
    """An output file named on the command line must be writable where it is: refused before
    training, not when the results are written."""
    if path is None:
        return
    from pathlib import Path

    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: directory {parent} does not exist")
    if Path(path).is_dir():
        raise ConfigError(f"{flag} {path}: is a directory")


def run_train(args: argparse.Namespace) -> int:
    from ray_pinet.config import TrainConfig

    overrides = list(args.set)
    if args.smoke_test:
        overrides = smoke_overrides("sequence", args.config, overrides)
    cfg = TrainConfig.from_yaml(args.config, overrides)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    check_output_file(args.json, "--json")
    from ray_pinet.training.trainer import fit, format_table, reuse_joint

    methods = args.method or [cfg.method]
    results = {}
    for method in methods:
        mcfg = TrainConfig.from_yaml(
            args.config, overrides + [f"method={method}"]
            + ([f"run.name={cfg.run.name}-{method}"] if len(methods) > 1 else [])
        )
        joint = results.get("joint")
        had_init = mcfg.run.init_from
        # Stage 1 with the interaction-share prior is joint training: same data, model and
        # schedule give the same backbone, so pinet starts from the joint run's (finetune too).
        base = reuse_joint(mcfg, joint and joint.checkpoint_path, joint and joint.config.data.path,
                           retrain_stage1=args.retrain_stage1)
        if mcfg.run.init_from and not had_init:
            print(f"pinet stage 1 = joint training (ga.prior={mcfg.ga.prior}, alpha={mcfg.ga.alpha}): "
                  f"starting from the joint backbone ({mcfg.run.init_from}); --retrain-stage1 to retrain")
        print(f"\n=== {method}: {mcfg.model.backbone} on {mcfg.data.path} "
              f"({mcfg.run.num_workers} worker(s), run {mcfg.run.name}) ===", flush=True)
        res = fit(mcfg, base_checkpoint=base, fresh=args.fresh)
        results[method] = res
        k = mcfg.eval.k
        print(f"\n{method} — test metrics per stratum")
        print(format_table(res.final, res.meta.num_strata, k))
        if res.run_id:
            print(f"MLflow run {res.run_id} at {res.tracking_uri}")
        if mcfg.tracking.register_as:
            reg = register_result(res)
            print(f"registered: {reg['uri']}" + (" (@champion)" if reg["champion"] else ""))
    if len(results) > 1:
        print("\n" + comparison_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({m: r.final for m, r in results.items()}, f, indent=2, sort_keys=True)
    return 0


def register_result(res) -> dict:
    """Register a finished run's served model as ``tracking.register_as`` (idempotent)."""
    from ray_pinet.tracking.registry import register_run

    cfg = res.config
    if not (res.run_id and res.model_uri):
        raise ConfigError("tracking.register_as needs tracking.enabled=true and tracking.log_model=true")
    return register_run(res.tracking_uri, res.run_id, cfg.tracking.register_as,
                        {"method": cfg.method, "run_name": cfg.run.name}, cfg.data.path)


def comparison_table(results: dict) -> str:
    """NDCG@k / HR@k per slice for each method, with the change against the first (joint)."""
    from ray_pinet.evaluation.protocol import slice_names

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


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="train config YAML: the shared settings of every cell")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every cell (repeatable)")
    p.add_argument("--kind", choices=["sequence", "twotower"], default="sequence",
                   help="sequence: `ray-pinet train` methods on a train config; twotower: `ray-pinet twotower` "
                        "methods (onebp, twobp, bpr, ncf) on a twotower config")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS + TWOTOWER_METHODS),
                   help="methods to compare (the reference is always included; default: every method of --kind)")
    p.add_argument("--reference", default=None,
                   help="the cell every change is measured against (default: joint; twobp for --kind twotower)")
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD:key=value,...",
                   help="an extra cell (ablation), e.g. pinet-uniform=pinet:ga.prior=uniform (repeatable)")
    p.add_argument("--backbones", nargs="+", default=None, help="default: the config's model.backbone")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--name", default=None, help="grid name (run names, MLflow parent run); default: config name")
    p.add_argument("--output", default=None, help="report directory (default reports/<name>)")
    p.add_argument("--smoke-test", action="store_true", help="tiny cells (2 epochs, small model), 2 seeds")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the cells finished so far (<output>/cells.jsonl); train nothing")
    p.add_argument("--fresh", action="store_true",
                   help="start the grid anew under the same name: the report folder is moved aside to "
                        "<output>.replaced-<time> and every cell trains anew (its run folder kept aside); "
                        "without it a rerun skips finished cells, and only those made with the same config")


def run_compare(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from ray_pinet.compare.grid import build_cells, load_done, run_grid
    from ray_pinet.compare.report import write_report
    from ray_pinet.config import TrainConfig
    from ray_pinet.tracking import mlflow_utils as mu

    from ray_pinet.compare.report import (
        CHANGE_METRICS,
        METRICS,
        NCF_CHANGE_METRICS,
        NCF_METRICS,
        TWOTOWER_CHANGE_METRICS,
        TWOTOWER_METRICS,
    )
    from ray_pinet.twotower_config import TwoTowerConfig

    twotower = args.kind == "twotower"
    kind_methods = TWOTOWER_METHODS if twotower else METHODS
    methods = args.methods or list(kind_methods)
    wrong = [m for m in methods if m not in kind_methods]
    if wrong:
        raise ConfigError(f"compare --kind {args.kind}: methods {wrong} are not among {list(kind_methods)}")
    reference = args.reference or ("twobp" if twotower else "joint")
    config_cls, method_key = (TwoTowerConfig, "model.method") if twotower else (TrainConfig, "method")
    overrides = list(args.set)
    seeds = args.seeds
    if args.smoke_test:
        extra = [] if twotower else ["finetune.max_epochs=1", "transfer.inner_steps=2"]
        overrides = smoke_overrides("twotower" if twotower else "sequence", args.config, extra + overrides)
        seeds = seeds[:2]
    base = config_cls.from_yaml(args.config, overrides)  # validates the shared settings early
    cells = build_cells(methods, args.variant, reference)
    for c in cells:  # and every cell's overrides, before hours of training
        config_cls.from_yaml(args.config, overrides + [f"{method_key}={c.method}"] + c.overrides)
        if (c.method in TWOTOWER_METHODS) != twotower:
            raise ConfigError(f"compare --kind {args.kind}: cell {c.label!r} has method {c.method!r}")
    backbones = ["mf"] if twotower else (args.backbones or [base.model.backbone])
    metrics, change = (TWOTOWER_METRICS, TWOTOWER_CHANGE_METRICS) if twotower else (METRICS, CHANGE_METRICS)
    if twotower and base.model.method == "ncf":  # labeled rows: pointwise metrics
        metrics, change = NCF_METRICS, NCF_CHANGE_METRICS
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
        from ray_pinet.training.resume import move_aside

        kept = move_aside(output)
        if kept is not None:
            print(f"--fresh: grid {name!r} starts anew; its previous report folder is kept as {kept}")
    output.mkdir(parents=True, exist_ok=True)
    # Every command that added cells to this grid, one per line: a rerun with more methods or
    # seeds extends the grid, and the report must show how each of its cells was made.
    earlier = (output / "command.txt").read_text().splitlines() if (output / "command.txt").exists() else []
    commands = earlier if command in earlier else earlier + [command]
    (output / "command.txt").write_text("\n".join(commands) + "\n")
    command = "\n".join(commands)
    uri = parent = None
    if base.tracking.enabled:
        uri = mu.resolve_tracking_uri(base.tracking.tracking_uri, local_or_uri(base.run.storage_path))
        parent, _ = mu.start_or_resume_run(
            uri, base.tracking.experiment, name,
            {"config": args.config, "overrides": overrides, "cells": [c.__dict__ for c in cells],
             "backbones": backbones, "seeds": seeds},
            tags={"kind": "compare"}, fresh=args.fresh,
        )
    try:
        run_grid(args.config, overrides, cells, backbones, seeds, name, output, parent, kind=args.kind,
                 fresh=args.fresh)
        # The report covers every finished cell of the grid, as command.txt lists every command
        # that made one (an extension with more methods used to report only its own cells).
        files = write_report(list(load_done(output / "cells.jsonl").values()), output,
                             f"ray-pinet compare: {name}", command, **report_args)
    except BaseException:
        if uri and parent:
            mu.finish_run(uri, parent, status="FAILED")
        raise
    if uri and parent:
        for f in files.values():
            mu.log_artifact(uri, parent, f, "report")
        mu.finish_run(uri, parent)
    print("\n" + files["report.md"].read_text())
    print(f"report: {output}/report.md, {output}/report.html" + (f"; MLflow parent run {parent}" if parent else ""))
    return 0


def _positive_int(text: str) -> int:
    # argparse's own error (usage + one line, exit 2); Tune reads num_samples=-1 as "forever".
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _add_tune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", required=True, help="search space YAML (tune_spaces/*.yaml)")
    p.add_argument("--config", help="base train config YAML (configs/*.yaml): what every trial starts from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config value for the reference and every trial (repeatable)")
    p.add_argument("--name", default=None, help="sweep name (default tune-<space>-<dataset>); rerun to resume")
    p.add_argument("--storage", default="runs/tune", help="sweep directory root (Tune state, runs, report)")
    p.add_argument("--register-as", default=None,
                   help="MLflow registered model name for the winner (default ray-pinet-<dataset>)")
    p.add_argument("--reference-checkpoint", default=None,
                   help="a finished joint run's checkpoint to use as the reference instead of training one")
    p.add_argument("--num-samples", type=_positive_int, default=None,
                   help="override the space's search.num_samples")
    p.add_argument("--no-defaults-trial", action="store_true",
                   help="do not evaluate the base config's values as the first trial")
    p.add_argument("--smoke-test", action="store_true",
                   help="tiny model, 2 epochs per stage: checks the sweep machinery end to end")


def run_tune(args: argparse.Namespace) -> int:
    from ray_pinet.tuning.sweep import run_sweep

    # the sweep applies the smoke settings of its space's kind (ray_pinet/smoke.py)
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


def _add_retrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="train config YAML (configs/*.yaml); its data.prepare gives the "
                                    "cleaning, strata and samples settings applied to the partitions")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a train config value")
    p.add_argument("--logs", required=True, help="root of the date=YYYY-MM-DD log partitions (history + new)")
    p.add_argument("--model", required=True, metavar="NAME",
                   help="registered model: warm start from its @champion version, gate against it, register the "
                        "candidate as it (@champion moves to it only when it passes the gate)")
    p.add_argument("--through", default=None, metavar="YYYY-MM-DD", help="use partitions up to this date (default: all)")
    p.add_argument("--checkpoint", default=None, help="warm-start from this checkpoint directory instead of the registry")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="largest relative per-stratum loss of the gate metric that still registers (default 0.005)")
    p.add_argument("--metric", default="ndcg", help="gate metric: ndcg, hr (at eval.k), auc or gauc")
    p.add_argument("--force", action="store_true", help="retrain even when no partition is newer than the registered version")
    p.add_argument("--prepare-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a prepare config value for the partitions (e.g. strata.q=0.3)")
    p.add_argument("--smoke-test", action="store_true", help="tiny model, 2 epochs per stage")


def run_retrain(args: argparse.Namespace) -> int:
    from ray_pinet.retrain.run import REJECTED, RetrainOptions, retrain

    overrides = smoke_overrides("sequence", args.config, list(args.set)) if args.smoke_test else list(args.set)
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


def _add_partition_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="prepare config YAML naming the raw log (configs/prepare/*.yaml)")
    p.add_argument("--output", required=True,
                   help="root to write date=YYYY-MM-DD partitions into (absent or empty)")
    p.add_argument("--cut", action="append", required=True, metavar="YYYY-MM-DD",
                   help="period boundary (repeatable, ascending): events before the first cut are the history "
                        "partition, each later period one new partition")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output root as a whole (nothing in it survives)")


def run_partition(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from ray_pinet.config_base import from_dict, load_yaml
    from ray_pinet.data.config import PrepareConfig
    from ray_pinet.data.sources import first_row, read_log
    from ray_pinet.outputs import refuse_input_inside
    from ray_pinet.retrain.partitions import check_seconds, date_range, write_partitions

    cfg = from_dict(PrepareConfig, load_yaml(args.config))
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


def build_parser() -> argparse.ArgumentParser:
    from ray_pinet.data.cli_args import add_prepare_args, add_synth_args

    parser = argparse.ArgumentParser(
        prog="ray-pinet",
        description="PINet (gradient aggregation + per-stratum plugins) for long-tailed "
                    "sequential recommendation on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_prepare_args(sub.add_parser("prepare", help="raw behaviour log -> strata + leave-one-out samples"))
    add_synth_args(sub.add_parser("synth", help="write a seeded synthetic long-tail log"))
    _add_train_args(sub.add_parser("train", help="train joint / pinet / baselines on Ray Train, tracked in MLflow"))
    _add_compare_args(sub.add_parser("compare", help="methods x backbones x seeds -> head/tail report"))
    _add_tune_args(sub.add_parser("tune", help="Ray Tune sweep (ASHA) over strata, plugins and GA prior; "
                                               "registers the best model in MLflow"))
    _add_retrain_args(sub.add_parser("retrain", help="new date partitions -> warm-started candidate -> "
                                                     "per-stratum gate against the registered version"))
    _add_partition_args(sub.add_parser("partition", help="split a raw log by time into date=YYYY-MM-DD "
                                                         "partitions (history + new days) for retrain"))
    from ray_pinet.recommend import add_recommend_args
    from ray_pinet.submit import add_submit_args
    from ray_pinet.twotower_cli import add_twotower_args

    add_recommend_args(sub.add_parser("recommend", help="registered model -> top-k raw item ids of every user "
                                                        "(Ray Data batch scoring, Parquet)"))
    add_submit_args(sub.add_parser("submit", help="run a command as a Ray Job (Jobs SDK), stream its logs, "
                                                  "exit with its exit code: submit [OPTIONS] -- COMMAND ..."))
    add_twotower_args(sub.add_parser("twotower", help="two-tower MF on (user, item) pairs: OneBP, TwoBP, "
                                                      "MF-BPR with uniform or AUC-NS negatives"))
    return parser


def _handler(command: str):
    """The run function of a subcommand (imported lazily: `ray-pinet --help` stays fast)."""
    if command in ("prepare", "synth"):
        from ray_pinet.data import cli_args

        return getattr(cli_args, f"run_{command}")
    if command == "submit":
        from ray_pinet.submit import run_submit_cli

        return run_submit_cli
    if command == "recommend":
        from ray_pinet.recommend import run_recommend

        return run_recommend
    if command == "twotower":
        from ray_pinet.twotower_cli import run_twotower

        return run_twotower
    return {"train": run_train, "compare": run_compare, "tune": run_tune, "retrain": run_retrain,
            "partition": run_partition}[command]


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if not os.environ.get("RAY_ADDRESS"):  # one machine: gloo over loopback (see local_ray.start_ray)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as typed, for reports
    # Expected failures (a setting, a path or a file the user gave) are raised as ConfigError or
    # DataError where they are found: one line and exit code 2. Anything else is a bug in
    # ray-pinet and keeps its traceback.
    try:
        return _handler(args.command)(args)
    except ConfigError as exc:
        print(f"ray-pinet: config error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        from ray_pinet.errors import DataError

        if isinstance(exc, DataError):
            print(f"ray-pinet: bad input: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise


def _one_line(exc: BaseException) -> str:
    # A value quoted in a message may hold a newline (a YAML block, a file's text).
    return " ".join(str(exc).split("\n"))


if __name__ == "__main__":
    sys.exit(main())
