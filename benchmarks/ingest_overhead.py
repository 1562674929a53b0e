"""Fixed cost of feeding a Ray Train worker its shards: 3 splits x 2 ranks Ray Data executions
(read_parquet -> ShardBySampleId's residue filter -> iter_batches), as `train` runs them.

    .venv/bin/python benchmarks/ingest_overhead.py [prepared/ml-latest-small]

Compares Ray 2.60's DataSourceV2 Parquet reader (default) with the V1 reader that
`training/trainer.py::read_splits` uses. Results: benchmarks/results/ingest.md.
"""

from __future__ import annotations

import sys
import time

import ray
import ray.data

from ray_pinet.training.worker import _keep_residue


def one_pass(path: str, v2: bool, world: int = 2) -> float:
    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = v2
    t = time.perf_counter()
    for split in ("train", "valid", "test"):
        for r in range(world):
            ds = ray.data.read_parquet(f"{path}/{split}").map_batches(
                _keep_residue, fn_kwargs={"rank": r, "world": world}, batch_format="pyarrow", batch_size=None)
            sum(b.num_rows for b in ds.iterator().iter_batches(batch_format="pyarrow", batch_size=8192))
    return time.perf_counter() - t


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "prepared/ml-latest-small"
    from ray_pinet.local_ray import start_ray

    start_ray(num_cpus=4, include_dashboard=False)  # the commands' start-up, without the dashboard
    ray.data.DataContext.get_current().enable_progress_bars = False
    for v2 in (True, True, False, False):  # the first pass of each pays worker start-up
        print(f"datasource_v2={v2}: 6 executions in {one_pass(path, v2):.1f} s", flush=True)


if __name__ == "__main__":
    main()
