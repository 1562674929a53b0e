"""``prepare(cfg)``: raw log -> the prepared-data directory of docs/design.md, on Ray.

Parallel phases, each a set of Ray tasks (one CPU each) that read and write Parquet on disk, and
one driver step. Only summaries travel to the driver (counts, activeness histograms, per-item
training counts); neither the log nor any per-user table does, so the driver is O(1) in users:

1. ingest (one task per input file): read + validate (``sources``), write ``canonical/`` and split
   the rows into ``num_buckets`` user buckets by a stable hash of the user id (crc32 into
   ``HASH_SLOTS`` slots, a contiguous run of slots per bucket), keeping source order inside each
   bucket. This replaces a hash shuffle (slow on small machines, ray-notes.md) and keeps every
   user whole in one bucket.
2. clean (one task per bucket): cleaning policies (``clean``); writes the bucket's rows and its
   users in user_idx order (hash slot, then id), returns counts, the bucket's activeness histogram
   and its per-item training counts (summed on the driver as they arrive).
3. driver: ``item_idx`` (items sorted by id, 1..M), strata from the activeness histogram
   (``strata.stratum_histograms``: exact, with prepare's tie-break), and each bucket's first
   user_idx and sample ids. Users are numbered bucket after bucket, so user_idx = the bucket's
   first + the rank inside the bucket, the same for any ``num_buckets`` (prepared format 2; format 1
   numbered users by id, which needed every user on the driver). When some item appears only as a
   validation/test target, one small task round counts those rows per bucket (``unseen``).
4. samples (one task per bucket): the bucket's strata (global ranks from the driver's offsets),
   leave-one-out rows, windows and negatives (``samples``), and its rows of ``users.parquet``,
   which the driver concatenates one bucket at a time.

Scratch files of a bucket are deleted as soon as its result is kept (``run_tasks(keep=...)``), so
scratch disk is about one uncompressed copy of the log at its peak.

Memory of one task is about the size of one bucket (rows / num_buckets); raise ``num_buckets`` for
larger logs (the benchmarks use about 1.25 M rows per bucket). Outputs are written to a local (or
shared) filesystem path.

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
from ray_pinet.data.prepared import PREPARED_FORMAT
from ray_pinet.data.ray_tasks import ensure_ray, run_tasks
from ray_pinet.data.samples import SampleMaps, build_samples, num_windows
from ray_pinet.data.schema import BEHAVIOR, ITEM, RATING, TS, USER
from ray_pinet.data.sources import (FileStats, display_name, first_row, output_columns, read_file,
                                    resolve_inputs)
from ray_pinet.data.strata import (first_ranks, format_strata_table, ranks_in_bucket, stats_from_histograms,
                                   stratum_histograms, stratum_of)
from ray_pinet.errors import DataError
from ray_pinet.outputs import atomic_path, refuse_foreign, refuse_input_inside, resumable_dir

SPLITS = ("train", "valid", "test")
CANONICAL_PART_ROWS = 4 << 20
# Scratch files under _work/ are written once, read once and deleted: plain (no compression, no
# dictionary) is 2.7x faster to write and 2x faster to read than pyarrow's default (snappy +
# dictionary) on the synthetic benchmark log, for 2.7x the bytes (BENCHMARKS.md).
SCRATCH_PARQUET = {"compression": "none", "use_dictionary": False}
_WORK_DIRS = ("buckets", "clean", "users", "users_out", "done")
# Users are hashed into this many slots, and bucket b holds a contiguous run of slots: numbering
# users by (slot, id) bucket after bucket gives the same user_idx for any num_buckets <= this.
HASH_SLOTS = 1 << 16
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
        for d in ("canonical", *SPLITS, *(f"_work/{w}" for w in _WORK_DIRS)):
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
        item_counts = _ItemCounts()

        def fold(b: int, summary: _CleanedSummary) -> _CleanedSummary:
            # A finished bucket's scratch input is deleted at once (a rerun loads its kept result
            # and never reads it): scratch disk stays about one copy of the log, not two.
            item_counts.add(summary.items)
            shutil.rmtree(work / "buckets" / f"{b:04d}", ignore_errors=True)
            return dataclasses.replace(summary, items=None)

        cleaned = run_tasks(_clean_bucket, [(b, tcfg, bucket_cols, files, fs) for b in buckets], "clean",
                            progress, tasks, done, keep=fold)
        timings["clean"], t = time.perf_counter() - t, time.perf_counter()

        items = item_counts.table()
        unseen_ids = pc.filter(items[ITEM], pc.equal(items["count"], 0)).combine_chunks()
        unseen_counts = [(0, 0)] * cfg.num_buckets
        if len(unseen_ids):  # one small round over the users files; most logs skip it
            unseen_ref = ray.put(unseen_ids)
            unseen_counts = run_tasks(_count_unseen, [(b, tcfg, unseen_ref) for b in buckets], "unseen",
                                      progress, tasks, done)
            del unseen_ref
        plan = _plan(cfg, cleaned, items, unseen_counts)
        _write_parquet(plan.items, tmp / "items.parquet")
        timings["index_and_strata"], t = time.perf_counter() - t, time.perf_counter()

        items_ref = ray.put(plan.item_ids)
        drop_ref = ray.put(unseen_ids) if cfg.clean.unseen_items == "drop" and len(unseen_ids) else None

        def drop_scratch(b: int, written: dict) -> dict:
            for name in ("clean", "users"):
                (work / name / f"{b:04d}.parquet").unlink(missing_ok=True)
            return written

        sample_args = [(b, tcfg, plan.buckets[b], items_ref, drop_ref) for b in buckets]
        written = run_tasks(_sample_bucket, sample_args, "samples", progress, tasks, done, keep=drop_scratch)
        _concat_parquet([work / "users_out" / f"{b:04d}.parquet" for b in buckets], tmp / "users.parquet")
        timings["samples"] = time.perf_counter() - t
        del items_ref, drop_ref, sample_args
        shutil.rmtree(work)  # only now: a run that stops keeps it for the next to resume from

        counts = {s: sum(w[s] for w in written) for s in SPLITS}
        expected = {"train": plan.train_rows, "valid": plan.valid_rows, "test": plan.test_rows}
        if counts != expected:
            raise RuntimeError(f"internal error: wrote {counts} rows, planned {expected}")
        report = {"prepared_format": PREPARED_FORMAT,
                  **_report(cfg, ingested, cleaned, plan, counts, timings)}
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
    if not 1 <= cfg.num_buckets <= HASH_SLOTS:
        raise ConfigError(f"num_buckets must be in 1..{HASH_SLOTS}, got {cfg.num_buckets}")
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


def user_slot(user_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Stable hash slot of each user id: ``crc32(utf-8 id) % HASH_SLOTS`` (same in every process)."""
    return per_user(user_ids, lambda uid: zlib.crc32(uid.encode()) % HASH_SLOTS, np.int64)


def bucket_of(user_ids: pa.Array | pa.ChunkedArray, num_buckets: int) -> np.ndarray:
    """Bucket of each user id: bucket b holds a contiguous run of hash slots, so numbering users
    bucket by bucket, by (slot, id) inside each, gives one order whatever ``num_buckets`` is."""
    return user_slot(user_ids) * num_buckets // HASH_SLOTS


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
                  fs=None) -> "_CleanedSummary":
    """Clean bucket ``b``; writes its rows (``_work/clean``) and its users in user_idx order
    (``_work/users``: by hash slot, then id) and returns only what the driver needs to number
    and stratify them: counts, the activeness histogram and the per-item training counts."""
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
    del table, parts
    users = res.users.append_column("slot", pa.array(user_slot(res.users[USER]), pa.int64()))
    users = users.sort_by([("slot", "ascending"), (USER, "ascending")]).drop_columns(["slot"])
    activeness = users["n"].to_numpy() - 2
    values, counts = np.unique(activeness, return_counts=True)
    windows = num_windows(activeness, cfg.samples.max_len, cfg.samples.window)
    targets = np.minimum(activeness - 1, cfg.samples.max_len if cfg.samples.window == "last" else activeness)
    _write_parquet(res.rows, work / "clean" / f"{b:04d}.parquet", **SCRATCH_PARQUET)
    _write_parquet(users, work / "users" / f"{b:04d}.parquet", **SCRATCH_PARQUET)
    return _CleanedSummary(
        users=users.num_rows, activeness_values=values, activeness_counts=counts,
        train_rows=int(windows.sum()), train_targets=int(np.maximum(targets, 0).sum()),
        no_target_users=int((activeness < 2).sum()), items=res.items, stats=res.stats,
    )


@dataclass
class _CleanedSummary:
    """A cleaned bucket as the driver sees it: O(distinct activeness values + items), no per-user table."""

    users: int
    activeness_values: np.ndarray  # ascending, distinct
    activeness_counts: np.ndarray
    train_rows: int  # training windows
    train_targets: int
    no_target_users: int
    items: pa.Table | None  # item_id, count (training events); None once folded into _ItemCounts
    stats: dict


class _ItemCounts:
    """Per-item training counts summed over buckets as their results arrive: the driver holds
    O(items x a few buckets), not one table per bucket."""

    FOLD = 16

    def __init__(self) -> None:
        self.parts: list[pa.Table] = []

    def add(self, items: pa.Table) -> None:
        self.parts.append(items)
        if len(self.parts) >= self.FOLD:
            self.parts = [self._sum()]

    def _sum(self) -> pa.Table:
        t = pa.concat_tables(self.parts).group_by(ITEM).aggregate([("count", "sum")])
        return t.rename_columns([ITEM, "count"])

    def table(self) -> pa.Table:
        return self._sum().sort_by(ITEM)


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
class _BucketPlan:
    """What samples task b gets from the driver: where its users' numbers start, and the global
    rank of the first of its users of each activeness value (for the strata). No per-user data."""

    num_users: int  # all users, for the strata rule
    user_first: int  # user_idx of the bucket's first user
    train_first: int  # first training sample_id
    valid_first: int
    test_first: int
    activeness_values: np.ndarray
    first_rank: np.ndarray


@dataclass
class _Plan:
    items: pa.Table
    item_ids: pa.Array  # sorted; position + 1 = item_idx
    buckets: list[_BucketPlan]
    strata: dict
    unseen: dict
    users: int
    train_rows: int
    valid_rows: int
    test_rows: int
    train_targets: int
    no_target_users: int


def _plan(cfg: PrepareConfig, cleaned: list[_CleanedSummary], items: pa.Table,
          unseen_counts: list[tuple[int, int]]) -> _Plan:
    """Numbers, strata and sample-id offsets from per-bucket summaries: O(buckets x distinct
    activeness values + items) on the driver, nothing per user.

    Users are numbered bucket by bucket (bucket-major, each bucket by hash slot then id, see
    ``bucket_of``), items by id; sample ids are contiguous per split in user_idx order."""
    n_users = np.array([c.users for c in cleaned], dtype=np.int64)
    if n_users.sum() == 0:
        raise ConfigError(
            f"no user is left after cleaning (min_history={cfg.clean.min_history}, "
            f"duplicates={cfg.clean.duplicates}, min_rating={cfg.clean.min_rating}, "
            f"behaviors={cfg.source.behaviors}, sample_users={cfg.clean.sample_users})"
        )
    values = [c.activeness_values for c in cleaned]
    allv, total, firsts = first_ranks(values, [c.activeness_counts for c in cleaned])
    stats = stats_from_histograms(stratum_histograms(allv, total, cfg.strata), cfg.strata)

    drop = cfg.clean.unseen_items == "drop"
    unseen_v = np.array([u[0] for u in unseen_counts], dtype=np.int64)
    unseen_t = np.array([u[1] for u in unseen_counts], dtype=np.int64)
    unseen = {"setting": cfg.clean.unseen_items,
              "valid_rows_unseen": int(unseen_v.sum()), "test_rows_unseen": int(unseen_t.sum()),
              "removed_valid_rows": int(unseen_v.sum()) if drop else 0,
              "removed_test_rows": int(unseen_t.sum()) if drop else 0}
    kept_v, kept_t = (n_users - unseen_v, n_users - unseen_t) if drop else (n_users, n_users)
    train = np.array([c.train_rows for c in cleaned], dtype=np.int64)

    def first(x: np.ndarray) -> np.ndarray:
        return np.cumsum(x) - x

    u0, t0, v0, s0 = first(n_users), first(train), first(kept_v), first(kept_t)
    num = int(n_users.sum())
    plans = [_BucketPlan(num, int(u0[b]), int(t0[b]), int(v0[b]), int(s0[b]), values[b], firsts[b])
             for b in range(len(cleaned))]
    items_out = pa.table(
        {
            "item_idx": pa.array(np.arange(1, items.num_rows + 1), pa.int32()),
            ITEM: items[ITEM],
            "count": items["count"],
        }
    )
    return _Plan(
        items=items_out,
        item_ids=items[ITEM].combine_chunks(),
        buckets=plans,
        strata=stats,
        unseen=unseen,
        users=num,
        train_rows=int(train.sum()),
        valid_rows=int(kept_v.sum()),
        test_rows=int(kept_t.sum()),
        train_targets=sum(c.train_targets for c in cleaned),
        no_target_users=sum(c.no_target_users for c in cleaned),
    )


def _count_unseen(b: int, cfg: PrepareConfig, unseen_ids: pa.Array) -> tuple[int, int]:
    """Bucket b's users whose validation / test item was never trained on."""
    users = pq.read_table(Path(cfg.output) / "_work" / "users" / f"{b:04d}.parquet",
                          columns=["valid_item", "test_item"])
    return tuple(int(pc.sum(pc.is_in(users[c], value_set=unseen_ids)).as_py() or 0)
                 for c in ("valid_item", "test_item"))


# ----------------------------------------------------------------------------------------------
# Phase 3: samples of one bucket
# ----------------------------------------------------------------------------------------------


def _sample_bucket(b: int, cfg: PrepareConfig, plan: _BucketPlan, item_ids: pa.Array,
                   drop_ids: pa.Array | None) -> dict[str, int]:
    """Bucket b's samples (train/valid/test parts) and its rows of users.parquet (``_work/users_out``).
    ``drop_ids``: items never trained on, whose evaluation rows are dropped (unseen_items=drop)."""
    out, work = Path(cfg.output), Path(cfg.output) / "_work"
    rows = pq.read_table(work / "clean" / f"{b:04d}.parquet")
    users = pq.read_table(work / "users" / f"{b:04d}.parquet")
    a = users["n"].to_numpy() - 2
    strata = stratum_of(a, ranks_in_bucket(a, plan.activeness_values, plan.first_rank), plan.num_users,
                        cfg.strata)
    windows = num_windows(a, cfg.samples.max_len, cfg.samples.window)
    ids = {}
    for split, col, first in (("valid", "valid_item", plan.valid_first),
                              ("test", "test_item", plan.test_first)):
        keep = (np.ones(len(a), dtype=bool) if drop_ids is None
                else ~pc.is_in(users[col], value_set=drop_ids).to_numpy(zero_copy_only=False))
        ids[split] = np.where(keep, first + np.cumsum(keep) - 1, -1)
    user_idx = plan.user_first + np.arange(len(a), dtype=np.int64)
    maps = SampleMaps(user_ids=users[USER].combine_chunks(), user_idx=user_idx, stratum=strata,
                      train_first=plan.train_first + np.cumsum(windows) - windows,
                      valid_id=ids["valid"], test_id=ids["test"])
    tables = build_samples(rows, maps, item_ids, cfg.samples, cfg.seed)
    for split, table in tables.items():
        _write_parquet(table, out / split / f"part-{b:05d}.parquet", row_group_size=1 << 17)
    _write_parquet(pa.table({"user_idx": pa.array(user_idx, pa.int64()), USER: users[USER],
                             "activeness": pa.array(a, pa.int64()), "stratum": pa.array(strata, pa.int8())}),
                   work / "users_out" / f"{b:04d}.parquet")
    return {split: t.num_rows for split, t in tables.items()}


def _concat_parquet(parts: list[Path], path: Path) -> None:
    """One Parquet file of ``parts`` in order, read one at a time (the driver never holds more)."""
    with atomic_path(path) as tmp:
        writer = None
        try:
            for part in parts:
                table = pq.read_table(part)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()


# ----------------------------------------------------------------------------------------------
# Report and summary
# ----------------------------------------------------------------------------------------------


def _report(cfg, ingested, cleaned, plan: _Plan, counts, timings) -> dict[str, Any]:
    s = {k: sum(c.stats[k] for c in cleaned) for k in STAT_KEYS}
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
