"""All-reduce overhead: GA's weighted all-reduce (``ga_step.GradReducer``) against DDP's default
gradient all-reduce, same model and batch, 2 gloo processes on one host.

    python benchmarks/allreduce.py --params 1e5 1e6 1e7 1e8 --out benchmarks/results/allreduce
    python benchmarks/allreduce.py --smoke --out /tmp/ar-smoke

Model: ray-pinet's SASRec backbone (``--dim``, ``--blocks``, L = ``--max-len``, dropout 0) whose item
table is sized so the backbone has P parameters (the item embeddings are most of a recommender's
parameters); BCE loss with one sampled negative per position, so the compute per step stays small
while the gradient, and so the all-reduce, is dense and P floats long. Each rank holds
``--rows`` full windows (no padding: every rank has exactly rows x L positions).

Per step, median over ``--reps`` after ``--warmup``, timed on rank 0 after a barrier:

* ``ga``: what ``training/loop.py`` runs: ``GradReducer.start_counts`` (the K-float count
  all-reduce, asynchronous) before the forward, then ``GradReducer.backward`` (gradients written
  into one flat buffer, all-reduced in ``--bucket-cap-mb`` buckets while the backward runs);
  ``ga_allreduce_ms`` = its time outside the backward pass (waiting for the collectives).
* ``ddp``: ``DistributedDataParallel`` (25 MB buckets by default, ``--bucket-cap-mb`` for both;
  all-reduce overlapped with the backward) forward + ``loss.mean().backward()``.
* ``ddp_nosync``: the same under ``no_sync()``: the compute alone; ``ddp_comm_ms`` = ddp - nosync.

Correctness (checked before timing, both paths from the same weights): GA with the
``interaction_share`` prior is the pooled mean over the global batch, Σ_k ∇ℓ_k / N; DDP averages the
ranks' local means, (1/W) Σ_r Σ_{k∈r} ∇ℓ_k / n_r. They are equal exactly when every rank holds the
same number of units, which is why the batch has equal, unpadded rows on both ranks; the maximum
relative difference must stay below ``--tolerance``, and a rank's local gradient must differ from
both (else neither path reduced anything).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))  # run from a checkout without installing
from report import machine_info, parse_count, write_results  # noqa: E402

from ray_pinet.training.collectives import flatten_grads  # noqa: E402

COLUMNS = ["params", "ga_step_ms", "ddp_step_ms", "ratio_ga_ddp", "ga_allreduce_ms", "ddp_comm_ms",
           "ddp_nosync_step_ms", "grad_max_rel_err"]
WORLD = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=parse_count, nargs="+", default=[10**5, 10**6, 10**7, 10**8])
    p.add_argument("--out", type=Path, default=BENCH / "results" / "allreduce")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--rows", type=int, default=32, help="training windows per rank")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // WORLD), help="per process")
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--timeout-s", type=int, default=300, help="gloo collective timeout")
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="GA's and DDP's gradient bucket size")
    p.add_argument("--smoke", action="store_true",
                   help="P = 1e5 only, 1 warm-up step, 3 timed steps, 0.05 MB buckets (several per step)")
    args = p.parse_args(argv)
    if args.smoke:
        args.params, args.warmup, args.reps, args.bucket_cap_mb = [10**5], 1, 3, 0.05
    return args


# ---------------------------------------------------------------------------------------------
# One rank
# ---------------------------------------------------------------------------------------------


class PositionLosses(torch.nn.Module):
    """Per-position BCE losses of a RecModel behind ``forward``: what DDP wraps (DDP only
    synchronises what runs through its own forward)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs, targets, negs):
        from ray_pinet.methods.losses import per_position_losses

        return per_position_losses(self.model, inputs, targets, negs, None, "bce")[0]


def sized_model(params: int, dim: int, blocks: int, max_len: int):
    """A SASRec backbone with (as near as the embedding width allows) ``params`` parameters."""
    from ray_pinet.models.config import ModelConfig
    from ray_pinet.models.registry import build_model

    cfg = ModelConfig(backbone="sasrec", dim=dim, num_blocks=blocks, dropout=0.0, max_len=max_len)
    base = sum(p.numel() for p in build_model(cfg, 1).parameters())  # 1 item: 2 embedding rows
    num_items = max(1, 1 + round((params - base) / dim))
    torch.manual_seed(0)  # the same weights on every rank
    return build_model(cfg, num_items), num_items


def _batch(rank: int, rows: int, max_len: int, num_items: int):
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    seq = torch.randint(1, num_items + 1, (rows, max_len + 1), generator=g)
    negs = torch.randint(1, num_items + 1, (rows, max_len, 1), generator=g)
    strata = torch.randint(0, 2, (rows,), generator=g)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), negs, strata


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))


def _one_size(rank: int, args: argparse.Namespace, target: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ray_pinet.methods.ga import Prior, batch_unit_counts
    from ray_pinet.training.ga_step import GradReducer

    model, num_items = sized_model(target, args.dim, args.blocks, args.max_len)
    losses = PositionLosses(model)
    params = list(model.backbone_parameters())
    # shares the parameters: one copy of the weights serves both paths
    ddp = DDP(losses, bucket_cap_mb=args.bucket_cap_mb)
    reducer = GradReducer(params, 2, args.bucket_cap_mb)  # its hooks act only in its own backward
    inputs, targets, negs, strata = _batch(rank, args.rows, args.max_len, num_items)
    row_of_position = torch.arange(args.rows).repeat_interleave(args.max_len)  # every position is valid

    def ga_timed() -> tuple[float, float]:
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        reducer.start_counts(batch_unit_counts(inputs, targets, strata, "position", 2))
        loss_vec = losses(inputs, targets, negs)
        t1 = time.perf_counter()
        info = reducer.backward(loss_vec, strata[row_of_position], Prior("interaction_share"))
        t2 = time.perf_counter()
        return t2 - t0, (t2 - t1) - info.backward_s

    def ddp_timed(sync: bool) -> float:
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        if sync:
            ddp(inputs, targets, negs).mean().backward()
        else:
            with ddp.no_sync():
                ddp(inputs, targets, negs).mean().backward()
        return time.perf_counter() - t0

    ga_timed()
    g_ga = flatten_grads(params)
    ddp_timed(True)
    g_ddp = flatten_grads(params)
    ddp_timed(False)
    g_local = flatten_grads(params)  # this rank's mean alone: must differ, or nothing was reduced
    err = _max_rel_err(g_ga, g_ddp)
    reduced = _max_rel_err(g_local, g_ddp) > 1e-3
    times: dict[str, list[float]] = {"ga": [], "ga_comm": [], "ddp": [], "ddp_nosync": []}
    for rep in range(args.warmup + args.reps):
        measured = rep >= args.warmup
        for name in ("ga", "ddp", "ddp_nosync"):  # interleaved: slow drift hits all three alike
            dist.barrier()
            if name == "ga":
                step, comm = ga_timed()
                if measured:
                    times["ga_comm"].append(comm)
            else:
                step = ddp_timed(name == "ddp")
            if measured:
                times[name].append(step)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    n_params = sum(p.numel() for p in params)
    num_buckets = reducer.num_buckets
    reducer.close()
    del ddp, losses, model, reducer
    return {
        "params": n_params, "target_params": target, "num_items": num_items,
        "ga_step_ms": round(med["ga"], 3), "ddp_step_ms": round(med["ddp"], 3),
        "ratio_ga_ddp": round(med["ga"] / med["ddp"], 3), "ga_allreduce_ms": round(med["ga_comm"], 3),
        "ddp_nosync_step_ms": round(med["ddp_nosync"], 3),
        "ddp_comm_ms": round(med["ddp"] - med["ddp_nosync"], 3),
        "grad_max_rel_err": err, "grads_equal": err < args.tolerance and reduced,
        "positions_per_rank": args.rows * args.max_len, "reps": args.reps, "ga_buckets": num_buckets,
    }


def _rank_main(rank: int, args: argparse.Namespace, port: int, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=args.timeout_s))
    try:
        rows = [_one_size(rank, args, p) for p in args.params]
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(result).write_text(json.dumps(rows))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    # gloo's default interface lookup fails in containers; both ranks are on this host.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    args.out.mkdir(parents=True, exist_ok=True)
    result = args.out / "_ranks.json"
    from ray_pinet.local_ray import free_local_port

    mp.spawn(_rank_main, args=(args, free_local_port(0), str(result)), nprocs=WORLD, join=True)
    rows = json.loads(result.read_text())
    result.unlink()
    meta = {"benchmark": "allreduce", "machine": machine_info(), "args": vars(args), "world": WORLD}
    write_results(args.out, "allreduce", rows, COLUMNS, meta)
    bad = [r["params"] for r in rows if not r["grads_equal"]]
    if bad:
        raise SystemExit(f"GA and DDP gradients differ (> {args.tolerance} relative) at P = {bad}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
