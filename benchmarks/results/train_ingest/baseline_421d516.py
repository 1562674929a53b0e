"""The training ingest as it was at commit 421d516 (before issue 21 item 1), measured for one rank:
read every file of the split and keep the residue class ``sample_id % W == r`` (what each rank's
Ray Data shard did, here with pyarrow, i.e. without Ray Data's own overhead), build TrainRows,
then assemble one epoch of packed batches (the O(N) permutation + take). Run from a worktree of
421d516:

    git worktree add /tmp/wt-old 421d516
    cd /tmp/wt-old && /work/main/.venv/bin/python <this file> --data D --rank r --world W --out F
"""

import argparse
import json
import resource
import time

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_pinet.training.batches import TrainRows, epoch_batches


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    table = pq.read_table(f"{a.data}/train")
    ids = table.column("sample_id").to_numpy()
    table = table.filter(pa.array(ids % a.world == a.rank))
    n_total = len(ids)
    del ids
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    rows = TrainRows(table, a.max_len, a.rank, a.world, 0)
    del table
    t_rows = time.perf_counter() - t0
    t0 = time.perf_counter()
    positions = 0
    for g in epoch_batches(n_total, a.batch_size, 0, 0):
        b = rows.take(g, packed=True)
        positions += int((b.targets != 0).sum())
    t_epoch = time.perf_counter() - t0
    res = {"impl": "421d516", "rank": a.rank, "world": a.world, "train_samples": n_total,
           "local_samples": len(rows), "local_positions": positions, "read_s": t_read,
           "rows_s": t_rows, "epoch_assembly_s": t_epoch,
           "data_s": t_read + t_rows + t_epoch,
           "data_us_per_position": 1e6 * (t_read + t_rows + t_epoch) / max(positions, 1),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print(json.dumps(res))
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
