"""``ray-pinet prepare`` and ``ray-pinet synth`` arguments; ``cli.py`` wires them as subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from ray_pinet.config_base import ConfigError, apply_overrides, load_yaml, set_dotted
from ray_pinet.data.config import SOURCES, PrepareConfig
from ray_pinet.data.pipeline import prepare_output
from ray_pinet.data.synthetic import generate
from ray_pinet.errors import DataError


def add_prepare_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="YAML PrepareConfig (e.g. configs/prepare/beauty.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, dotted (repeatable), e.g. --set strata.q=0.1",
    )
    parser.add_argument("--source", choices=SOURCES, help="shortcut for --set source.format=...")
    parser.add_argument("--path", help="shortcut for --set source.path=...")
    parser.add_argument("--output", help="shortcut for --set output=...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def prepare_config_from_args(args: argparse.Namespace) -> PrepareConfig:
    """YAML (optional), then the --source/--path/--output shortcuts, then every --set, validated."""
    data = load_yaml(args.config) if args.config else {}
    for key, value in (("source.format", args.source), ("source.path", args.path), ("output", args.output)):
        if value is not None:  # plain strings: not YAML-parsed, so a path like "1e3" stays text
            set_dotted(data, key, value)
    return PrepareConfig.from_dict(apply_overrides(data, args.set))


def run_prepare(args: argparse.Namespace) -> int:
    """0 on success; 2 with a one-line error on stderr for a config or data error."""
    try:
        cfg = prepare_config_from_args(args)
        prepare_output(cfg, progress=not args.no_progress)  # output may be an s3:// / gs:// URI
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_synth_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--output", required=True, help="directory for part-NNNNN.parquet|csv")
    parser.add_argument("--rows", type=int, required=True, help="exact number of rows")
    parser.add_argument("--items", type=int, default=100_000, help="catalogue size")
    parser.add_argument("--zipf-user", type=float, default=2.0, help="user activeness exponent (> 1)")
    parser.add_argument("--zipf-item", type=float, default=1.0, help="item popularity exponent (>= 0)")
    parser.add_argument("--min-len", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows-per-file", type=int, default=1_000_000)
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--parallel", action="store_true", help="write the parts in Ray tasks")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_synth(args: argparse.Namespace) -> int:
    try:
        summary = generate(
            args.output, args.rows, args.items, zipf_user=args.zipf_user, zipf_item=args.zipf_item,
            seed=args.seed, rows_per_file=args.rows_per_file, min_len=args.min_len, max_len=args.max_len,
            fmt=args.format, parallel=args.parallel, progress=not args.no_progress,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary["files"] = len(summary["files"])
    print(json.dumps(summary))
    return 0
