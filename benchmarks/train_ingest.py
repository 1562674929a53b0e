"""Training ingest of one rank: read its block of ``train/``, build ``TrainRows``, assemble one
epoch of packed batches. What a Ray Train worker does before and between its steps, without the
model, so the data cost is measured alone.

    python benchmarks/train_ingest.py --data PREPARED --world 2 --out benchmarks/results/train_ingest/ingest-1e8-w2.json
    python benchmarks/train_ingest.py --smoke-test

Each rank runs in its own process, one after another (2-core box: concurrent ranks would time
each other's contention), with one torch thread. Per rank: ``read_s`` (the reader),
``rows_s`` (TrainRows: padding into int32 tensors), ``epoch_assembly_s`` (the epoch's global
batches: the keyed permutation of the rank's rows + packed ``take`` of every step),
``data_us_per_position`` = their sum per training position of the rank, and ``peak_rss_mib``
(``ru_maxrss`` of the rank's process).

``--reader`` (the rank's rows are the same for all three; only how they are read changes):
  direct          training/shards.py::read_shard, what the trainer runs: the rank's row groups only
  ray_data_all    Ray Data ``read_parquet`` of every file + a filter to the rank's block (the read
                  pattern of the Ray Data ingest before issue 21: W reads of the data)
  ray_data_files  Ray Data ``read_parquet`` of the files that overlap the rank's block + filter
The Ray Data readers start a local Ray in the rank's process (not timed); their ``read_s`` is the
time from ``read_parquet`` to the concatenated table, their ``peak_rss_mib`` excludes the Ray
workers that read.

The figure before issue 21 (residue-class sharding, an O(N) permutation per epoch, int64 rows)
was measured with ``benchmarks/results/train_ingest/baseline_421d516.py`` at commit 421d516.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def _read_ray_data(root: Path, rank: int, world: int, files_only: bool):
    import numpy as np
    import pyarrow as pa
    import ray
    import ray.data

    from ray_pinet.training.shards import _row_groups, shard_range, split_rows

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.use_datasource_v2 = False  # the reader the Ray Data ingest used (benchmarks/results/ingest.md)
    total = split_rows(root / "train")
    lo, hi = shard_range(total, rank, world)
    files = sorted((root / "train").glob("part-*.parquet"))
    if files_only:
        files = [f for f in files if any(a < hi and b >= lo for _, a, b in _row_groups(f))]
    t0 = time.perf_counter()

    def keep(batch: pa.Table) -> pa.Table:
        ids = batch.column("sample_id").to_numpy()
        return batch.filter(pa.array(np.asarray((ids >= lo) & (ids < hi))))

    ds = ray.data.read_parquet([str(f) for f in files]).map_batches(keep, batch_format="pyarrow", batch_size=None)
    table = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=8192)))
    return table, total, time.perf_counter() - t0


def one_rank(args) -> dict:
    import torch

    from ray_pinet.training.batches import TrainRows
    from ray_pinet.training.shards import read_shard

    torch.set_num_threads(1)
    root = Path(args.data)
    t0 = time.perf_counter()
    if args.reader == "direct":
        table, total = read_shard(root, "train", args.rank, args.world)
        read_s = time.perf_counter() - t0
    else:
        table, total, read_s = _read_ray_data(root, args.rank, args.world, args.reader == "ray_data_files")
    t0 = time.perf_counter()
    rows = TrainRows(table, args.max_len, total, 0)
    del table
    rows_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    positions = 0
    for ids in rows.epoch_batches(args.batch_size, 0, 0):
        b = rows.take(ids, packed=True)
        positions += int((b.targets != 0).sum())
    epoch_s = time.perf_counter() - t0
    data_s = read_s + rows_s + epoch_s
    return {"impl": "shards", "reader": args.reader, "rank": args.rank, "world": args.world,
            "train_samples": total, "local_samples": len(rows), "local_positions": positions,
            "read_s": read_s, "rows_s": rows_s, "epoch_assembly_s": epoch_s, "data_s": data_s,
            "data_us_per_position": 1e6 * data_s / max(positions, 1),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def smoke_data(tmp: Path) -> Path:
    """A tiny ``train/`` split of seeded synthetic windows (4 files, row groups of 16 rows)."""
    from ray_pinet.training import exactness as ex

    return Path(ex.write_train_split(ex.Problem(num_rows=300), tmp, files=4, row_group_rows=16))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a prepared folder")
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--rank", type=int, default=-1, help="internal: run this one rank in this process")
    p.add_argument("--reader", choices=("direct", "ray_data_all", "ray_data_files"), default="direct")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--out", help="JSON file for the per-rank results")
    p.add_argument("--smoke-test", "--smoke", action="store_true", help="300 synthetic rows, 2 ranks")
    args = p.parse_args()
    if args.rank >= 0:
        print(json.dumps(one_rank(args)), flush=True)
        return
    tmp = None
    if args.smoke_test:
        tmp = tempfile.mkdtemp(prefix="ray-pinet-ingest-smoke-")
        args.data, args.world, args.max_len = str(smoke_data(Path(tmp))), 2, 8
    if not args.data:
        p.error("--data is required (or --smoke-test)")
    ranks = []
    for r in range(args.world):
        cmd = [sys.executable, __file__, "--data", args.data, "--world", str(args.world), "--rank", str(r),
               "--reader", args.reader, "--batch-size", str(args.batch_size), "--max-len", str(args.max_len)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ})
        ranks.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(ranks[-1]), flush=True)
    if sum(r["local_samples"] for r in ranks) != ranks[0]["train_samples"]:
        raise SystemExit("the ranks' blocks do not add up to the training set")
    result = {"data": args.data, "world": args.world, "reader": args.reader, "ranks": ranks,
              "max_peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
              "data_us_per_position": sum(r["data_s"] for r in ranks) / max(sum(r["local_positions"] for r in ranks), 1) * 1e6}
    print(json.dumps({k: v for k, v in result.items() if k != "ranks"}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
