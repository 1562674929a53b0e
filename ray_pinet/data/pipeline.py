"""``prepare(cfg)``: raw log -> the prepared-data directory of docs/design.md, on Ray.

Three parallel phases (1, 2, 4), each a set of Ray tasks (one CPU each) that read and write Parquet
on disk, and one driver step (3). Only small tables travel to the driver (per-user and per-item
counts, statistics); the log itself never does:

1. ingest (one task per input file): read + validate (``sources``), write ``canonical/`` and split
   the rows into ``num_buckets`` user buckets by a stable hash of the user id (crc32), keeping
   source order inside each bucket. This replaces a hash shuffle (slow on small machines,
   ray-notes.md) and keeps every user whole in one bucket.
2. clean (one task per bucket): cleaning policies (``clean``), returns per-user counts and the
   validation/test items, and per-item training counts.
3. driver: ``user_idx`` (users sorted by id), ``item_idx`` (items sorted by id, 1..M), activeness,
   strata (``strata``), unseen-item policy, and every sample_id offset, so sample ids are
   deterministic and contiguous whatever the number of buckets.
4. samples (one task per bucket): leave-one-out rows, windows and negatives (``samples``).

Memory of one task is about the size of one bucket (rows / num_buckets); raise ``num_buckets`` for
larger logs. Outputs are written to a local (or shared) filesystem path.

Why Ray tasks rather than a Ray Data ``read_parquet().map_batches()`` chain: the tie-break of equal
timestamps is the source order, and Ray Data's blocks do not carry a row's position in its file;
per-file tasks know it exactly. Ray Data's hash shuffle (``groupby``) is also several times slower
than this bucketing on small machines (ray-notes.md, measured numbers). ``report.json["tasks"]``
has each phase's task count, summed and maximum task wall time and summed task CPU time, and how
many tasks were reused from an unfinished run or retried after their worker died.

Faults (``prepare``'s docstring): a task whose worker dies is retried; every file a task writes
appears whole (written under a temporary name, renamed when complete); a run that stops leaves
its finished tasks in ``.<output>.partial`` for the next run with the same inputs to reuse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_pinet.config_base import ConfigError, to_dict
from ray_pinet.data.clean import STAT_KEYS, MixedScale, clean_bucket, per_user
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.samples import SampleMaps, build_samples, num_windows
from ray_pinet.data.schema import BEHAVIOR, ITEM, RATING, TS, USER
from ray_pinet.data.sources import (FileStats, display_name, first_row, output_columns, read_file,
                                    resolve_inputs)
from ray_pinet.data.ray_tasks import ensure_ray, run_tasks
from ray_pinet.data.strata import assign_strata, format_strata_table, strata_stats
from ray_pinet.errors import DataError
from ray_pinet.outputs import atomic_path, refuse_foreign, refuse_input_inside, resumable_dir

SPLITS = ("train", "valid", "test")
CANONICAL_PART_ROWS = 4 << 20
# Scratch files under _work/ are written once, read once and deleted: plain (no compression, no
# dictionary) is 2.7x faster to write and 2x faster to read than pyarrow's default (snappy +
# dictionary) on the synthetic benchmark log, for 2.7x the bytes (BENCHMARKS.md).
SCRATCH_PARQUET = {"compression": "none", "use_dictionary": False}
_OUTPUTS = ("canonical", *SPLITS, "users.parquet", "items.parquet", "strata.json", "report.json",
            "prepare_config.json", "_work")
_DROPPED = ("partitions.json",)  # written into a prepared folder by retrain; see prepare()


@dataclass
class PrepareResult:
    output: Path
    strata: dict[str, Any]  # the strata.json content
    report: dict[str, Any]  # the report.json content


def prepare(cfg: PrepareConfig, progress: bool = True) -> PrepareResult:
    """Run the whole preparation and write ``cfg.output``; prints a summary. See docs/design.md.

    The output appears whole or not at all: everything is written into the sibling folder
    ``.<name>.partial`` (``outputs.resumable_dir``), swapped in only when every phase succeeded,
    so a failed run (a mistyped input path, a bad row) leaves a previous prepared folder exactly
    as it was. Refused before anything is written: an input inside the output (replacing the
    output would delete it) and an existing output holding entries prepare does not write (they
    would be deleted with it).

    Faults: a task whose worker process died is retried (``ray_tasks.TASK_RETRIES``); each task
    writes its files under temporary names and renames them into place when complete, then keeps
    its result in ``_work/done/``. A run that stops (killed, Ctrl-C, a worker lost beyond its
    retries) leaves ``.<name>.partial``; a rerun with the same config, input files (names, sizes,
    modification times) and data-layer code loads the finished tasks' results instead of running
    them (``report.json`` ``tasks.<phase>.reused``), anything else empties it first, with a note.
    Bad input or settings (DataError, ConfigError) remove it: nothing in it could be reused.
    """
    import ray

    _validate(cfg)
    out = Path(cfg.output)
    notes: list[str] = []
    fs, files = resolve_inputs(cfg.source.path, notes)  # before anything is touched
    if isinstance(fs, pafs.LocalFileSystem):
        refuse_input_inside(out, files)
    # Nothing that other commands put into a prepared folder is carried over: ``partitions.json``
    # (retrain) says which date partitions the folder holds, which a re-prepare may change;
    # retrain writes it again after the prepare it runs itself, and a missing one only costs
    # retrain a fresh prepare, while a stale one would make it reuse the wrong data.
    refuse_foreign(out, (*_OUTPUTS, *_DROPPED))
    ensure_ray()
    timings: dict[str, float] = {}
    tasks: dict[str, dict] = {}
    # A real output that is a symlink is replaced at its target (the link stays).
    target = out.resolve() if out.is_symlink() else out
    with resumable_dir(target, _resume_state(cfg, fs, files), discard_on=(DataError, ConfigError)) as part:
        if part.note:
            print(f"ray-pinet prepare: {part.note}", file=sys.stderr, flush=True)
        tmp = part.path
        # The tasks write under ``cfg.output``: the partial folder; prepare_config.json below
        # records the real one.
        tcfg = dataclasses.replace(cfg, output=str(tmp))
        work, done = tmp / "_work", tmp / "_work" / "done"
        for d in ("canonical", *SPLITS, "_work/buckets", "_work/clean", "_work/done"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        bucket_cols = [USER, ITEM, TS] + [RATING] * (cfg.clean.min_rating is not None)
        bucket_cols += [BEHAVIOR] * bool(cfg.source.behaviors)
        ingest_args = [(i, fs, f, tcfg, bucket_cols) for i, f in enumerate(files)]
        ingested = run_tasks(_ingest_file, ingest_args, "ingest", progress, tasks, done)
        rows_read = sum(r["rows_read"] for r in ingested)
        if rows_read == 0:
            where = files[0] if len(files) == 1 else cfg.source.path
            raise DataError("input is empty: no data rows", file=where)
        timings["ingest"], t = time.perf_counter() - t, time.perf_counter()

        buckets = range(cfg.num_buckets)
        cleaned = run_tasks(_clean_bucket, [(b, tcfg, bucket_cols, files, fs) for b in buckets], "clean",
                            progress, tasks, done)
        timings["clean"], t = time.perf_counter() - t, time.perf_counter()

        plan = _plan(cfg, cleaned)
        maps_refs = [ray.put(m) for m in plan.maps]
        items_ref = ray.put(plan.item_ids)
        _write_parquet(plan.users, tmp / "users.parquet")
        _write_parquet(plan.items, tmp / "items.parquet")
        timings["index_and_strata"], t = time.perf_counter() - t, time.perf_counter()

        sample_args = [(b, tcfg, maps_refs[b], items_ref) for b in buckets]
        written = run_tasks(_sample_bucket, sample_args, "samples", progress, tasks, done)
        timings["samples"] = time.perf_counter() - t
        del maps_refs, items_ref, sample_args
        shutil.rmtree(work)  # only now: a run that stops keeps it for the next to resume from

        counts = {s: sum(w[s] for w in written) for s in SPLITS}
        expected = {"train": plan.train_rows, "valid": plan.valid_rows, "test": plan.test_rows}
        if counts != expected:
            raise RuntimeError(f"internal error: wrote {counts} rows, planned {expected}")
        report = _report(cfg, ingested, cleaned, plan, counts, timings)
        report["source"]["skipped_paths"] = notes
        report["tasks"] = tasks
        (tmp / "strata.json").write_text(json.dumps(plan.strata, indent=2))
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "prepare_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    result = PrepareResult(output=out, strata=plan.strata, report=report)
    print(format_summary(result), flush=True)
    return result


def _validate(cfg: PrepareConfig) -> None:
    for part in (cfg.source, cfg.clean, cfg.strata, cfg.samples):
        part.validate()
    if cfg.num_buckets < 1:
        raise ConfigError(f"num_buckets must be >= 1, got {cfg.num_buckets}")
    cols = output_columns(cfg.source)
    for key, used, col in (("clean.min_rating", cfg.clean.min_rating is not None, RATING),
                           ("source.behaviors", bool(cfg.source.behaviors), BEHAVIOR)):
        if used and col not in cols:
            raise ConfigError(f"{key} is set but source format {cfg.source.format!r} has no {col} column")


def _write_parquet(table: pa.Table, path: Path, **kwargs) -> None:
    """``pq.write_table`` under a temporary name, renamed into place when complete: a task killed
    while writing (and then retried, or resumed by a rerun) leaves no half file for a reader."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


# What a task runs: a change to any of these makes the kept results of an unfinished run stale.
_CODE = sorted([*Path(__file__).parent.glob("*.py"), Path(__file__).parents[1] / "keyed_random.py"])


def _resume_state(cfg: PrepareConfig, fs, files: list[str]) -> dict[str, Any]:
    """Everything a task's output depends on; a rerun reuses an unfinished run's finished tasks
    only when all of it is equal (``outputs.resumable_dir``): the resolved config, each input
    file's name, size and modification time, and the data-layer code and libraries."""
    code = hashlib.sha256()
    for p in _CODE:
        code.update(p.read_bytes())
    return {
        "config": to_dict(cfg),
        "input files": [{"path": display_name(fs, f), "size": info.size, "mtime_ns": info.mtime_ns}
                        for f, info in zip(files, fs.get_file_info(files))],
        "code": {"sha256": code.hexdigest(), "pyarrow": pa.__version__, "numpy": np.__version__},
    }


# ----------------------------------------------------------------------------------------------
# Phase 1: ingest one file
# ----------------------------------------------------------------------------------------------


def bucket_of(user_ids: pa.Array | pa.ChunkedArray, num_buckets: int) -> np.ndarray:
    """Stable bucket of each user id: ``crc32(utf-8 id) % num_buckets`` (same in every process)."""
    return per_user(user_ids, lambda uid: zlib.crc32(uid.encode()) % num_buckets, np.int64)


def _ingest_file(i: int, fs, path: str, cfg: PrepareConfig, bucket_cols: list[str]) -> dict:
    out, work = Path(cfg.output), Path(cfg.output) / "_work" / "buckets"
    stats = FileStats(display_name(fs, path))
    canon, part, part_rows = None, 0, 0
    buckets: dict[int, pq.ParquetWriter] = {}
    with ExitStack() as files:
        def writer(target: Path, schema: pa.Schema, **kwargs) -> pq.ParquetWriter:
            w = pq.ParquetWriter(files.enter_context(atomic_path(target)), schema, **kwargs)
            files.callback(w.close)  # runs before atomic_path's rename (last in, first out)
            return w

        for table in read_file(fs, path, cfg.source, stats):
            if canon is None or part_rows >= CANONICAL_PART_ROWS:
                if canon is not None:
                    canon.close()
                    part += 1
                canon = writer(out / "canonical" / f"part-{i:05d}-{part:04d}.parquet", table.schema)
                part_rows = 0
            canon.write_table(table)
            part_rows += table.num_rows
            b = bucket_of(table[USER], cfg.num_buckets)
            order = np.argsort(b, kind="stable")  # stable: source order inside each bucket
            rows = table.select(bucket_cols).take(pa.array(order))
            bounds = np.r_[0, np.cumsum(np.bincount(b, minlength=cfg.num_buckets))]
            for k in np.flatnonzero(np.diff(bounds)):
                if k not in buckets:
                    (work / f"{k:04d}").mkdir(exist_ok=True)
                    buckets[k] = writer(work / f"{k:04d}" / f"part-{i:05d}.parquet", rows.schema,
                                        **SCRATCH_PARQUET)
                buckets[k].write_table(rows.slice(bounds[k], bounds[k + 1] - bounds[k]))
    return stats.to_dict()


# ----------------------------------------------------------------------------------------------
# Phase 2: clean one bucket
# ----------------------------------------------------------------------------------------------


def _clean_bucket(b: int, cfg: PrepareConfig, bucket_cols: list[str], files: list[str],
                  fs=None) -> tuple[pa.Table, pa.Table, dict]:
    work = Path(cfg.output) / "_work"
    paths = sorted((work / "buckets" / f"{b:04d}").glob("part-*.parquet"))  # file order = source order
    schema = pa.schema([(c, {RATING: pa.float64(), TS: pa.int64()}.get(c, pa.string())) for c in bucket_cols])
    parts = [pq.read_table(f) for f in paths]
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    try:
        res = clean_bucket(table, cfg.clean, cfg.source.behaviors)
    except MixedScale as exc:
        # The bucket keeps no line numbers (they would cost every row a column); on this error
        # path the one input file holding the row is read again to name its line.
        ends = np.cumsum([t.num_rows for t in parts])
        k = int(np.searchsorted(ends, exc.position, side="right"))
        source = int(paths[k].stem.split("-")[1])  # part-<input file index>.parquet
        user = table[USER][exc.position].as_py()
        raise _locate(exc, fs, files[source], cfg, user) from None
    _write_parquet(res.rows, work / "clean" / f"{b:04d}.parquet", **SCRATCH_PARQUET)
    return res.users, res.items, res.stats


def _locate(exc: MixedScale, fs, path: str, cfg: PrepareConfig, user: str) -> DataError:
    """``exc`` with the file and line of the first row of ``user`` with timestamp ``exc.value``."""
    name = display_name(fs, path)
    row = 0
    for t in read_file(fs, path, cfg.source, FileStats(name)):
        hit = np.flatnonzero(pc.and_(pc.equal(t[USER], user), pc.equal(t[TS], exc.value)).to_numpy(
            zero_copy_only=False))
        if len(hit):
            line = first_row(cfg.source) + row + int(hit[0]) if cfg.source.format != "amazon_seq" else None
            return DataError(exc.reason, file=name, column=TS, row=line, value=exc.value)
        row += t.num_rows
    return DataError(exc.reason, file=name, column=TS, value=exc.value)


# ----------------------------------------------------------------------------------------------
# Driver: indices, strata, sample ids
# ----------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    users: pa.Table
    items: pa.Table
    maps: list[SampleMaps]  # one per bucket
    item_ids: pa.Array  # sorted; position + 1 = item_idx
    strata: dict
    unseen: dict
    train_rows: int
    valid_rows: int
    test_rows: int
    train_targets: int
    no_target_users: int


def _plan(cfg: PrepareConfig, cleaned: list) -> _Plan:
    users = pa.concat_tables([c[0] for c in cleaned])
    bucket = np.repeat(np.arange(len(cleaned)), [c[0].num_rows for c in cleaned])
    by_id = pc.sort_indices(users, sort_keys=[(USER, "ascending")])
    users, bucket = users.take(by_id), bucket[by_id.to_numpy()]
    if users.num_rows == 0:
        raise ConfigError(
            f"no user is left after cleaning (min_history={cfg.clean.min_history}, "
            f"duplicates={cfg.clean.duplicates}, min_rating={cfg.clean.min_rating}, "
            f"behaviors={cfg.source.behaviors}, sample_users={cfg.clean.sample_users})"
        )
    items = pa.concat_tables([c[1] for c in cleaned]).group_by(ITEM).aggregate([("count", "sum")])
    items = items.rename_columns([ITEM, "count"]).sort_by(ITEM)
    n_items = items.num_rows
    n = users["n"].to_numpy()
    activeness = n - 2
    strata = assign_strata(activeness, cfg.strata)
    stats = strata_stats(activeness, strata, cfg.strata)

    trained = pc.filter(items[ITEM], pc.greater(items["count"], 0))
    keep: dict[str, np.ndarray] = {}
    unseen: dict[str, Any] = {"setting": cfg.clean.unseen_items}
    for split, col in (("valid", "valid_item"), ("test", "test_item")):
        is_unseen = ~pc.is_in(users[col], value_set=trained).to_numpy(zero_copy_only=False)
        unseen[f"{split}_rows_unseen"] = int(is_unseen.sum())
        keep[split] = ~is_unseen if cfg.clean.unseen_items == "drop" else np.ones(len(n), dtype=bool)
        unseen[f"removed_{split}_rows"] = int((~keep[split]).sum())

    windows = num_windows(activeness, cfg.samples.max_len, cfg.samples.window)
    ids = {s: np.where(keep[s], np.cumsum(keep[s]) - 1, -1) for s in ("valid", "test")}
    train_first = np.cumsum(windows) - windows
    user_ids, item_ids = users[USER].combine_chunks(), items[ITEM].combine_chunks()
    # One stable sort splits the users by bucket (each part in ascending user_idx, i.e. by id),
    # instead of one scan of every user per bucket.
    by_bucket = np.argsort(bucket, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(bucket, minlength=len(cleaned)))]
    maps = []
    for b in range(len(cleaned)):
        mine = by_bucket[bounds[b] : bounds[b + 1]]
        maps.append(SampleMaps(user_ids=user_ids.take(pa.array(mine)), user_idx=mine, stratum=strata[mine],
                               train_first=train_first[mine], valid_id=ids["valid"][mine],
                               test_id=ids["test"][mine]))
    targets = np.minimum(activeness - 1, cfg.samples.max_len if cfg.samples.window == "last" else activeness)
    users_out = pa.table(
        {
            "user_idx": pa.array(np.arange(len(n)), pa.int64()),
            USER: users[USER],
            "activeness": pa.array(activeness, pa.int64()),
            "stratum": pa.array(strata, pa.int8()),
        }
    )
    items_out = pa.table(
        {
            "item_idx": pa.array(np.arange(1, n_items + 1), pa.int32()),
            ITEM: items[ITEM],
            "count": items["count"],
        }
    )
    return _Plan(
        users=users_out,
        items=items_out,
        maps=maps,
        item_ids=item_ids,
        strata=stats,
        unseen=unseen,
        train_rows=int(windows.sum()),
        valid_rows=int(keep["valid"].sum()),
        test_rows=int(keep["test"].sum()),
        train_targets=int(np.maximum(targets, 0).sum()),
        no_target_users=int((activeness < 2).sum()),
    )


# ----------------------------------------------------------------------------------------------
# Phase 3: samples of one bucket
# ----------------------------------------------------------------------------------------------


def _sample_bucket(b: int, cfg: PrepareConfig, maps: SampleMaps, item_ids: pa.Array) -> dict[str, int]:
    out = Path(cfg.output)
    rows = pq.read_table(out / "_work" / "clean" / f"{b:04d}.parquet")
    tables = build_samples(rows, maps, item_ids, cfg.samples, cfg.seed)
    for split, table in tables.items():
        _write_parquet(table, out / split / f"part-{b:05d}.parquet", row_group_size=1 << 17)
    return {split: t.num_rows for split, t in tables.items()}


# ----------------------------------------------------------------------------------------------
# Report and summary
# ----------------------------------------------------------------------------------------------


def _report(cfg, ingested, cleaned, plan: _Plan, counts, timings) -> dict[str, Any]:
    s = {k: sum(c[2][k] for c in cleaned) for k in STAT_KEYS}
    removed = (
        s["removed_sample_users_rows"] + s["removed_behaviors_rows"] + s["removed_min_rating_rows"]
        + s["removed_duplicates"] + s["removed_min_history_rows"]
    )
    if s["rows_in"] - removed != s["rows_out"]:
        raise RuntimeError(f"internal error: row accounting does not add up: {s}")
    return {
        "source": {
            "format": cfg.source.format,
            "path": cfg.source.path,
            "timestamp_unit": "position" if cfg.source.format == "amazon_seq" else (
                cfg.source.timestamp_unit if cfg.source.format in ("csv", "parquet") else "s"
            ),
            "files": ingested,
            "rows_read": s["rows_in"],
            "users_read": s["users_in"],
        },
        "filters": [
            {"filter": "sample_users", "setting": cfg.clean.sample_users,
             "removed_rows": s["removed_sample_users_rows"], "removed_users": s["removed_sample_users_users"]},
            {"filter": "behaviors", "setting": cfg.source.behaviors or "all",
             "removed_rows": s["removed_behaviors_rows"], "removed_users": s["removed_behaviors_users"]},
            {"filter": "min_rating", "setting": cfg.clean.min_rating,
             "removed_rows": s["removed_min_rating_rows"], "removed_users": s["removed_min_rating_users"]},
            {"filter": "duplicates", "setting": cfg.clean.duplicates,
             "removed_rows": s["removed_duplicates"], "removed_users": 0},
            {"filter": "min_history", "setting": cfg.clean.min_history,
             "removed_rows": s["removed_min_history_rows"], "removed_users": s["removed_min_history_users"]},
            {"filter": "unseen_items", **plan.unseen},
        ],
        "out_of_order": {
            "rows": s["out_of_order_rows"],
            "users": s["out_of_order_users"],
            "action": "each user's events sorted by (timestamp, source order); nothing removed",
        },
        "result": {
            "rows": s["rows_out"],
            "users": s["users_out"],
            "items": plan.items.num_rows,
            "train_rows": counts["train"],
            "train_targets": plan.train_targets,
            "valid_rows": counts["valid"],
            "test_rows": counts["test"],
            "users_without_train_target": plan.no_target_users,
        },
        "num_buckets": cfg.num_buckets,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }


def format_summary(result: PrepareResult) -> str:
    """The printed summary: what was read, every filter with what it removed, the result, the strata."""
    r = result.report
    lines = [
        f"ray-pinet prepare -> {result.output}",
        f"  read     {r['source']['rows_read']:>12,} rows  {r['source']['users_read']:>10,} users  "
        f"from {len(r['source']['files'])} file(s) ({r['source']['format']})",
    ]
    skipped = r["source"].get("skipped_paths", [])
    for note in skipped[:10]:
        lines.append(f"  input    {note}")
    if len(skipped) > 10:
        lines.append(f"  input    ... {len(skipped) - 10} more skipped path(s): "
                     "report.json source.skipped_paths")
    for f in r["filters"][:-1]:
        lines.append(
            f"  {f['filter']:<12} {str(f['setting']):<12} removed {f['removed_rows']:>10,} rows "
            f"{f['removed_users']:>8,} users"
        )
    u = r["filters"][-1]  # unseen_items, always last
    lines.append(
        f"  unseen_items {u['setting']:<12} valid {u['valid_rows_unseen']:,} / "
        f"test {u['test_rows_unseen']:,} "
        f"targets unseen in training; removed {u['removed_valid_rows']:,} / {u['removed_test_rows']:,}"
    )
    o = r["out_of_order"]
    lines.append(f"  out-of-order {o['rows']:,} rows of {o['users']:,} users (sorted, kept)")
    res = r["result"]
    lines.append(
        f"  result   {res['rows']:>12,} rows  {res['users']:>10,} users  {res['items']:,} items; samples "
        f"train {res['train_rows']:,} ({res['train_targets']:,} targets), valid {res['valid_rows']:,}, "
        f"test {res['test_rows']:,}; {res['users_without_train_target']:,} users without a training target"
    )
    lines.append(format_strata_table(result.strata))
    tasks = r.get("tasks", {})
    reused = [f"{t['reused']}/{t['reused'] + t['tasks']} {k}" for k, t in tasks.items() if t.get("reused")]
    if reused:
        lines.append(f"  resumed  kept results of an unfinished run: {', '.join(reused)} tasks")
    retried = [f"{t['retried']} {k}" for k, t in tasks.items() if t.get("retried")]
    if retried:
        lines.append(f"  retried  {', '.join(retried)} task attempt(s) after their worker died")
    lines.append("  timings " + ", ".join(f"{k} {v:.1f}s" for k, v in r["timings_s"].items()))
    return "\n".join(lines)
