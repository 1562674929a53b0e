"""Cleaning of one user bucket (whole users, rows in source order). Pure numpy/pyarrow, no Ray.

Order of the steps, each counted in the returned stats (rows, and users that lose all their rows):

Before any step, a user whose timestamps lie on two scales (some in seconds, some ~1000x larger in
milliseconds, or us/ns) is an error (``MixedScale``, a DataError): sorting such a user's events would put the
millisecond ones last without a word. Scales are the bands of epoch times from 1973 to 2286 (1e8..1e10 s,
1e11..1e13 ms, ...); values outside every band (positions, small counters) are not judged.

0. ``sample_users`` < 1: only users whose id hashes below that share are kept (``in_user_sample``);
   then ``source.behaviors``: when not empty, only rows with one of these behaviours are kept.
1. ``min_rating``: rows rated below it are removed.
2. Out-of-order events: a row is out of order when an earlier row of the same user (in source
   order) has a larger timestamp. Such rows are counted (rows and users) and kept; every user's
   events are then sorted by ``(timestamp, source order)``.
3. ``duplicates``: ``drop_exact`` keeps the first (in source order) of identical
   ``(user, item, timestamp)`` rows; ``drop_pair`` keeps the earliest event of each ``(user, item)``
   pair (earliest by ``(timestamp, source order)``); ``keep`` keeps all.
4. ``min_history``: users with fewer events than this are removed (rows and users counted).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ray_pinet.data.config import CleanConfig
from ray_pinet.data.samples import sorted_unique
from ray_pinet.data.schema import BEHAVIOR, ITEM, RATING, TS, USER
from ray_pinet.errors import DataError

STAT_KEYS = (
    "rows_in", "users_in",
    "removed_sample_users_rows", "removed_sample_users_users",
    "removed_behaviors_rows", "removed_behaviors_users",
    "removed_min_rating_rows", "removed_min_rating_users",
    "out_of_order_rows", "out_of_order_users",
    "removed_duplicates",
    "removed_min_history_rows", "removed_min_history_users",
    "rows_out", "users_out",
)


@dataclass
class CleanedBucket:
    rows: pa.Table  # user_id, item_id: users contiguous, each user's events in time order
    users: pa.Table  # user_id, n (events), n_distinct (items), valid_item, test_item
    items: pa.Table  # item_id, count (training events; 0 for items seen only in evaluation)
    stats: dict[str, int]


def clean_bucket(
    table: pa.Table, cfg: CleanConfig, behaviors: list[str] | tuple[str, ...] = ()
) -> CleanedBucket:
    """Apply the cleaning policies to ``table`` (canonical columns, rows in source order)."""
    check_scales(table)
    stats = dict.fromkeys(STAT_KEYS, 0)
    table = _filter_rows(table, cfg, behaviors, stats)
    users, u = _encode(table[USER])
    items, it = _encode(table[ITEM])
    ts = table[TS].to_numpy()
    pos = np.arange(len(ts))  # the table is in source order

    # 2. out-of-order: ts below the running max of the user's earlier rows (source order).
    late = ts < pd.Series(ts).groupby(u, sort=False).cummax().to_numpy()
    stats["out_of_order_rows"] = int(late.sum())
    stats["out_of_order_users"] = int(len(np.unique(u[late])))

    # The output order: users contiguous, events by (ts, source order). One sort of every row; the
    # kept rows are a subsequence of it.
    by_time = np.lexsort((pos, ts, u))

    # 3. duplicates: keep the first (in source order) of each group of equal keys.
    keep = np.ones(len(ts), dtype=bool)
    if cfg.duplicates == "drop_exact" and len(ts):
        # Exact duplicates share (user, ts), so they lie in one run of ``by_time``; only rows in
        # runs of two or more need the item comparison (a second full sort cost as much as the first).
        us, tss = u[by_time], ts[by_time]
        run = np.cumsum(np.r_[True, (us[1:] != us[:-1]) | (tss[1:] != tss[:-1])]) - 1
        cand = np.flatnonzero(np.bincount(run)[run] > 1)  # positions in by_time, ascending
        c = cand[np.lexsort((cand, it[by_time[cand]], run[cand]))]
        same = (run[c][1:] == run[c][:-1]) & (it[by_time[c]][1:] == it[by_time[c]][:-1])
        keep[by_time[c[1:][same]]] = False
    elif cfg.duplicates == "drop_pair" and len(ts):
        o = np.lexsort((pos, ts, it, u))  # equal (user, item) adjacent, earliest first
        same = (u[o][1:] == u[o][:-1]) & (it[o][1:] == it[o][:-1])
        keep[o[1:][same]] = False
    stats["removed_duplicates"] = int((~keep).sum())

    # 4. min_history on the remaining events.
    n = np.bincount(u[keep], minlength=len(users))
    short = (n > 0) & (n < cfg.min_history)
    drop_user = short[u] & keep
    stats["removed_min_history_rows"] = int(drop_user.sum())
    stats["removed_min_history_users"] = int(short.sum())
    keep &= ~drop_user

    order = by_time[keep[by_time]]
    return _cleaned(users, items, u[order], it[order], stats)


def _filter_rows(table: pa.Table, cfg: CleanConfig, behaviors: list[str] | tuple[str, ...],
                 stats: dict[str, int]) -> pa.Table:
    """Steps 0 and 1, each filter's removed rows and users counted in ``stats``."""
    stats["rows_in"] = table.num_rows
    stats["users_in"] = n_users = pc.count_distinct(table[USER]).as_py()

    def keep_sampled(t: pa.Table) -> np.ndarray:
        return in_user_sample(t[USER], cfg.sample_users)

    def keep_behaviors(t: pa.Table) -> pa.ChunkedArray:
        return pc.is_in(t[BEHAVIOR], pa.array(list(behaviors), pa.string()))

    def keep_rated(t: pa.Table) -> pa.ChunkedArray:
        return pc.greater_equal(t[RATING], cfg.min_rating)

    for name, mask in (
        ("sample_users", keep_sampled if cfg.sample_users < 1.0 else None),
        ("behaviors", keep_behaviors if behaviors else None),
        ("min_rating", keep_rated if cfg.min_rating is not None else None),
    ):
        if mask is not None:
            rows = table.num_rows
            table = table.filter(mask(table))
            left = pc.count_distinct(table[USER]).as_py()
            stats[f"removed_{name}_rows"] = rows - table.num_rows
            stats[f"removed_{name}_users"] = n_users - left
            n_users = left
    return table


def _cleaned(users: pa.Array, items: pa.Array, uo: np.ndarray, io: np.ndarray,
             stats: dict[str, int]) -> CleanedBucket:
    """The bucket from the user and item codes (into ``users``, ``items``) of its kept rows in
    output order."""
    starts = np.flatnonzero(np.r_[True, uo[1:] != uo[:-1]]) if len(uo) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(uo)] if len(uo) else starts
    n_user = ends - starts
    distinct = sorted_unique(uo.astype(np.int64) * (len(items) + 1) + io)
    n_distinct = np.bincount(distinct // (len(items) + 1), minlength=len(users))[uo[starts]]

    # Training events = all but each user's last two (validation, test).
    from_end = np.arange(len(uo)) - np.repeat(ends, n_user)  # -1 = last event
    train = from_end <= -3
    train_count = np.bincount(io[train], minlength=len(items))
    present = np.flatnonzero(np.bincount(io, minlength=len(items)))

    stats["rows_out"] = int(len(uo))
    stats["users_out"] = int(len(starts))
    return CleanedBucket(
        rows=pa.table({USER: users.take(pa.array(uo)), ITEM: items.take(pa.array(io))}),
        users=pa.table({
            USER: users.take(pa.array(uo[starts])),
            "n": pa.array(n_user, pa.int64()),
            "n_distinct": pa.array(n_distinct, pa.int64()),
            "valid_item": items.take(pa.array(io[ends - 2], pa.int64())),
            "test_item": items.take(pa.array(io[ends - 1], pa.int64())),
        }),
        items=pa.table({ITEM: items.take(pa.array(present)),
                        "count": pa.array(train_count[present], pa.int64())}),
        stats=stats,
    )


_SCALES = ("seconds", "milliseconds", "microseconds", "nanoseconds")


def _scale_band(ts: np.ndarray) -> np.ndarray:
    """Per value: 0 s, 1 ms, 2 us, 3 ns (epoch times 1973..2286 in that unit), -1 outside all bands."""
    band = np.full(len(ts), -1, dtype=np.int64)
    for k in range(len(_SCALES)):
        band[(ts >= 10 ** (8 + 3 * k)) & (ts < 10 ** (10 + 3 * k))] = k
    return band


class MixedScale(DataError):
    """A user's timestamps on two scales; ``position`` = the table row of the offending value."""

    def __init__(self, reason: str, position: int, value: int) -> None:
        super().__init__(reason, column=TS, value=value)
        self.position = position


def check_scales(table: pa.Table) -> None:
    """Raise ``MixedScale`` for the first row (table order) whose timestamp is on another scale
    than most of its user's. Two reductions when the whole table is on one scale (real logs)."""
    if table.num_rows == 0:
        return
    lo, hi = (v.as_py() for v in pc.min_max(table[TS]).values())
    ends = _scale_band(np.array([lo, hi], dtype=np.int64))
    if ends[0] == ends[1] and ends[0] >= 0 or hi < 10**8:
        return  # all on one scale, or none in any band
    ts = table[TS].to_numpy()
    band = _scale_band(ts)
    ok = band >= 0
    if len(np.unique(band[ok])) < 2:
        return
    _, u = _encode(table[USER])
    k = len(_SCALES)
    counts = np.bincount(u[ok] * k + band[ok], minlength=(int(u.max()) + 1) * k).reshape(-1, k)
    mixed = (counts > 0).sum(axis=1) > 1
    if not mixed.any():
        return
    major = counts.argmax(axis=1)
    bad = ok & mixed[u] & (band != major[u])
    i = int(np.flatnonzero(bad)[0])
    other = int(ts[np.flatnonzero((u == u[i]) & (band == major[u[i]]))[0]])
    raise MixedScale(
        f"timestamps of user {table[USER][i].as_py()!r} mix scales: this one looks like "
        f"{_SCALES[band[i]]}, most of theirs like {_SCALES[major[u[i]]]} (e.g. {other}); "
        "their order would be wrong: convert the log to one unit", i, int(ts[i]))


def per_user(user_ids: pa.Array | pa.ChunkedArray, fn: Callable[[str], Any], dtype) -> np.ndarray:
    """``fn(user_id)`` for every row, evaluated once per distinct id."""
    enc = pc.dictionary_encode(user_ids)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    per_id = np.array([fn(uid) for uid in enc.dictionary.to_pylist()], dtype=dtype)
    return per_id[enc.indices.to_numpy()] if len(per_id) else np.zeros(0, dtype=dtype)


def in_user_sample(user_ids: pa.Array | pa.ChunkedArray, share: float) -> np.ndarray:
    """Bool per row: the user is in the ``share`` sample, ``crc32("sample:" + id) < share * 2^32``.
    The salt keeps the sample independent of the bucket hash (``crc32(id) % num_buckets``)."""
    limit = share * 2**32
    return per_user(user_ids, lambda uid: zlib.crc32(b"sample:" + uid.encode()) < limit, bool)


def _encode(col: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Distinct values (in first-appearance order) and each row's code into them."""
    enc = pc.dictionary_encode(col).combine_chunks() if len(col) else None
    if enc is None:
        return pa.array([], pa.string()), np.zeros(0, dtype=np.int64)
    return enc.dictionary, enc.indices.to_numpy().astype(np.int64)
