"""Issue 21 item 3: Ray Data against prepare's hand-written Ray Core tasks, on the step where Ray
Data fits best: read every input file, compute each row's user bucket, write the rows
partitioned by bucket (prepare's phase 1, "ingest").

    python benchmarks/ray_data_vs_tasks.py --log /tmp/ray-pinet-bench/synth-10000000-seed0-items100000-per1000000 \
        --out benchmarks/results/train_ingest/ray_data_vs_tasks-1e7.json
    python benchmarks/ray_data_vs_tasks.py --smoke-test

One local Ray instance (``--cpus``), started and warmed before any clock runs, then:
  tasks     ``prepare`` itself; its ``report.json`` timings give the ingest phase (one task per
            input file: validate every row, write the canonical copy, split the rows into the
            buckets' scratch files) and the other phases.
  ray_data  ``read_parquet`` -> ``map_batches`` (the same ``prepare_tasks.bucket_of`` column) ->
            ``write_parquet(partition_cols=["bucket"])``. It does less than the ingest phase (no
            validation, no canonical copy), so it is the best case for Ray Data. Run with Ray
            2.60's default DataSourceV2 reader and again with the V1 reader
            (``ray_data_v1_reader``), whose planning is cheaper (benchmarks/results/ingest.md).
Both read the same files from the page cache (each is run twice; the second run counts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def _idle(seconds: float) -> None:
    time.sleep(seconds)


def run_tasks(log: str, out: Path, buckets: int) -> dict:
    from ray_pinet.config_base import from_dict
    from ray_pinet.data.config import PrepareConfig
    from ray_pinet.data.pipeline import prepare

    shutil.rmtree(out, ignore_errors=True)
    cfg = from_dict(PrepareConfig, {
        "source": {"format": "parquet", "path": log},
        "clean": {"duplicates": "drop_exact", "min_history": 3},
        "strata": {"mode": "top_fraction", "q": 0.2},
        "samples": {"max_len": 50, "window": "all", "train_negatives": 0},
        "output": str(out), "seed": 0, "num_buckets": buckets,
    })
    t = time.perf_counter()
    res = prepare(cfg, progress=False)
    total = time.perf_counter() - t
    return {"prepare_s": total, **{f"{k}_s": v for k, v in res.report["timings_s"].items()}}


def run_ray_data(log: str, out: Path, buckets: int, v2: bool) -> dict:
    import pyarrow as pa
    import ray.data

    from ray_pinet.data.prepare_tasks import bucket_of

    shutil.rmtree(out, ignore_errors=True)
    files = sorted(str(p) for p in Path(log).glob("part-*.parquet"))
    ray.data.DataContext.get_current().use_datasource_v2 = v2

    def with_bucket(batch: pa.Table) -> pa.Table:
        return batch.append_column("bucket", pa.array(bucket_of(batch["user_id"], buckets), pa.int32()))

    t = time.perf_counter()
    (ray.data.read_parquet(files)
        .map_batches(with_bucket, batch_format="pyarrow", batch_size=None)
        .write_parquet(str(out), partition_cols=["bucket"]))
    seconds = time.perf_counter() - t
    written = list(out.rglob("*.parquet"))
    return {"ingest_s": seconds, "files_written": len(written)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", help="a synthetic log folder (ray-pinet synth)")
    p.add_argument("--buckets", type=int, default=8)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--smoke-test", "--smoke", action="store_true", help="a 20,000-row log, one run each")
    args = p.parse_args()
    import ray

    work = Path(tempfile.mkdtemp(prefix="ray-pinet-rd-vs-tasks-"))
    runs = 2
    if args.smoke_test:
        from ray_pinet.data.synthetic import generate

        args.log, runs = str(work / "log"), 1
        generate(args.log, num_rows=20_000, num_items=500, seed=0, rows_per_file=5_000)
    if not args.log:
        p.error("--log is required (or --smoke-test)")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.get([ray.remote(num_cpus=1)(_idle).remote(0.5) for _ in range(args.cpus)])  # warm workers
    result: dict = {"log": args.log, "buckets": args.buckets, "cpus": args.cpus}
    try:
        for r in range(runs):
            result["tasks"] = run_tasks(args.log, work / "prepared", args.buckets)
            result["ray_data"] = run_ray_data(args.log, work / "ray_data", args.buckets, v2=True)
            result["ray_data_v1_reader"] = run_ray_data(args.log, work / "ray_data", args.buckets, v2=False)
            print(f"run {r}: {json.dumps(result)}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    for k in ("ray_data", "ray_data_v1_reader"):
        result[f"{k}_over_tasks_ingest"] = result[k]["ingest_s"] / result["tasks"]["ingest_s"]
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
