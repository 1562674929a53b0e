"""Single-process pandas reference of ``ray-pinet prepare``'s steps, for ``data_pipeline.py``.

    python benchmarks/pandas_prepare.py --input DIR --output DIR --result out.json [--max-len 50 --q 0.2]

Same input (the canonical Parquet parts of ``ray-pinet synth``) and the same definitions as
docs/design.md, written independently of ``ray_pinet.data`` so that equal outputs check both:

1. read every part in file order (row order = source order);
2. clean: exact duplicates of (user, item, timestamp) keep their first row; users with fewer than
   ``min_history`` remaining events are removed; each user's events are sorted by
   (timestamp, source order);
3. ``user_idx`` = rank of (crc32(user id) % 2^16, user id) (prepared format 2), ``item_idx`` = 1 +
   rank of the item id;
   activeness a = events - 2 (the last two are validation and test);
4. strata ``top_fraction``: head = the ceil(q * U) highest (activeness, user_idx);
5. leave-one-out rows and training windows of <= L + 1 items whose ends lie L apart, counted back
   from the last training event; sample ids in user_idx order.

Not done here (ray-pinet does them, so this side does strictly less work): the canonical copy of
the log, the out-of-order and per-filter accounting, sampled negatives (``train_negatives`` is 0 in
the benchmark, the evaluation negative and the ``seen`` lists are not built). A ``MemoryError``
is written to the result file as ``status: MemoryError`` (exit 3), not raised.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

USER, ITEM, TS = "user_id", "item_id", "timestamp"
HASH_SLOTS = 1 << 16  # docs/design.md: users numbered by (crc32(id) % HASH_SLOTS, id)


def _concat_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Indices start_i, ..., start_i + len_i - 1 for every i, concatenated."""
    first = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - first, lengths)


def _lists(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int32)))


def pandas_prepare(inp: Path, out: Path, max_len: int = 50, q: float = 0.2, min_history: int = 3) -> dict:
    """Run the steps, write ``out/{users,items}.parquet`` and ``out/{train,valid,test}/part-0.parquet``;
    returns ``{"counts": ..., "phases_s": ...}``."""
    phases: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        phases[name] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()

    files = sorted(Path(inp).glob("part-*.parquet"))
    log = pd.concat([pd.read_parquet(f, columns=[USER, ITEM, TS]) for f in files], ignore_index=True)
    rows_read = len(log)
    lap("read")

    log = log.drop_duplicates([USER, ITEM, TS], keep="first")  # the index still holds the source row
    events = log.groupby(USER, sort=False)[ITEM].transform("size").to_numpy()
    log = log[events >= min_history]
    log = log.rename_axis("source_row").reset_index()
    codes, uniq = pd.factorize(log[USER], sort=True)
    slots = np.fromiter((zlib.crc32(u.encode()) % HASH_SLOTS for u in uniq), np.int64, len(uniq))
    log["slot"] = slots[codes]
    log = log.sort_values(["slot", USER, TS, "source_row"], kind="stable", ignore_index=True)
    lap("clean")

    user_idx, user_ids = pd.factorize(log[USER], sort=False)  # order of appearance = user_idx order
    item_code, item_ids = pd.factorize(log[ITEM], sort=True)
    item = (item_code + 1).astype(np.int64)
    n_users = len(user_ids)
    n = np.bincount(user_idx, minlength=n_users)
    activeness = n - 2
    rank = np.empty(n_users, dtype=np.int64)
    rank[np.lexsort((np.arange(n_users), activeness))] = np.arange(n_users)
    stratum = (rank >= n_users - math.ceil(q * n_users)).astype(np.int8)
    lap("activeness_and_strata")

    first_row = np.cumsum(n) - n
    windows = np.where(activeness >= 2, (activeness - 2) // max_len + 1, 0)
    w_user = np.repeat(np.arange(n_users), windows)
    w_index = np.arange(len(w_user)) - np.repeat(np.cumsum(windows) - windows, windows)
    w_end = activeness[w_user] - 1 - (windows[w_user] - 1 - w_index) * max_len  # inclusive, in the sequence
    w_start = np.maximum(0, w_end - max_len)
    w_len = w_end - w_start + 1
    train = pa.table({
        "sample_id": pa.array((np.cumsum(windows) - windows)[w_user] + w_index, pa.int64()),
        "user_idx": pa.array(w_user, pa.int64()),
        "stratum": pa.array(stratum[w_user], pa.int8()),
        "seq": _lists(w_len, item[_concat_ranges(first_row[w_user] + w_start, w_len)]),
    })
    splits = {"train": train}
    for split, target_pos in (("valid", n - 2), ("test", n - 1)):
        h_start = np.maximum(0, target_pos - max_len)
        h_len = target_pos - h_start
        splits[split] = pa.table({
            "sample_id": pa.array(np.arange(n_users), pa.int64()),
            "user_idx": pa.array(np.arange(n_users), pa.int64()),
            "stratum": pa.array(stratum, pa.int8()),
            "history": _lists(h_len, item[_concat_ranges(first_row + h_start, h_len)]),
            "target": pa.array(item[first_row + target_pos], pa.int32()),
        })
    lap("samples")

    out = Path(out)
    for split, table in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / split / "part-0.parquet", row_group_size=1 << 17)
    users = pa.table({"user_idx": np.arange(n_users), USER: pa.array(np.asarray(user_ids, dtype=object)),
                      "activeness": activeness, "stratum": pa.array(stratum, pa.int8())})
    pq.write_table(users, out / "users.parquet")
    pq.write_table(pa.table({"item_idx": np.arange(1, len(item_ids) + 1, dtype=np.int32),
                             ITEM: pa.array(np.asarray(item_ids, dtype=object))}), out / "items.parquet")
    lap("write")

    counts = {
        "rows_read": int(rows_read),
        "rows": int(len(log)),
        "users": int(n_users),
        "items": int(len(item_ids)),
        "strata_users": np.bincount(stratum, minlength=2).tolist(),
        "strata_interactions": np.bincount(stratum, activeness, minlength=2).astype(np.int64).tolist(),
        "train_rows": int(windows.sum()),
        "train_targets": int((w_len - 1).sum()),
        "valid_rows": int(n_users),
        "test_rows": int(n_users),
    }
    return {"counts": counts, "phases_s": phases}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--result", type=Path, required=True, help="JSON: status, counts, phases_s, pipeline_s")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--q", type=float, default=0.2)
    p.add_argument("--min-history", type=int, default=3)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        res = pandas_prepare(args.input, args.output, args.max_len, args.q, args.min_history)
    except MemoryError:
        args.result.write_text(json.dumps({"status": "MemoryError"}))
        return 3
    res.update(status="ok", pipeline_s=round(time.perf_counter() - t0, 3))
    args.result.write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
