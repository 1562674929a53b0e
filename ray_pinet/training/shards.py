"""Each training rank reads its own block of every prepared split, and nothing else.

Rank r of W holds the samples with ``sample_id`` in ``shard_range(N, r, W)``: a contiguous block.
A prepared split is written bucket by bucket in sample-id order (users are numbered bucket by
bucket, docs/design.md "Prepared data"), in row groups of 2^17 rows whose footers carry the
``sample_id`` min/max, so a rank reads the footers, then only the row groups that overlap its
block: ~1/W of the bytes, whatever W is (no partition count to divide). Because users are
numbered in hash order, a block is a random mix of users (and strata), and equal in samples.

Why not Ray Data here (docs/design.md "Training data feed"): its ``streaming_split`` hands rows to
ranks in whatever order blocks finish, which is not a function of (sample_id, W), and the
W-independent filter we ran on top of it read every file on every rank (W reads of the data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_pinet.data.prepared import sample_strata, with_user_strata
from ray_pinet.errors import DataError


def shard_range(num_rows: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi): rank's block of 0..num_rows-1; the blocks of ranks 0..W-1 tile it in order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return num_rows * rank // world, num_rows * (rank + 1) // world


def _row_groups(path: Path) -> list[tuple[int, int, int]]:
    """(row group, min sample_id, max sample_id) of every non-empty row group of one file."""
    f = pq.ParquetFile(path)
    md = f.metadata
    col = md.schema.to_arrow_schema().get_field_index("sample_id")
    if col < 0:
        raise DataError("no sample_id column (was it written by `ray-pinet prepare`?)", file=str(path),
                        column="sample_id")
    out = []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        if rg.num_rows == 0:
            continue
        stats = rg.column(col).statistics
        if stats is not None and stats.has_min_max:
            out.append((g, int(stats.min), int(stats.max)))
        else:  # a writer without statistics: read the id column of this row group
            ids = f.read_row_group(g, columns=["sample_id"]).column(0).to_numpy()
            out.append((g, int(ids.min()), int(ids.max())))
    return out


def split_rows(split_dir: Path) -> int:
    """Rows of a split, from the Parquet footers."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(split_dir.glob("part-*.parquet")))


def plan(files: list[Path], lo: int, hi: int) -> list[tuple[Path, list[int]]]:
    """(file, row groups) holding any sample_id in [lo, hi), from the footers alone."""
    out = []
    for f in files:
        wanted = [g for g, a, b in _row_groups(f) if a < hi and b >= lo]
        if wanted:
            out.append((f, wanted))
    return out


def read_shard(root: Path, split: str, rank: int, world: int) -> tuple[pa.Table, int]:
    """(this rank's rows of ``split``, the split's row count N). The rows are those with
    ``sample_id`` in ``shard_range(N, rank, world)``; their ``stratum`` is the folder's (from
    users.parquet for a restratified view). DataError, naming the split, when the ids are not
    0..N-1 (the block would silently lose or gain rows)."""
    split_dir = Path(root) / split
    files = sorted(split_dir.glob("part-*.parquet"))
    if not files:
        raise DataError("no part-*.parquet files: prepare the folder again", file=str(split_dir))
    total = split_rows(split_dir)
    lo, hi = shard_range(total, rank, world)
    parts: list[pa.Table] = []
    for f, wanted in plan(files, lo, hi):
        # one file's wanted row groups in memory at a time besides the kept rows (read threaded)
        t = pq.ParquetFile(f).read_row_groups(wanted)
        ids = t.column("sample_id").to_numpy()
        inside = (ids >= lo) & (ids < hi)
        parts.append(t if inside.all() else t.filter(pa.array(inside)))  # a filter copies the lists
    table = pa.concat_tables(parts) if parts else pq.read_schema(files[0]).empty_table()
    ids = table.column("sample_id").to_numpy()
    # every id of [lo, hi) exactly once (ids in file order are ascending: the cheap check first)
    distinct = len(ids) < 2 or bool((np.diff(ids) > 0).all()) or len(np.unique(ids)) == len(ids)
    if len(ids) != hi - lo or not distinct:
        got = np.sort(ids)
        k = int(np.flatnonzero(np.r_[got[: hi - lo] != np.arange(lo, lo + min(len(got), hi - lo)), True])[0])
        raise DataError(f"the split's {total} rows must carry sample_id 0..{total - 1} once each; "
                        f"rank {rank}/{world} reads ids {lo}..{hi - 1} and found {len(ids)} rows: id {lo + k} "
                        "is missing or repeated: prepare the folder again", file=str(split_dir),
                        column="sample_id", value=lo + k)
    strata = sample_strata(root)
    return (table if strata is None else with_user_strata(table, strata, str(split_dir))), total
