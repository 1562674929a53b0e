"""GPU throughput: ray-pinet's training step (the Ray-free ``Engine``: stage 1 of ``joint``, i.e.
``run_epoch`` with GA's pooled-mean prior) against a plain PyTorch SASRec-CE loop on the same
device, model, data, batch and precision: positions/s at batch 128 fp32 and batch 1024 bf16, and
the time to evaluate every test user (full-catalogue ranking).

    python benchmarks/gpu_throughput.py --device cuda --data prepared/gpu-check/beauty --out DIR
    python benchmarks/gpu_throughput.py --device cpu --smoke --out /tmp/gpu-smoke

No Ray, no MLflow (the GPU machine has neither). ``--data``: a folder made by ``ray-pinet prepare``
(``benchmarks/gpu_check.sh prepare`` makes Beauty's); ``--smoke``: synthetic rows, tiny model.
The plain loop is ``benchmarks/plain_sasrec.py``'s step (RecModel, all-position full-softmax CE,
``loss.mean()``, Adam) fed the same prepared training windows and global batches, with the rows
on the device and no framework around it. TF32 is off unless ``--tf32``. Positions/s is the
median over epochs after the first (warm-up), or the only epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))  # run from a checkout without installing
from report import machine_info, write_results  # noqa: E402

COLUMNS = ["impl", "batching", "batch", "precision", "positions_per_s", "vs_plain", "eval_all_users_s", "epochs"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    p.add_argument("--data", type=Path, default=REPO / "prepared" / "gpu-check" / "beauty")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=["128:fp32", "1024:bf16"], metavar="BATCH:PRECISION")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--batching", nargs="+", default=["packed", "padded"], choices=("packed", "padded"),
                   help="optim.batching of the Engine rows (the plain loop is padded)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (the issue's plain numbers used it)")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "gpu_throughput")
    p.add_argument("--smoke", action="store_true", help="synthetic 600 rows, d 16, 1 block, 1 epoch")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.dim, args.blocks = 1, 16, 1
        args.settings = ["64:fp32", "128:bf16"]
    return args


def load_data(args):
    """(train, valid, test tables, RunMeta, max_len)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_pinet.training import exactness as ex
    from ray_pinet.training.engine import RunMeta

    if args.smoke:
        prob = ex.Problem(num_rows=600, num_items=300, max_len=10, seed=1)
        train = ex.synthetic_train_table(prob)
        sys.path.insert(0, str(REPO))
        from tests.gpu.test_cuda import eval_table

        meta = RunMeta(num_items=prob.num_items, num_strata=2, num_train_samples=prob.num_rows,
                       user_share=[0.8, 0.2], interaction_share=[0.5, 0.5])
        return train, eval_table(prob, 1), eval_table(prob, 2), meta, prob.max_len
    from ray_pinet.training.run_inputs import load_run_meta

    meta = load_run_meta(args.data)
    tables = [pa.concat_tables([pq.read_table(f) for f in sorted((args.data / s).glob("*.parquet"))])
              for s in ("train", "valid", "test")]
    max_len = int(json.loads((args.data / "prepare_config.json").read_text())["samples"]["max_len"])
    return (*tables, meta, max_len)


def engine_for(args, data, batch: int, precision: str, batching: str = "padded"):
    from ray_pinet.config import TrainConfig
    from ray_pinet.training.engine import Engine

    train, valid, test, meta, max_len = data
    cfg = TrainConfig.from_dict({
        "method": "joint",
        "model": {"dim": args.dim, "num_blocks": args.blocks, "max_len": max_len},
        "optim": {"batch_size": batch, "max_epochs": args.epochs, "max_minutes": 0, "patience": 1000,
                  "batching": batching},
        "eval": {"every": 1_000_000},
        "stage2": {"enabled": False},
        "run": {"progress": False, "device": args.device, "precision": precision},
    })
    reports: list = []
    eng = Engine(cfg, meta, train, valid, test, report=lambda m, s: reports.append(m), say=lambda s: None,
                 device=torch.device(args.device))
    return eng, reports


def rate(values: list[float]) -> float:
    return statistics.median(values[1:]) if len(values) > 1 else values[0]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ray_pinet_row(args, data, batch: int, precision: str, batching: str) -> dict:
    eng, reports = engine_for(args, data, batch, precision, batching)
    eng.stage1()
    per_epoch = [m["train/positions_per_s"] for m in reports if "train/positions_per_s" in m]
    sync(args.device)
    t0 = time.perf_counter()
    eng._evaluate(eng.test_rows)
    sync(args.device)
    return {"impl": "ray-pinet Engine", "batching": batching, "batch": batch, "precision": precision,
            "positions_per_s": rate(per_epoch), "eval_all_users_s": time.perf_counter() - t0,
            "epochs": len(per_epoch)}


def plain_row(args, data, batch: int, precision: str) -> dict:
    """plain_sasrec.py's step on the Engine's own model, rows and global batches."""
    from ray_pinet.methods.losses import per_position_losses
    from ray_pinet.training.batches import epoch_batches
    from ray_pinet.training.device import autocast

    eng, _ = engine_for(args, data, batch, precision)  # same initial weights and rows
    model, rows, dev = eng.model, eng.train_rows, torch.device(args.device)
    inputs, targets = rows.inputs.to(dev).long(), rows.targets.to(dev).long()  # rows hold int32
    opt = torch.optim.Adam(model.backbone_parameters(), lr=eng.cfg.optim.lr)
    n = len(rows.sample_id)
    per_epoch = []
    for epoch in range(args.epochs):
        sync(args.device)
        t0, positions = time.perf_counter(), 0
        for ids in epoch_batches(n, batch, eng.cfg.run.seed, epoch):
            ids = ids.to(dev)
            with autocast(dev, precision):
                loss_vec, _ = per_position_losses(model, inputs[ids], targets[ids], None, None, "ce")
            loss = loss_vec.float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            positions += loss_vec.numel()
        sync(args.device)
        per_epoch.append(positions / (time.perf_counter() - t0))
    return {"impl": "plain PyTorch", "batching": "padded", "batch": batch, "precision": precision,
            "positions_per_s": rate(per_epoch), "eval_all_users_s": None, "epochs": len(per_epoch)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    data = load_data(args)
    rows = []
    for setting in args.settings:
        batch, precision = setting.split(":")
        plain = plain_row(args, data, int(batch), precision)
        plain["vs_plain"] = 1.0
        rows.append(plain)
        for batching in args.batching:
            ours = ray_pinet_row(args, data, int(batch), precision, batching)
            ours["vs_plain"] = ours["positions_per_s"] / plain["positions_per_s"]
            rows.append(ours)
    info = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "tf32": args.tf32, "data": "synthetic (smoke)" if args.smoke else str(args.data)}
    meta = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": {**machine_info(), **info}}
    table = write_results(args.out, "gpu_throughput", rows, COLUMNS, meta)
    (args.out / "gpu_throughput.md").write_text(table + "\n")
    return {**meta, "columns": COLUMNS, "rows": rows}


if __name__ == "__main__":
    main(sys.argv[1:])
