"""Data pipeline: ``ray-pinet prepare`` (Ray tasks) against a single-process pandas implementation
of the same steps, side by side on the same synthetic long-tail log.

    python benchmarks/data_pipeline.py --sizes 1e6 1e7 1e8 --out benchmarks/results/data_pipeline
    python benchmarks/data_pipeline.py --smoke --out /tmp/dp-smoke

For every size N: a seeded ``ray-pinet synth`` log of N rows (cached in ``--work-dir`` by size,
seed and catalogue), then each implementation in its own subprocess, measured by ``procmem``
(wall time; peak PSS of the whole process tree, i.e. the driver plus every Ray process, and of the
driver alone). ray-pinet's child starts a fresh local Ray instance (``address="local"``, no
dashboard) and calls ``prepare``; the pandas child runs ``pandas_prepare.py``. ``pipeline_s`` is
the time each child spent in the steps themselves (Ray start-up and imports excluded, reported
apart as ``wall_s``; Ray's workers are started before the clock runs); ``rows_per_s`` =
N / ``pipeline_s``.

Both implementations must agree on every count (users, items, rows after cleaning, users and
interactions per stratum, training windows and positions, validation and test rows); with
``--check-content`` (default at the smoke size) the training windows, validation and test rows
and user strata are also compared value for value (a digest of each). A pandas run that raises
``MemoryError`` or is stopped by the memory guard (MemAvailable below ``--guard-mib``) is a row
with ``status`` saying so: the size at which pandas failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(REPO))  # run from a checkout without installing
from procmem import run_measured  # noqa: E402
from report import machine_info, parse_count, write_results  # noqa: E402

COLUMNS = ["rows", "impl", "status", "pipeline_s", "rows_per_s", "wall_s", "peak_total_mib",
           "peak_driver_mib", "peak_worker_mib", "processes", "counts_match", "content_match"]
SMOKE = {"sizes": [20_000], "rows_per_file": 5_000, "items": 2_000, "buckets": 4, "object_store_mb": 256}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=parse_count, nargs="+", default=[10**6, 10**7, 10**8])
    p.add_argument("--out", type=Path, default=BENCH / "results" / "data_pipeline")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "ray-pinet-bench",
                   help="synthetic logs (kept, reused) and the prepared outputs (removed after each run)")
    p.add_argument("--impls", nargs="+", choices=("pandas", "ray"), default=["pandas", "ray"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--items", type=int, default=100_000, help="catalogue size of the synthetic log")
    p.add_argument("--rows-per-file", type=parse_count, default=10**6)
    p.add_argument("--rows-per-bucket", type=parse_count, default=1_250_000,
                   help="ray-pinet num_buckets = max(8, ceil(N / this)): bounded memory per task")
    p.add_argument("--buckets", type=int, default=0, help="fixed num_buckets (0 = from --rows-per-bucket)")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--q", type=float, default=0.2)
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                   help="num_cpus of ray-pinet's Ray instance")
    p.add_argument("--object-store-mb", type=int, default=0, help="0 = Ray's default (30%% of RAM)")
    p.add_argument("--guard-mib", type=float, default=2048, help="kill a run when MemAvailable drops below")
    p.add_argument("--interval", type=float, default=0.2, help="memory sampling period (s)")
    p.add_argument("--check-content", action="store_true", help="compare the outputs value for value")
    p.add_argument("--keep-outputs", action="store_true")
    p.add_argument("--smoke", action="store_true", help=f"tiny run: {SMOKE}")
    p.add_argument("--child-ray", nargs=3, metavar=("INPUT", "OUTPUT", "RESULT"), help=argparse.SUPPRESS)
    p.add_argument("--child-config", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.rows_per_file, args.items = SMOKE["sizes"], SMOKE["rows_per_file"], SMOKE["items"]
        args.buckets, args.object_store_mb = SMOKE["buckets"], SMOKE["object_store_mb"]
        args.check_content = True
        args.interval = min(args.interval, 0.1)
    return args


# ---------------------------------------------------------------------------------------------
# ray-pinet child: a fresh local Ray instance, then prepare()
# ---------------------------------------------------------------------------------------------


def _idle(seconds: float) -> None:
    time.sleep(seconds)


def ray_child(inp: str, out: str, result: str, conf: dict) -> int:
    import ray

    from ray_pinet.config_base import from_dict
    from ray_pinet.data.config import PrepareConfig
    from ray_pinet.data.pipeline import prepare
    from ray_pinet.local_ray import start_ray

    t0 = time.perf_counter()
    for attempt in range(3):
        try:
            # The commands' start-up, with the CPU count under test and no dashboard (no Train
            # here: it would only add start-up time); address="local": never join another Ray
            # instance on this host (RAY_ADDRESS, `ray start`).
            start_ray(address="local", num_cpus=conf["cpus"], include_dashboard=False, log_to_driver=False,
                      object_store_memory=(conf["object_store_mb"] << 20) or None)
            break
        except Exception as exc:  # Ray 2.60 gives the raylet a fixed 30 s to register: a loaded box misses it
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()
    # Start one worker per CPU before the clock runs, as on a long-lived cluster: otherwise the
    # first phase pays the worker start-up (seconds), which would swamp the small sizes.
    ray.get([ray.remote(num_cpus=1)(_idle).remote(0.5) for _ in range(conf["cpus"])])
    ray_init_s = time.perf_counter() - t0
    cfg = from_dict(PrepareConfig, {
        "source": {"format": "parquet", "path": inp},
        "clean": {"duplicates": "drop_exact", "min_history": 3},
        "strata": {"mode": "top_fraction", "q": conf["q"]},
        "samples": {"max_len": conf["max_len"], "window": "all", "train_negatives": 0},
        "output": out, "seed": 0, "num_buckets": conf["buckets"],
    })
    t = time.perf_counter()
    res = prepare(cfg, progress=False)
    pipeline_s = time.perf_counter() - t
    ray.shutdown()
    r, strata = res.report["result"], res.strata["strata"]
    counts = {
        "rows_read": res.report["source"]["rows_read"], "rows": r["rows"], "users": r["users"],
        "items": r["items"], "strata_users": [s["users"] for s in strata],
        "strata_interactions": [s["interactions"] for s in strata], "train_rows": r["train_rows"],
        "train_targets": r["train_targets"], "valid_rows": r["valid_rows"], "test_rows": r["test_rows"],
    }
    Path(result).write_text(json.dumps({
        "status": "ok", "pipeline_s": round(pipeline_s, 3), "ray_init_s": round(ray_init_s, 3),
        "phases_s": res.report["timings_s"], "tasks": res.report["tasks"], "counts": counts,
        "num_buckets": conf["buckets"],
    }))
    return 0


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def synthetic_log(args: argparse.Namespace, rows: int) -> Path:
    """The cached log of ``rows`` rows (generated once; ``_complete.json`` marks a finished one)."""
    from ray_pinet.data.synthetic import generate

    d = args.work_dir / f"synth-{rows}-seed{args.seed}-items{args.items}-per{args.rows_per_file}"
    if not (d / "_complete.json").exists():  # '_' names are skipped by prepare's file listing
        shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        summary = generate(d, rows, args.items, seed=args.seed, rows_per_file=args.rows_per_file)
        summary["generate_s"] = round(time.perf_counter() - t, 1)
        (d / "_complete.json").write_text(json.dumps(summary))
    return d


def split_digest(out: Path, split: str, list_col: str, extra: tuple[str, ...] = ()) -> str:
    """sha256 of a split sorted by sample_id: ids, user_idx, stratum, the list column, ``extra``."""
    t = pq.read_table(out / split, columns=["sample_id", "user_idx", "stratum", list_col, *extra])
    t = t.sort_by("sample_id")
    h = hashlib.sha256()
    for name in ("sample_id", "user_idx", "stratum", *extra):
        h.update(t[name].to_numpy().astype(np.int64).tobytes())
    col = t[list_col].combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    h.update((offsets - offsets[0]).tobytes())
    h.update(col.values.to_numpy().astype(np.int64)[offsets[0]:offsets[-1]].tobytes())
    return h.hexdigest()


def content_digest(out: Path) -> dict[str, str]:
    users = pq.read_table(out / "users.parquet", columns=["user_idx", "stratum"]).sort_by("user_idx")
    return {
        "train": split_digest(out, "train", "seq"),
        "valid": split_digest(out, "valid", "history", ("target",)),
        "test": split_digest(out, "test", "history", ("target",)),
        "users": hashlib.sha256(users["stratum"].to_numpy().astype(np.int64).tobytes()).hexdigest(),
    }


def run_one(args: argparse.Namespace, impl: str, rows: int, log: Path) -> tuple[dict, dict]:
    """Measure one implementation on one size; (table row, the child's full result)."""
    out = args.work_dir / f"out-{impl}-{rows}"
    shutil.rmtree(out, ignore_errors=True)
    result = args.work_dir / f"result-{impl}-{rows}.json"
    result.unlink(missing_ok=True)
    if impl == "pandas":
        cmd = [sys.executable, str(BENCH / "pandas_prepare.py"), "--input", str(log), "--output", str(out),
               "--result", str(result), "--max-len", str(args.max_len), "--q", str(args.q)]
    else:
        buckets = args.buckets or max(8, -(-rows // args.rows_per_bucket))
        conf = {"cpus": args.cpus, "object_store_mb": args.object_store_mb, "q": args.q,
                "max_len": args.max_len, "buckets": buckets}
        cmd = [sys.executable, __file__, "--child-ray", str(log), str(out), str(result),
               "--child-config", json.dumps(conf)]
    load = os.getloadavg()[0]
    m = run_measured(cmd, interval=args.interval, guard_mib=args.guard_mib)
    child = json.loads(result.read_text()) if result.exists() else {}
    if m.killed_by_guard:
        status = f"failed: memory guard (< {args.guard_mib:.0f} MiB available) at {rows:,} rows"
    elif child.get("status") == "MemoryError":
        status = f"failed: MemoryError at {rows:,} rows"
    elif m.rc == -9:
        status = f"failed: SIGKILL (the kernel's OOM killer?) at {rows:,} rows"
    elif m.rc != 0 or child.get("status") != "ok":
        tail = (m.stderr or m.stdout).strip().splitlines()[-3:]
        status = f"failed: exit {m.rc}" + (f" ({' | '.join(tail)})" if tail else "")
    else:
        status = "ok"
    row = {
        "rows": rows, "impl": "ray-pinet" if impl == "ray" else "pandas", "status": status,
        "pipeline_s": child.get("pipeline_s"),
        "rows_per_s": round(rows / child["pipeline_s"]) if child.get("pipeline_s") else None,
        "wall_s": m.wall_s, "peak_total_mib": m.peak_total_pss_mib, "peak_driver_mib": m.peak_driver_pss_mib,
        "peak_worker_mib": max((p["peak_pss_mib"] for p in m.processes if p["name"].startswith("ray::")),
                               default=None),
        "processes": m.peak_processes, "loadavg_1m_at_start": round(load, 2),
        "phases_s": child.get("phases_s"), "ray_init_s": child.get("ray_init_s"),
        "num_buckets": child.get("num_buckets"), "per_process_peaks": m.processes,
    }
    if status != "ok":
        row["stderr_tail"] = m.stderr[-4000:]
    if status == "ok" and args.check_content:
        row["digest"] = content_digest(out)
    if not args.keep_outputs:
        shutil.rmtree(out, ignore_errors=True)
    return row, child


def compare(rows: list[dict], children: dict[str, dict]) -> None:
    """Fill ``counts_match`` / ``content_match`` on both rows of one size (when both ran)."""
    if set(children) != {"pandas", "ray"} or any(c.get("status") != "ok" for c in children.values()):
        return
    pc, rc = children["pandas"]["counts"], children["ray"]["counts"]
    same = pc == rc
    diff = {k: (pc.get(k), rc.get(k)) for k in set(pc) | set(rc) if pc.get(k) != rc.get(k)}
    digests = [r.get("digest") for r in rows]
    content = None if None in digests else digests[0] == digests[1]
    for r in rows:
        r["counts_match"], r["content_match"] = same, content
        r["counts"] = pc if r["impl"] == "pandas" else rc
        if diff:
            r["count_differences_pandas_ray"] = diff


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.child_ray:
        sys.exit(ray_child(*args.child_ray, json.loads(args.child_config)))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    meta = {"benchmark": "data_pipeline", "machine": machine_info(), "args": vars(args)}
    table: list[dict] = []
    for rows in args.sizes:
        log = synthetic_log(args, rows)
        size_rows, children = [], {}
        for impl in args.impls:
            row, child = run_one(args, impl, rows, log)
            size_rows.append(row)
            children[impl] = child
            print(f"{rows:,} rows {row['impl']}: {row['status']}, pipeline {row['pipeline_s']} s, "
                  f"peak {row['peak_total_mib']} MiB", flush=True)
        compare(size_rows, children)
        table += size_rows
        # Written after every size: the results of the smaller sizes survive a failure at a larger one.
        write_results(args.out, "data_pipeline", table, COLUMNS, meta)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
