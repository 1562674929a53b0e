"""``ray-pinet``: prepare | synth | train | compare | tune | retrain | partition | submit | twotower.

``main(argv)`` is importable so tests call the CLI in-process (no subprocess, no sys.argv).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ray_pinet import submit
from ray_pinet.config import METHODS
from ray_pinet.config_base import ConfigError
from ray_pinet.data import cli_args
from ray_pinet.errors import DataError
from ray_pinet.twotower_config import TWOTOWER_METHODS


def _add_train_args(p: argparse.ArgumentParser, kind: str) -> None:
    """``train`` (sequence) and ``twotower``: one command shape, one handler (``run_train``)."""
    sequence = kind == "sequence"
    p.set_defaults(kind=kind)
    p.add_argument("--config", help=("train config YAML (configs/*.yaml)" if sequence else
                                     "twotower config YAML (configs/twotower/*.yaml)") + "; defaults when omitted")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=5e-4 (repeatable)")
    p.add_argument("--method", action="append", choices=list(METHODS if sequence else TWOTOWER_METHODS),
                   help="train these methods one after the other and print their comparison "
                        "(repeatable; default: the config's method)")
    p.add_argument("--smoke-test", action="store_true",
                   help="a tiny run (2 epochs, small model) to check the installation end to end" if sequence else
                   "a tiny run (60 users, 2 epochs) into prepared/<output>-smoke, to check the set-up")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if sequence:
        p.add_argument("--retrain-stage1", action="store_true",
                       help="with --method joint --method pinet: train pinet's stage 1 even when it "
                            "equals joint training (by default pinet then starts from joint's backbone)")
    p.add_argument("--json", metavar="PATH", help="write the final metrics of every method to this JSON file")
    p.add_argument("--fresh", action="store_true",
                   help="train anew under the same run.name: its previous run folder (checkpoints) is "
                        "moved aside to <name>.replaced-<time> (nothing deleted) and a new MLflow run "
                        "opened; without it a relaunch resumes, and only with an unchanged config")


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


def _add_partition_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="prepare config YAML naming the raw log (configs/prepare/*.yaml)")
    p.add_argument("--output", required=True,
                   help="root to write date=YYYY-MM-DD partitions into (absent or empty)")
    p.add_argument("--cut", action="append", required=True, metavar="YYYY-MM-DD",
                   help="period boundary (repeatable, ascending): events before the first cut are the history "
                        "partition, each later period one new partition")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output root as a whole (nothing in it survives)")


def _add_recommend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="served model URI: models:/NAME@champion, models:/NAME/3 or runs:/ID/model")
    p.add_argument("--output", help="new folder for the Parquet files (+ _summary.json)")
    p.add_argument("--data", default=None, help="a prepared folder whose users to score (default: the users the "
                                                "model was trained on, with their latest histories)")
    p.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    p.add_argument("--batch-size", type=int, default=1024, help="users per scoring batch (default 1024)")
    p.add_argument("--actors", type=int, default=1, help="scoring actors (default 1)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor; 0 scores on CPUs")
    p.add_argument("--rows-per-file", type=int, default=1_000_000,
                   help="users per output file, at least (default 10^6; the last file holds the rest)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--smoke-test", action="store_true",
                   help="no --model needed: prepare the bundled ml-latest-small, log a tiny untrained model "
                        "to a temporary MLflow store and recommend for every user")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-pinet",
        description="PINet (gradient aggregation + per-stratum plugins) for long-tailed "
                    "sequential recommendation on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cli_args.add_prepare_args(sub.add_parser("prepare", help="raw behaviour log -> strata + leave-one-out samples"))
    cli_args.add_synth_args(sub.add_parser("synth", help="write a seeded synthetic long-tail log"))
    _add_train_args(sub.add_parser("train", help="train joint / pinet / baselines on Ray Train, tracked in MLflow"),
                    "sequence")
    _add_compare_args(sub.add_parser("compare", help="methods x backbones x seeds -> head/tail report"))
    _add_tune_args(sub.add_parser("tune", help="Ray Tune sweep (ASHA) over strata, plugins and GA prior; "
                                               "registers the best model in MLflow"))
    _add_retrain_args(sub.add_parser("retrain", help="new date partitions -> warm-started candidate -> "
                                                     "per-stratum gate against the registered version"))
    _add_partition_args(sub.add_parser("partition", help="split a raw log by time into date=YYYY-MM-DD "
                                                         "partitions (history + new days) for retrain"))
    _add_recommend_args(sub.add_parser("recommend", help="registered model -> top-k raw item ids of every user "
                                                        "(Ray Data batch scoring, Parquet)"))
    submit.add_submit_args(sub.add_parser("submit", help="run a command as a Ray Job (Jobs SDK), stream its logs, "
                                                  "exit with its exit code: submit [OPTIONS] -- COMMAND ..."))
    _add_train_args(sub.add_parser("twotower", help="two-tower MF on (user, item) pairs: OneBP, TwoBP, "
                                                    "MF-BPR with uniform or AUC-NS negatives"), "twotower")
    return parser


def _handler(command: str):
    """The run function of a subcommand. ``commands`` and ``recommend`` (torch, Ray, MLflow) are
    imported only here, when such a command runs: ``ray-pinet --help`` does not load them."""
    light = {"prepare": cli_args.run_prepare, "synth": cli_args.run_synth, "submit": submit.run_submit_cli}
    if command in light:
        return light[command]
    from ray_pinet import commands, recommend

    return {"train": commands.run_train, "twotower": commands.run_train, "compare": commands.run_compare,
            "tune": commands.run_tune, "retrain": commands.run_retrain, "partition": commands.run_partition,
            "recommend": recommend.run_recommend}[command]


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
        if isinstance(exc, DataError):
            print(f"ray-pinet: bad input: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise


def _one_line(exc: BaseException) -> str:
    # A value quoted in a message may hold a newline (a YAML block, a file's text).
    return " ".join(str(exc).split("\n"))


if __name__ == "__main__":
    sys.exit(main())
