"""Sampled softmax against full softmax at a large catalogue: positions/s of the training step.

The question of issue 20 (2): with an M-item catalogue, how much faster does ``loss:
sampled_softmax`` (n shared, logQ-corrected negatives per global batch) train than ``loss: ce``
(all M items scored at every position)? Each loss runs a fixed number of steps of the real
stage-1 epoch (``training/loop.py::run_epoch``: packed batches, GA, Adam; one process, no Ray) of
the same SASRec on the same synthetic long-tailed log: window lengths ``2 + Zipf(2)`` (capped at
max_len + 1), items drawn by popularity rank k with P(k) ∝ 1/k over the M items. A short warm-up
epoch runs first; ``positions_per_s`` is the timed epoch's target positions / its seconds.
Reported beside it: the epoch's split (forward, backward, optimizer per step) and
``vs_ce`` = positions/s / full softmax's.

    python benchmarks/sampled_softmax.py --items 1000000 --steps 20 --negatives 1024 16384 \
        --out benchmarks/results/sampled_softmax
    python benchmarks/sampled_softmax.py --items 10000 1000000 --no-ce --negatives 1024 \
        --exchange dense rows --workers 2 --out benchmarks/results/item_exchange
    python benchmarks/sampled_softmax.py --smoke --out /tmp/ss-smoke

``--exchange rows`` (sampled softmax only) is ``optim.item_exchange: rows``: the item table's
gradient crosses ranks as its touched rows and lazy Adam steps only those (training/
sparse_rows.py). ``--workers 2`` runs each measurement on 2 spawned gloo ranks of this box, each
with ``--threads`` / 2 torch threads and its block of windows (rank 0's timings).

Memory: full softmax holds [positions, M] logits and their gradient (~5 GB at M = 10^6 and
128 windows of this log); the item table's dense gradient and Adam state are 4 x M x dim floats
for both losses with ``--exchange dense``; ``rows`` removes that part.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))  # run from a checkout without installing
from report import machine_info, parse_count, write_results  # noqa: E402

from ray_pinet.config import TrainConfig  # noqa: E402
from ray_pinet.methods.ga import Prior  # noqa: E402
from ray_pinet.methods.sampled_softmax import NegativeSampler  # noqa: E402
from ray_pinet.models.registry import build_model  # noqa: E402
from ray_pinet.training.batches import RowSubset, TrainRows  # noqa: E402
from ray_pinet.training.shards import shard_range  # noqa: E402
from ray_pinet.training.loop import EpochSetup, item_optimizers, run_epoch  # noqa: E402

COLUMNS = ["loss", "items", "negatives", "in_batch", "exchange", "workers", "steps", "positions", "seconds",
           "positions_per_s", "vs_ce", "forward_ms", "backward_ms", "allreduce_ms", "optimizer_ms", "step_ms"]


def long_tail_table(num_rows: int, num_items: int, max_len: int, seed: int) -> pa.Table:
    """Training windows (the columns ``TrainRows`` reads): Zipf lengths, 1/k item popularity."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(1 + rng.zipf(2.0, num_rows), max_len + 1)
    cdf = np.cumsum(1.0 / np.arange(1, num_items + 1))
    items = np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(int(lengths.sum())), side="right"),
                       num_items - 1) + 1
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    return pa.table({
        "sample_id": pa.array(np.arange(num_rows), pa.int64()),
        "user_idx": pa.array(np.arange(num_rows), pa.int64()),
        "stratum": pa.array((lengths > 5).astype(np.int8), pa.int8()),  # 2 strata: GA has work to do
        "seq": pa.ListArray.from_arrays(pa.array(offsets), pa.array(items.astype(np.int32))),
    })


def run_one(loss: str, negatives: int, in_batch: bool, exchange: str, items: int, args, device: torch.device,
            rank: int = 0, world: int = 1) -> dict:
    cfg = TrainConfig.from_dict({
        "method": "joint", "loss": loss,
        "sampled": {"num_negatives": max(negatives, 1), "in_batch": in_batch},
        "model": {"dim": args.dim, "num_blocks": args.blocks, "dropout": 0.0, "max_len": args.max_len},
        "optim": {"batch_size": args.batch_size, "item_exchange": exchange},
        "run": {"seed": 0, "progress": False},
    })
    table = long_tail_table(args.steps * args.batch_size, items, args.max_len, args.seed)
    lo, hi = shard_range(table.num_rows, rank, world)  # the trainer's block of this rank
    rows = TrainRows(table.slice(lo, hi - lo), args.max_len, table.num_rows, 0, device)
    torch.manual_seed(0)
    model = build_model(cfg.model, items, 2, None).to(device)
    model.use_plugins = False
    params = list(model.backbone_parameters())
    opts = item_optimizers(model, params, cfg, cfg.optim.lr)
    sampler = NegativeSampler.from_config(rows, items, cfg) if loss == "sampled_softmax" else None
    n = table.num_rows

    def epoch(e: int, first: int):
        """An epoch over the windows 0..first-1 (a warm-up) or all of them (first = n)."""
        local = np.arange(min(lo, first), min(hi, first), dtype=np.int64)
        ids = None if first == n else RowSubset(local, min(lo, first), first)
        return run_epoch(EpochSetup(model, params, opts, rows, n, cfg, 2, Prior("interaction_share"), ids=ids,
                                    sampler=sampler), e)

    epoch(0, min(args.warmup, args.steps) * args.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    stats = epoch(1, n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0

    def per_step(s: float) -> float:
        return 1000.0 * s / max(stats.steps, 1)

    return {"loss": loss, "items": items, "negatives": negatives if loss != "ce" else None,
            "in_batch": in_batch if loss != "ce" else None, "exchange": exchange, "workers": world,
            "steps": stats.steps, "positions": stats.positions,
            "seconds": seconds, "positions_per_s": stats.positions / seconds,
            "forward_ms": per_step(stats.time_forward), "backward_ms": per_step(stats.time_backward),
            "allreduce_ms": per_step(stats.time_allreduce),
            "optimizer_ms": per_step(stats.time_optimizer), "step_ms": per_step(seconds)}


def _rank(rank: int, world: int, port: int, run: tuple, args, out: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        row = run_one(*run, args, torch.device(args.device), rank, world)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(row))


def measure(run: tuple, args) -> dict:
    """One measurement in this process (1 worker) or on ``args.workers`` spawned gloo ranks."""
    if args.workers == 1:
        return run_one(*run, args, torch.device(args.device))
    import json
    import tempfile

    import torch.multiprocessing as mp

    from ray_pinet.local_ray import free_local_port

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "row.json")
        mp.spawn(_rank, args=(args.workers, free_local_port(0), run, args, out), nprocs=args.workers, join=True)
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=parse_count, nargs="+", default=[1_000_000], help="catalogue sizes")
    p.add_argument("--negatives", type=parse_count, nargs="+", default=[1024, 16384])
    p.add_argument("--in-batch", action="store_true", help="also time each n with in-batch negatives")
    p.add_argument("--no-ce", action="store_true", help="skip full softmax (e.g. when it does not fit)")
    p.add_argument("--exchange", nargs="+", default=["dense"], choices=("dense", "rows"),
                   help="item-table exchange of the sampled runs (optim.item_exchange)")
    p.add_argument("--workers", type=int, default=1, help="1 (this process) or W spawned gloo ranks")
    p.add_argument("--steps", type=int, default=20, help="timed steps (global batches)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps before the timed epoch")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in all")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "sampled_softmax")
    p.add_argument("--smoke", action="store_true", help="2,000 items, 2 steps of 16 windows, one n")
    args = p.parse_args(argv)
    if args.smoke:
        args.items, args.negatives, args.steps, args.warmup = [2000], [64], 2, 1
        args.batch_size, args.max_len, args.dim, args.blocks = 16, 10, 16, 1
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runs = []
    for items in args.items:
        runs += [] if args.no_ce else [("ce", 0, False, "dense", items)]
        runs += [("sampled_softmax", n, ib, ex, items) for n in args.negatives for ex in args.exchange
                 for ib in ([False, True] if args.in_batch else [False])]
    info = machine_info()
    rows = []
    for run in runs:
        rows.append(measure(run, args))
        print(f"{run}: {rows[-1]['positions_per_s']:,.0f} positions/s, {rows[-1]['step_ms']:.1f} ms/step", flush=True)
    for r in rows:  # against full softmax at the same catalogue size
        base = [c["positions_per_s"] for c in rows if c["loss"] == "ce" and c["items"] == r["items"]]
        r["vs_ce"] = r["positions_per_s"] / base[0] if base else None
    meta = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "device": str(device)}
    table_md = write_results(args.out, "sampled_softmax", rows, COLUMNS, meta)
    (args.out / "sampled_softmax.md").write_text(
        f"`python benchmarks/sampled_softmax.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
        + table_md + "\n")
    return rows


if __name__ == "__main__":
    main()
