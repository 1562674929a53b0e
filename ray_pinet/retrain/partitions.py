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

from ray_pinet.errors import DataError

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


def write_partitions(table: pa.Table, out_root: str | Path, cuts: list[str]) -> list[tuple[Partition, int]]:
    """Split a canonical log by time at the ``cuts`` (dates, ascending) and write one partition per
    period: rows before the first cut are labelled with the day before it, rows in [cut_i,
    cut_{i+1}) with the day before cut_{i+1}, rows from the last cut on with the day of the latest
    event. Returns (partition, rows) per period; every row lands in exactly one partition."""
    days = [parse_date(c, "--cut") for c in cuts]
    if days != sorted(set(days)):
        raise DataError(f"--cut dates must be distinct and ascending, got {cuts}", value=cuts)
    ts = table.column("timestamp").to_numpy()
    bounds = np.array([_epoch(d) for d in days], dtype=np.int64)
    period = np.searchsorted(bounds, ts, side="right")  # 0 = before the first cut
    last_day = dt.datetime.fromtimestamp(int(ts.max()), dt.timezone.utc).date() if len(ts) else days[-1]
    labels = [d - dt.timedelta(days=1) for d in days] + [max(last_day, days[-1])]
    out_root = Path(out_root)
    written = []
    for i, label in enumerate(labels):
        rows = table.filter(pa.array(period == i))
        if rows.num_rows == 0:
            raise DataError(f"period {i} (ending {label}) has no rows: choose cuts inside the log's "
                            f"time range", value=cuts)
        part = Partition(label.isoformat(), str(out_root / f"date={label.isoformat()}"))
        Path(part.path).mkdir(parents=True, exist_ok=True)
        pq.write_table(rows, Path(part.path) / "part-0.parquet")
        written.append((part, rows.num_rows))
    if sum(n for _, n in written) != table.num_rows:
        raise RuntimeError("internal error: partitions do not add up to the input rows")
    return written


def canonical_columns(part: Partition) -> list[str]:
    """The column names of a partition's first data file."""
    files = sorted(f for f in Path(part.path).rglob("*") if f.is_file() and not f.name.startswith((".", "_")))
    return pq.read_schema(files[0]).names


def _epoch(day: dt.date) -> int:
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc).timestamp())


def date_range(table: pa.Table) -> tuple[str, str]:
    """First and last event day (UTC) of a canonical table."""
    lo, hi = pc.min_max(table.column("timestamp")).values()
    f = lambda v: dt.datetime.fromtimestamp(int(v.as_py()), dt.timezone.utc).date().isoformat()  # noqa: E731
    return f(lo), f(hi)
