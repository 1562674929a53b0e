"""Training throughput: positions/s of ``joint`` and ``pinet`` (stage 1) on Ray Train with 1 and 2
workers, against a plain single-process PyTorch loop on the same model, data and thread count.

    python benchmarks/train_throughput.py --config configs/beauty.yaml --epochs 3 \
        --out benchmarks/results/train_throughput
    python benchmarks/train_throughput.py --smoke --out /tmp/tt-smoke

Ray Train runs are the real ``fit`` (the code path of ``ray-pinet train``) with validation and
MLflow off, stage 2 off (``pinet`` = its GA stage 1) and ``run.torch_threads`` = ``--threads`` / W,
so every layout uses the same total number of threads. Their numbers are rank 0's per-epoch
``train/positions_per_s`` and ``train/time_{data,forward,backward,allreduce,optimizer}_s``
(training/loop.py), shown per step. The plain loop is the no-framework limit: the same RecModel,
initial weights, prepared training rows, global batches (``epoch_batches``), loss, Adam and
``--threads``, with ``loss.mean().backward()`` and no process group, Ray or GA weighting (for the
default prior, power with alpha 0, GA's gradient is this pooled mean). It runs before Ray starts.

``positions_per_s`` is the median over epochs after the first (the first pays warm-up), or the
only epoch. ``vs_plain`` = Ray Train / plain at the same total threads; ``vs_1_worker`` = W
workers / 1 worker of the same method.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))  # run from a checkout without installing
from report import machine_info, write_results  # noqa: E402

PARTS = ("data", "forward", "backward", "allreduce", "optimizer")
COLUMNS = ["method", "impl", "workers", "threads_per_worker", "positions_per_s", "per_thread_pos_s",
           "vs_plain", "vs_1_worker", *[f"{p}_ms" for p in PARTS], "step_ms", "epochs"]
SMOKE_SETS = ["model.dim=16", "model.num_blocks=1", "model.max_len=10", "optim.batch_size=64"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "beauty.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="train-config override")
    p.add_argument("--methods", nargs="+", default=["joint", "pinet"], choices=("joint", "pinet"))
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="total torch threads per layout")
    p.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch loop")
    p.add_argument("--plain-layouts", nargs="+", default=["padded"], choices=("padded", "packed"),
                   help="batch layouts of the plain loop; vs_plain compares with the first")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "train_throughput")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "ray-pinet-bench" / "train",
                   help="Ray Train storage of the runs (and the smoke data)")
    p.add_argument("--smoke", action="store_true",
                   help="synthetic 4,000-row log, tiny SASRec, joint, 1 worker, 1 epoch")
    args = p.parse_args(argv)
    if args.smoke:
        args.methods, args.workers, args.epochs = ["joint"], [1], 1
        args.plain_layouts = ["padded", "packed"]
        args.set = SMOKE_SETS + args.set
    return args


def train_config(args: argparse.Namespace, method: str, workers: int, data_path: str | None, name: str):
    from ray_pinet.config import TrainConfig

    sets = list(args.set) + [
        f"method={method}", f"optim.max_epochs={args.epochs}", "optim.max_minutes=0",
        "eval.every=1000000", "tracking.enabled=false", "stage2.enabled=false", "run.progress=false",
        f"run.num_workers={workers}", f"run.torch_threads={max(1, args.threads // workers)}",
        f"run.name={name}", f"run.storage_path={args.work_dir / 'runs'}",
    ]
    if data_path:  # prepared here, not by the config's data.prepare (which train would check it against)
        sets += [f"data.path={data_path}", "data.prepare=null"]
    return TrainConfig.from_yaml(args.config, sets)


def start_local_ray() -> None:
    """``start_ray``: a new local instance (dashboard, 4+ logical CPUs, gloo on loopback)."""
    from ray_pinet.local_ray import start_ray

    start_ray()


def smoke_data(args: argparse.Namespace) -> str:
    """A synthetic 4,000-row log prepared by ray-pinet (L = 10), under the work dir."""
    from ray_pinet.config_base import from_dict
    from ray_pinet.data.config import PrepareConfig
    from ray_pinet.data.pipeline import prepare
    from ray_pinet.data.synthetic import generate

    log, out = args.work_dir / "smoke-log", args.work_dir / "smoke-prepared"
    generate(log, 4_000, num_items=500, seed=0, rows_per_file=2_000)
    prepare(from_dict(PrepareConfig, {"source": {"format": "parquet", "path": str(log)},
                                      "samples": {"max_len": 10}, "output": str(out), "num_buckets": 2}),
            progress=False)
    return str(out)


def plain_loop(cfg, threads: int, packed: bool = False) -> list[dict]:
    """The no-framework limit: one process, ``threads`` torch threads, same rows and batches;
    ``packed``: the same loop on padding-free rows (training/packing.py)."""
    import pyarrow.parquet as pq

    from ray_pinet.methods.losses import per_position_losses
    from ray_pinet.models.registry import build_model
    from ray_pinet.training.batches import TrainRows, epoch_batches
    from ray_pinet.training.run_inputs import load_run_meta

    torch.set_num_threads(threads)
    meta = load_run_meta(Path(cfg.data.path))
    n_neg = meta.train_negatives if cfg.loss == "bce" else 0
    rows = TrainRows(pq.read_table(Path(cfg.data.path) / "train"), cfg.model.max_len, meta.num_train_samples, n_neg)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model, meta.num_items, meta.num_strata, None)
    model.use_plugins = False
    params = list(model.backbone_parameters())
    opt = torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    epochs = []
    for epoch in range(cfg.optim.max_epochs):
        model.train()
        times = dict.fromkeys(PARTS, 0.0)
        positions, t_epoch = 0, time.perf_counter()
        for ids in epoch_batches(meta.num_train_samples, cfg.optim.batch_size, cfg.run.seed, epoch):
            t0 = time.perf_counter()
            b = rows.take(ids, packed=packed)
            t1 = time.perf_counter()
            loss_vec, _ = per_position_losses(model, b.inputs, b.targets, b.negs, None, cfg.loss,
                                              segments=b.segments)
            loss = loss_vec.mean()
            opt.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            opt.step()
            t4 = time.perf_counter()
            for part, dt in zip(("data", "forward", "backward", "optimizer"), np.diff([t0, t1, t2, t3, t4])):
                times[part] += float(dt)
            positions += loss_vec.numel()
        seconds = time.perf_counter() - t_epoch
        epochs.append({"train/positions_per_s": positions / seconds, "train/epoch_seconds": seconds,
                       **{f"train/time_{p}_s": v for p, v in times.items()}})
    return epochs


def summarise(epochs: list[dict], steps: int) -> dict:
    """Median over the epochs after the first (or the only one); times per step in ms."""
    use = epochs[1:] or epochs
    med = {k: statistics.median(e[k] for e in use) for k in use[0]}
    out = {"positions_per_s": round(med["train/positions_per_s"], 1), "epochs": len(epochs),
           "per_epoch_positions_per_s": [round(e["train/positions_per_s"], 1) for e in epochs]}
    for p in PARTS:
        out[f"{p}_ms"] = round(1000 * med.get(f"train/time_{p}_s", 0.0) / steps, 3)
    out["step_ms"] = round(1000 * med["train/epoch_seconds"] / steps, 3)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    meta = {"benchmark": "train_throughput", "machine": machine_info(), "args": vars(args)}
    data_path = None
    if args.smoke:
        start_local_ray()  # prepare needs Ray; the plain loop then shares the box with idle workers
        data_path = smoke_data(args)
    from ray_pinet.training.batches import num_steps
    from ray_pinet.training.run_inputs import ensure_prepared, load_run_meta
    from ray_pinet.training.trainer import fit

    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = train_config(args, args.methods[0], 1, data_path, "unused")
    ensure_prepared(base, progress=False)
    steps = num_steps(load_run_meta(Path(base.data.path)).num_train_samples, base.optim.batch_size)
    rows: list[dict] = []
    plain = None
    if not args.no_plain:
        for layout in args.plain_layouts:
            res = summarise(plain_loop(base, args.threads, packed=layout == "packed"), steps)
            rows.append({"method": "joint/pinet", "impl": f"plain-{layout}", "workers": 1,
                         "threads_per_worker": args.threads, **res})
            plain = plain or res
    import ray

    if not ray.is_initialized():
        start_local_ray()
    one_worker: dict[str, float] = {}
    for method in args.methods:
        for w in args.workers:
            cfg = train_config(args, method, w, data_path, f"bench-throughput-{method}-w{w}-{stamp}")
            t = time.perf_counter()
            res = fit(cfg, progress=False)
            epochs = [h for h in res.history if h.get("stage") == 1.0]
            row = {"method": method, "impl": "ray-train", "workers": w,
                   "threads_per_worker": cfg.run.torch_threads, **summarise(epochs, steps),
                   "fit_wall_s": round(time.perf_counter() - t, 1)}
            if w == 1:
                one_worker[method] = row["positions_per_s"]
            if plain:
                row["vs_plain"] = round(row["positions_per_s"] / plain["positions_per_s"], 3)
            if method in one_worker:
                row["vs_1_worker"] = round(row["positions_per_s"] / one_worker[method], 3)
            rows.append(row)
    for r in rows:
        r["per_thread_pos_s"] = round(r["positions_per_s"] / (r["workers"] * r["threads_per_worker"]), 1)
    meta["steps_per_epoch"] = steps
    meta["data"] = str(base.data.path)
    write_results(args.out, "train_throughput", rows, COLUMNS, meta)
    print(json.dumps({"steps_per_epoch": steps, "data": str(base.data.path)}))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
