"""Seconds per training epoch of OneBP against TwoBP (and MF-BPR), interleaved in one process.

The question of issue 7: does OneBP (no user-tower backprop) train an epoch faster than TwoBP?
Each method gets its own ``TwoTowerRun`` (the loop of ``ray-pinet twotower``, no Ray) on the same
prepared pairs; the script then alternates one epoch of each method, ``--rounds`` times, so load
drift on a shared machine hits every method alike. Reported: median and min seconds per epoch
(training only, no evaluation) and the ratio to TwoBP's median.

    python benchmarks/twotower_epoch_time.py --rounds 20 --out benchmarks/results/twotower_epoch_time
    python benchmarks/twotower_epoch_time.py --smoke --out /tmp/tt-epoch
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))  # run from a checkout without installing
from report import machine_info, write_results  # noqa: E402

from ray_pinet.training.twotower_loop import TwoTowerRun  # noqa: E402
from ray_pinet.kinds.twotower import ensure_pairs
from ray_pinet.twotower_config import TwoTowerConfig  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/twotower/ml-100k-onebp.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--methods", nargs="+", default=["onebp", "twobp", "bpr"])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="/tmp/ray-pinet-twotower-bench")
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="60 users, 2 rounds")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sets = [f"data.output={args.work_dir}/pairs{'-smoke' if args.smoke else ''}"] + args.set
    if args.smoke:
        sets += ["data.max_users=60"]
        args.rounds = 2
    runs = {}
    for m in args.methods:
        cfg = TwoTowerConfig.from_yaml(args.config, sets + [f"model.method={m}"])
        runs[m] = TwoTowerRun(cfg, ensure_pairs(cfg, progress=False))
    times: dict[str, list[float]] = {m: [] for m in runs}
    info = machine_info()
    for r in range(args.rounds):
        for m, run in runs.items():
            times[m].append(run.train_epoch()["train/seconds"])
        print(f"round {r}: " + "  ".join(f"{m} {t[-1]:.3f}s" for m, t in times.items()), flush=True)
    base = statistics.median(times["twobp"]) if "twobp" in times else None
    rows = []
    for m, t in times.items():
        med = statistics.median(t)
        rows.append({"method": m, "rounds": len(t), "median_s": med, "min_s": min(t),
                     "vs_twobp": med / base if base else None,
                     "train_rows": runs[m].num_train, "batch": runs[m].cfg.optim.batch_size,
                     "threads": args.threads})
    write_results(Path(args.out), "twotower_epoch_time", rows,
                  ["method", "rounds", "median_s", "min_s", "vs_twobp", "train_rows", "batch", "threads"],
                  {"args": vars(args), "machine": info, "seconds": times})
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
