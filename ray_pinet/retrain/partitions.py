"""Date-partitioned behaviour logs: ``<root>/date=YYYY-MM-DD/*.parquet``, one folder per day (or
per any period, labelled by its last day), holding canonical rows (user_id, item_id, timestamp
[, rating] [, behavior]) as ``ray-pinet partition`` writes them, or as an ETL job lands them.

``retrain`` reads every partition up to a date; which of them are new is decided against the
``data.through`` tag of the registered version it starts from.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ray_pinet.config_base import ConfigError
from ray_pinet.errors import DataError
from ray_pinet.outputs import replaced_dir

_NAME = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")


@dataclass(frozen=True)
class Partition:
    date: str  # YYYY-MM-DD: the last day the partition covers
    path: str  # the partition folder


def parse_date(text: str, what: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise DataError(f"{what}: {text!r} is not a date (YYYY-MM-DD)", value=text) from None


def discover(root: str | Path) -> list[Partition]:
    """Every ``date=YYYY-MM-DD`` folder under ``root``, oldest first. Anything else in ``root``
    (except hidden ``.``/``_`` names) is an error, not silently skipped; so is an empty partition."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("log root is not a directory", file=str(root))
    parts = []
    for entry in sorted(os.listdir(root)):
        if entry.startswith((".", "_")):
            continue
        m = _NAME.match(entry)
        if not m or not (root / entry).is_dir():
            raise DataError("not a date partition (expected a folder named date=YYYY-MM-DD)",
                            file=str(root / entry))
        parse_date(m.group(1), str(root / entry))
        if not any(f.is_file() and not f.name.startswith((".", "_")) for f in (root / entry).rglob("*")):
            raise DataError("empty date partition: no data files", file=str(root / entry))
        parts.append(Partition(m.group(1), str(root / entry)))
    if not parts:
        raise DataError("no date=YYYY-MM-DD partitions found", file=str(root))
    return parts


def select(parts: list[Partition], through: Optional[str] = None) -> list[Partition]:
    """The partitions up to and including ``through`` (all when None)."""
    if through is None:
        return list(parts)
    parse_date(through, "--through")
    chosen = [p for p in parts if p.date <= through]
    if not chosen:
        raise DataError(f"no partition on or before {through} (oldest is {parts[0].date})",
                        file=str(Path(parts[0].path).parent))
    return chosen


def write_partitions(table: pa.Table, out_root: str | Path, cuts: list[str],
                     overwrite: bool = False) -> list[tuple[Partition, int]]:
    """Split a canonical log by time at the ``cuts`` (dates, ascending) and write one partition per
    period: rows before the first cut are labelled with the day before it, rows in [cut_i,
    cut_{i+1}) with the day before cut_{i+1}, rows from the last cut on with the day of the latest
    event. Returns (partition, rows) per period; every row lands in exactly one partition.

    ``out_root`` must be absent or empty unless ``overwrite``: partitions already there would be
    read by retrain beside the new ones (stale days, rows counted twice). Either way the root is
    written into a temporary sibling and swapped in whole, so it holds exactly these partitions,
    and a failed run leaves the previous root as it was. Timestamps are unix seconds."""
    out_root = Path(out_root)
    if out_root.exists() and not overwrite and (not out_root.is_dir() or any(out_root.iterdir())):
        raise ConfigError(f"--output {out_root} is not empty: partitioning into it would mix these "
                          "partitions with the ones there; choose a new root, or pass --overwrite to "
                          "replace it as a whole")
    days = [parse_date(c, "--cut") for c in cuts]
    if days != sorted(set(days)):
        raise DataError(f"--cut dates must be distinct and ascending, got {cuts}", value=cuts)
    ts = table.column("timestamp").to_numpy()
    check_seconds(table)
    bounds = np.array([_epoch(d) for d in days], dtype=np.int64)
    period = np.searchsorted(bounds, ts, side="right")  # 0 = before the first cut
    last_day = _day(int(ts.max())) if len(ts) else days[-1]
    labels = [d - dt.timedelta(days=1) for d in days] + [max(last_day, days[-1])]
    written = []
    with replaced_dir(out_root) as tmp:
        for i, label in enumerate(labels):
            rows = table.filter(pa.array(period == i))
            if rows.num_rows == 0:
                raise DataError(f"period {i} (ending {label}) has no rows: choose cuts inside the log's "
                                f"time range", value=cuts)
            name = f"date={label.isoformat()}"
            (tmp / name).mkdir()
            pq.write_table(rows, tmp / name / "part-0.parquet")
            written.append((Partition(label.isoformat(), str(out_root / name)), rows.num_rows))
        if sum(n for _, n in written) != table.num_rows:
            raise RuntimeError("internal error: partitions do not add up to the input rows")
    return written


# Unix seconds a calendar date can hold: 0001-01-01 .. 9999-12-31 (UTC)
_MIN_S = -62135596800
_MAX_S = 253402300799


def check_seconds(table: pa.Table, files: Optional[list[str]] = None, file_rows: Optional[list[int]] = None,
                  first_row: int = 1) -> None:
    """DataError for the first timestamp that is no date in years 1..9999 as unix seconds (typically
    milliseconds read as seconds). With the table's ``files`` and their row counts (``read_log``), the error
    names the file and line; ``first_row`` = the line of a file's first data row."""
    if table.num_rows == 0:
        return
    ts = table.column("timestamp")
    lo, hi = (v.as_py() for v in pc.min_max(ts).values())
    if _MIN_S <= lo and hi <= _MAX_S:
        return
    values = ts.to_numpy()
    i = int(np.flatnonzero((values < _MIN_S) | (values > _MAX_S))[0])
    file, row = None, i + 1
    if files and file_rows:
        k = int(np.searchsorted(np.cumsum(file_rows), i, side="right"))
        file, row = files[k], first_row + i - (int(np.sum(file_rows[:k])))
    hint = " (milliseconds? the log must hold unix seconds)" if values[i] > _MAX_S else ""
    raise DataError(f"timestamp is not a date in years 1..9999 as unix seconds{hint}", file=file,
                    column="timestamp", row=row, value=int(values[i]))


def _day(seconds: int) -> dt.date:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).date()


def canonical_columns(part: Partition) -> list[str]:
    files = sorted(f for f in Path(part.path).rglob("*") if f.is_file() and not f.name.startswith((".", "_")))
    return pq.read_schema(files[0]).names


def _epoch(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())


def date_range(table: pa.Table) -> tuple[str, str]:
    """First and last event day (UTC) of a canonical table."""
    check_seconds(table)
    lo, hi = pc.min_max(table.column("timestamp")).values()
    return _day(int(lo.as_py())).isoformat(), _day(int(hi.as_py())).isoformat()
