"""Seeded long-tail interaction logs for tests, smoke runs and scaling benchmarks.

User activeness follows a Zipf law (``min_len - 1 + Zipf(zipf_user)``, capped at ``max_len``) and item
popularity a Zipf law over a finite catalogue (P(rank k) ~ k^-zipf_item; item id = popularity
rank). Each user's timestamps increase from a random start with exponential gaps (a few equal
timestamps occur, as in real logs). Rows are grouped by user, in time order.

The log is generated in chunks of ``rows_per_file`` rows (the last one smaller), each made of whole
users except that a chunk's last user is cut to fill the chunk exactly, and each written as one part
file. Chunk ``c`` uses ``numpy.random.default_rng([seed, 7, c])`` only, so the output is the same
sequentially or in parallel Ray tasks and memory is bounded by one chunk: 10^8+ rows work.
User ids are ``c * rows_per_file + j`` (unique across chunks). The row count is exact.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ray_pinet.config_base import ConfigError
from ray_pinet.data.ray_tasks import run_tasks

_PURPOSE = 7
_T0 = 1_500_000_000


def generate(
    out_dir: str | Path,
    num_rows: int,
    num_items: int = 100_000,
    zipf_user: float = 2.0,
    zipf_item: float = 1.0,
    seed: int = 0,
    rows_per_file: int = 1_000_000,
    *,
    min_len: int = 5,
    max_len: int = 5000,
    fmt: Literal["parquet", "csv"] = "parquet",
    parallel: bool = False,
    progress: bool = False,
) -> dict:
    """Write ``num_rows`` rows as ``out_dir/part-NNNNN.{parquet,csv}``; returns a small summary.

    Parquet parts use the canonical schema (``user_id``, ``item_id`` strings, ``timestamp`` int64)
    and are read by ``source.format: parquet``; CSV parts have a header with the same names and are
    read by ``source.format: csv``. ``parallel=True`` writes the parts in Ray tasks.
    """
    if num_rows < 1 or num_items < 1 or rows_per_file < 1:
        raise ConfigError("num_rows, num_items and rows_per_file must be >= 1")
    if zipf_user <= 1.0:
        raise ConfigError(f"zipf_user must be > 1 (numpy Zipf), got {zipf_user}")
    if zipf_item < 0 or not 1 <= min_len <= max_len:
        raise ConfigError("need zipf_item >= 0 and 1 <= min_len <= max_len")
    if fmt not in ("parquet", "csv"):
        raise ConfigError(f"fmt must be parquet or csv, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_chunks = math.ceil(num_rows / rows_per_file)
    args = [
        (str(out), c, min(rows_per_file, num_rows - c * rows_per_file), rows_per_file, num_items,
         zipf_user, zipf_item, seed, min_len, max_len, fmt)
        for c in range(n_chunks)
    ]
    if parallel:
        users = run_tasks(_write_chunk, args, "synth", progress)
    else:
        from tqdm import tqdm

        users = [_write_chunk(*a) for a in tqdm(args, desc="synth", disable=not progress, leave=False)]
    return {
        "output": str(out),
        "files": [f"part-{c:05d}.{fmt}" for c in range(n_chunks)],
        "rows": num_rows,
        "users": int(sum(users)),
        "num_items": num_items,
    }


def chunk_table(chunk: int, rows: int, rows_per_file: int, num_items: int, zipf_user: float,
                zipf_item: float, seed: int, min_len: int, max_len: int) -> pa.Table:
    """Chunk ``chunk`` of the log (``rows`` rows), as a canonical Arrow table."""
    rng = np.random.default_rng([seed, _PURPOSE, chunk])
    lengths = _lengths(rng, rows, zipf_user, min_len, max_len)
    n_users = len(lengths)
    user = np.repeat(np.arange(n_users), lengths)
    ids = pa.array(chunk * rows_per_file + np.arange(n_users, dtype=np.int64)).cast(pa.string())
    items = np.searchsorted(_item_cdf(num_items, zipf_item), rng.random(rows), side="right")
    items = np.minimum(items, num_items - 1) + 1
    gaps = rng.exponential(3600.0, rows).astype(np.int64)
    first = np.cumsum(lengths) - lengths
    gaps[first] = rng.integers(0, 365 * 86400, n_users)  # each user's start
    ts = np.cumsum(gaps)
    ts = ts - np.repeat(ts[first] - gaps[first], lengths) + _T0
    return pa.table({"user_id": ids.take(pa.array(user)), "item_id": pa.array(items).cast(pa.string()),
                     "timestamp": pa.array(ts, pa.int64())})


def _write_chunk(out: str, chunk: int, rows: int, rows_per_file: int, num_items: int, zipf_user: float,
                 zipf_item: float, seed: int, min_len: int, max_len: int, fmt: str) -> int:
    table = chunk_table(chunk, rows, rows_per_file, num_items, zipf_user, zipf_item, seed, min_len, max_len)
    path = Path(out) / f"part-{chunk:05d}.{fmt}"
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        pacsv.write_csv(table, path)
    return pc.count_distinct(table["user_id"]).as_py()


def _lengths(rng: np.random.Generator, rows: int, a: float, min_len: int, max_len: int) -> np.ndarray:
    """Whole users until ``rows`` is reached; the last one is cut so the sum is exactly ``rows``."""
    parts, total = [], 0
    while total < rows:
        batch = np.minimum(min_len - 1 + rng.zipf(a, size=max(16, (rows - total) // min_len + 1)), max_len)
        parts.append(batch)
        total += int(batch.sum())
    lengths = np.concatenate(parts)
    n = int(np.searchsorted(np.cumsum(lengths), rows)) + 1
    lengths = lengths[:n].copy()
    lengths[-1] -= int(lengths.sum()) - rows
    return lengths


@lru_cache(maxsize=4)
def _item_cdf(num_items: int, s: float) -> np.ndarray:
    w = np.arange(1, num_items + 1, dtype=np.float64) ** -s
    cdf = np.cumsum(w)
    return cdf / cdf[-1]
