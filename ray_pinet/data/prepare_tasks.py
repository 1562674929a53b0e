"""What the Ray tasks of ``prepare`` run, phase by phase (``pipeline.prepare`` orchestrates them): ingest
one file into canonical parts and user buckets, clean one bucket, count unseen items, plan the numbering and
strata (on the driver), and write one bucket's samples. Each writes its files under temporary names
(``outputs.atomic_path``), so a retried or resumed task never meets a half file."""

from __future__ import annotations

import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_pinet.config_base import ConfigError
from ray_pinet.data.clean import MixedScale, clean_bucket, per_user
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.samples import SampleMaps, build_samples, num_windows
from ray_pinet.data.schema import ITEM, TS, USER, canonical_schema
from ray_pinet.data.sources import FileStats, display_name, first_row, read_file
from ray_pinet.data.strata import (
    first_ranks,
    ranks_in_bucket,
    stats_from_histograms,
    stratum_histograms,
    stratum_of,
)
from ray_pinet.errors import DataError
from ray_pinet.outputs import atomic_path

SPLITS = ("train", "valid", "test")
CANONICAL_PART_ROWS = 4 << 20
# Scratch files under _work/ are written once, read once and deleted: plain (no compression, no
# dictionary) is 2.7x faster to write and 2x faster to read than pyarrow's default (snappy +
# dictionary) on the synthetic benchmark log, for 2.7x the bytes (BENCHMARKS.md).
SCRATCH_PARQUET = {"compression": "none", "use_dictionary": False}
WORK_DIRS = ("buckets", "clean", "users", "users_out", "done")
# Users are hashed into this many slots, and bucket b holds a contiguous run of slots: numbering
# users by (slot, id) bucket after bucket gives the same user_idx for any num_buckets <= this.
HASH_SLOTS = 1 << 16


def write_parquet(table: pa.Table, path: Path, **kwargs) -> None:
    """``pq.write_table`` under a temporary name, renamed into place when complete (module docstring)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def user_slot(user_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Stable hash slot of each user id: ``crc32(utf-8 id) % HASH_SLOTS`` (same in every process)."""
    return per_user(user_ids, lambda uid: zlib.crc32(uid.encode()) % HASH_SLOTS, np.int64)


def bucket_of(user_ids: pa.Array | pa.ChunkedArray, num_buckets: int) -> np.ndarray:
    """Bucket of each user id: a contiguous run of hash slots per bucket (``HASH_SLOTS``)."""
    return user_slot(user_ids) * num_buckets // HASH_SLOTS


def ingest_file(i: int, fs, path: str, cfg: PrepareConfig, bucket_cols: list[str]) -> dict:
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


def clean_one_bucket(b: int, cfg: PrepareConfig, bucket_cols: list[str], files: list[str],
                     fs=None) -> CleanedSummary:
    """Clean bucket ``b``; writes its rows (``_work/clean``) and its users in user_idx order (``_work/users``:
    by hash slot, then id) and returns only what the driver needs to number and stratify them."""
    work = Path(cfg.output) / "_work"
    paths = sorted((work / "buckets" / f"{b:04d}").glob("part-*.parquet"))  # file order = source order
    schema = canonical_schema(bucket_cols)
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
    write_parquet(res.rows, work / "clean" / f"{b:04d}.parquet", **SCRATCH_PARQUET)
    write_parquet(users, work / "users" / f"{b:04d}.parquet", **SCRATCH_PARQUET)
    return CleanedSummary(
        users=users.num_rows, activeness_values=values, activeness_counts=counts,
        train_rows=int(windows.sum()), train_targets=int(np.maximum(targets, 0).sum()),
        no_target_users=int((activeness < 2).sum()), items=res.items, stats=res.stats,
    )


@dataclass
class CleanedSummary:
    """A cleaned bucket as the driver sees it: O(distinct activeness values + items), no per-user table."""

    users: int
    activeness_values: np.ndarray  # ascending, distinct
    activeness_counts: np.ndarray
    train_rows: int  # training windows
    train_targets: int
    no_target_users: int
    items: pa.Table | None  # item_id, count (training events); None once folded into ItemCounts
    stats: dict


class ItemCounts:
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


@dataclass
class BucketPlan:
    """What samples task b gets from the driver: where its users' numbers start, and the global rank of the
    first of its users of each activeness value (for the strata). No per-user data."""

    num_users: int  # all users, for the strata rule
    user_first: int  # user_idx of the bucket's first user
    train_first: int  # first training sample_id
    valid_first: int
    test_first: int
    activeness_values: np.ndarray
    first_rank: np.ndarray


@dataclass
class Plan:
    items: pa.Table
    item_ids: pa.Array  # sorted; position + 1 = item_idx
    buckets: list[BucketPlan]
    strata: dict
    unseen: dict
    train_rows: int
    valid_rows: int
    test_rows: int
    train_targets: int
    no_target_users: int


def plan_buckets(cfg: PrepareConfig, cleaned: list[CleanedSummary], items: pa.Table,
                 unseen_counts: list[tuple[int, int]]) -> Plan:
    """Numbers, strata and sample-id offsets from per-bucket summaries: O(buckets x distinct activeness values
    + items) on the driver, nothing per user. Users are numbered bucket by bucket (each by hash slot then id),
    items by id; sample ids are contiguous per split in user_idx order."""
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
    unseen_v, unseen_t = np.array(unseen_counts, dtype=np.int64).T  # per bucket
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
    plans = [BucketPlan(num, int(u0[b]), int(t0[b]), int(v0[b]), int(s0[b]), values[b], firsts[b])
             for b in range(len(cleaned))]
    items_out = pa.table({"item_idx": pa.array(np.arange(1, items.num_rows + 1), pa.int32()),
                          ITEM: items[ITEM], "count": items["count"]})
    return Plan(
        items=items_out,
        item_ids=items[ITEM].combine_chunks(),
        buckets=plans,
        strata=stats,
        unseen=unseen,
        train_rows=int(train.sum()),
        valid_rows=int(kept_v.sum()),
        test_rows=int(kept_t.sum()),
        train_targets=sum(c.train_targets for c in cleaned),
        no_target_users=sum(c.no_target_users for c in cleaned),
    )


def count_unseen(b: int, cfg: PrepareConfig, unseen_ids: pa.Array) -> tuple[int, int]:
    """Bucket b's users whose validation / test item was never trained on."""
    users = pq.read_table(Path(cfg.output) / "_work" / "users" / f"{b:04d}.parquet",
                          columns=["valid_item", "test_item"])
    return tuple(int(pc.sum(pc.is_in(users[c], value_set=unseen_ids)).as_py() or 0)
                 for c in ("valid_item", "test_item"))


def sample_bucket(b: int, cfg: PrepareConfig, plan: BucketPlan, item_ids: pa.Array,
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
        write_parquet(table, out / split / f"part-{b:05d}.parquet", row_group_size=1 << 17)
    write_parquet(pa.table({"user_idx": pa.array(user_idx, pa.int64()), USER: users[USER],
                            "activeness": pa.array(a, pa.int64()), "stratum": pa.array(strata, pa.int8())}),
                  work / "users_out" / f"{b:04d}.parquet")
    return {split: t.num_rows for split, t in tables.items()}


def concat_parquet(parts: list[Path], path: Path) -> None:
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
