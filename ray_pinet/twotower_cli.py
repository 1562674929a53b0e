"""``ray-pinet twotower``: OneBP / TwoBP / MF-BPR (uniform or AUC-NS negatives) on pair data."""

from __future__ import annotations

import argparse
import json

from ray_pinet.smoke import smoke_overrides
from ray_pinet.twotower_config import TWOTOWER_METHODS


def add_twotower_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="twotower config YAML (configs/twotower/*.yaml); defaults when omitted")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.epochs=100 (repeatable)")
    p.add_argument("--method", action="append", choices=list(TWOTOWER_METHODS),
                   help="train these methods one after the other and compare them (repeatable; "
                        "default: the config's model.method)")
    p.add_argument("--smoke-test", action="store_true",
                   help="a tiny run (60 users, 2 epochs) into prepared/<output>-smoke, to check the set-up")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--json", metavar="PATH", help="write every method's final metrics and seconds per epoch here")
    p.add_argument("--fresh", action="store_true",
                   help="train anew under the same run.name: its previous run folder is moved aside to "
                        "<name>.replaced-<time> (nothing deleted) and a new MLflow run opened; without it "
                        "a relaunch resumes, and only with an unchanged config")


def run_twotower(args: argparse.Namespace) -> int:
    from ray_pinet.twotower_config import TwoTowerConfig

    overrides = list(args.set)
    base = TwoTowerConfig.from_yaml(args.config, overrides)
    if args.smoke_test:
        overrides = smoke_overrides("twotower", args.config, overrides)
        base = TwoTowerConfig.from_yaml(args.config, overrides)
    if args.print_config:
        print(json.dumps(base.to_dict(), indent=2))
        return 0
    from ray_pinet.cli import check_output_file
    from ray_pinet.data.pairs import load_meta
    from ray_pinet.training.twotower_trainer import ensure_pairs, fit_twotower, format_final

    check_output_file(args.json, "--json")

    methods = args.method or [base.model.method]
    results = {}
    for method in methods:
        cfg = TwoTowerConfig.from_yaml(args.config, overrides + [f"model.method={method}"] + (
            [f"run.name={base.run.name}-{method}"] if len(methods) > 1 else []))
        print(f"\n=== twotower {method} (sampler {cfg.model.sampler}) on {cfg.data.output}: "
              f"{cfg.optim.epochs} epochs, {cfg.run.num_workers} worker(s), run {cfg.run.name} ===", flush=True)
        res = fit_twotower(cfg, fresh=args.fresh)
        results[method] = res
        num_strata = int(load_meta(ensure_pairs(cfg, progress=False))["num_strata"])
        print(f"\n{method}: test metrics ({cfg.eval.select_on} selection), "
              f"{res.final['train/seconds_per_epoch']:.2f} s per training epoch")
        print(format_final(res.final, num_strata))
        if res.run_id:
            print(f"MLflow run {res.run_id} at {res.tracking_uri}")
    if len(results) > 1:
        print("\n| method | NDCG@10 | P@10 | OHR@10 | s / epoch |\n|---|---|---|---|---|")
        for m, r in results.items():
            f = r.final
            print(f"| {m} | {f.get('final/all/ndcg@10', float('nan')):.4f} | {f.get('final/all/p@10', float('nan')):.4f} "
                  f"| {f.get('final/all/ohr@10', float('nan')):.4f} | {f['train/seconds_per_epoch']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({m: r.final for m, r in results.items()}, fh, indent=2, sort_keys=True)
    return 0
