"""(user, item) positives for two-tower training: raw log -> dense ids -> seeded random row split
-> activeness strata -> Parquet (``ray-pinet twotower`` prepares it when missing).

Layout of ``output`` (read by ``training/twotower_loop.py``):
  train.parquet, valid.parquet, test.parquet   sample_id (dense 0..n-1 in file order), user, item, stratum
                   (+ label, with data.label_threshold)
  users.parquet    user_id (raw), user, activeness (training rows), stratum
  items.parquet    item_id (raw), item, popularity (rows on the full data: hot/cold), train_count
  meta.json        sizes, strata statistics, hot items;  report.json  what every filter removed
  prepare_config.json  the resolved data section

The split is the published protocol of OneBP and AUC-NS (a random 80/20 split of the rows), made
reproducible: each row's place is a keyed uniform of (split_seed, its dense (user, item) pair),
so it depends neither on the file order nor on the machine. The log is read into memory on the
driver: sized for the public benchmarks (10^5-10^7 rows), not for the billion-row sequence path.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_pinet.config_base import to_dict
from ray_pinet.data.sources import read_log
from ray_pinet.data.strata import assign_strata, format_strata_table, strata_stats
from ray_pinet.keyed_random import stream_key, uniform_matrix
from ray_pinet.outputs import refuse_foreign, refuse_input_inside, replaced_dir

PURPOSE_SPLIT = 41
SPLITS = ("train", "valid", "test")
PAIR_OUTPUTS = (*(f"{s}.parquet" for s in SPLITS), "users.parquet", "items.parquet", "meta.json",
                "report.json", "prepare_config.json")


def keyed_split(keys: np.ndarray, test_share: float, valid_share: float, seed: int) -> np.ndarray:
    """Int8[n]: 0 train, 1 valid, 2 test. The rows with the smallest keyed uniforms of
    (seed, key) are test (round(test_share·n) of them), the next round(valid_share·rest) valid."""
    u = uniform_matrix(stream_key(seed, PURPOSE_SPLIT, 0), np.asarray(keys, dtype=np.int64), 1)[:, 0]
    order = np.argsort(u, kind="stable")
    n_test = int(round(test_share * len(order)))
    n_valid = int(round(valid_share * (len(order) - n_test)))
    part = np.zeros(len(order), dtype=np.int8)
    part[order[:n_test]] = 2
    part[order[n_test:n_test + n_valid]] = 1
    return part


def _dense(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique raw ids, dense index of each row); numeric ids sort as numbers."""
    values = ids.astype(str)
    if len(values) and np.char.isdecimal(values).all():
        try:
            numbers = values.astype(np.int64)
        except OverflowError:  # an id above int64 (issue 18): Python ints, on this path only
            uniq, inv = np.unique(np.array([int(v) for v in values], dtype=object), return_inverse=True)
            return np.array([str(v) for v in uniq]), inv
        uniq, inv = np.unique(numbers, return_inverse=True)
        return uniq.astype(str), inv
    return np.unique(values, return_inverse=True)


def prepare_pairs(cfg, progress: bool = True) -> Path:
    """Write the pair splits of ``cfg`` (a ``PairDataSection``) to ``cfg.output``; its path."""
    out = Path(cfg.output)
    table, files = read_log(cfg.source)
    refuse_input_inside(out, [f for f in files if os.path.isabs(f)])  # local files (not bucket/key)
    refuse_foreign(out, PAIR_OUTPUTS)
    report: dict = {"files": files, "rows_read": table.num_rows, "removed": {}}
    for key in ("min_rating", "label_threshold"):
        if getattr(cfg, key) is not None and "rating" not in table.column_names:
            raise ValueError(f"data.{key}={getattr(cfg, key)} but {files} have no rating column")
    keep = np.ones(table.num_rows, dtype=bool)
    if cfg.min_rating is not None:
        low = table.column("rating").to_numpy(zero_copy_only=False) < cfg.min_rating
        report["removed"][f"rating < {cfg.min_rating}"] = int(low.sum())
        keep &= ~low
    labels = None
    if cfg.label_threshold is not None:
        labels = (table.column("rating").to_numpy(zero_copy_only=False) > cfg.label_threshold).astype(np.int8)
    users_raw = table.column("user_id").to_numpy(zero_copy_only=False)[keep]
    items_raw = table.column("item_id").to_numpy(zero_copy_only=False)[keep]
    user_ids, users = _dense(users_raw)
    if cfg.max_users is not None:
        small = users < cfg.max_users
        report["removed"][f"rows of users beyond the first {cfg.max_users} (data.max_users)"] = int((~small).sum())
        user_ids, users, items_raw = user_ids[: cfg.max_users], users[small], items_raw[small]
        labels = None if labels is None else labels[small]
    item_ids, items = _dense(items_raw)
    num_users, num_items = len(user_ids), len(item_ids)
    pair = users.astype(np.int64) * num_items + items
    _, first = np.unique(pair, return_index=True)
    dup = np.ones(len(pair), dtype=bool)
    dup[first] = False
    report["removed"]["repeated (user, item) pairs (a positive counts once)"] = int(dup.sum())
    users, items, pair = users[~dup], items[~dup], pair[~dup]
    labels = None if labels is None else labels[~dup]
    part = keyed_split(pair, cfg.test_share, cfg.valid_share, cfg.split_seed)

    activeness = np.bincount(users[part == 0], minlength=num_users)
    stratum = assign_strata(activeness, cfg.strata)
    stats = strata_stats(activeness, stratum, cfg.strata)
    # Written into a temporary sibling and swapped in whole: a failed run leaves the previous
    # folder as it was, and ensure_pairs (which trusts meta.json) never meets a half-written one.
    with replaced_dir(out) as tmp:
        rows = {}
        for code, name in enumerate(SPLITS):
            sel = part == code
            rows[name] = int(sel.sum())
            cols = {"sample_id": np.arange(rows[name], dtype=np.int64), "user": users[sel].astype(np.int64),
                    "item": items[sel].astype(np.int64), "stratum": stratum[users[sel]].astype(np.int8)}
            if labels is not None:
                cols["label"] = labels[sel]
            pq.write_table(pa.table(cols), tmp / f"{name}.parquet")
        pq.write_table(pa.table({"user_id": user_ids, "user": np.arange(num_users, dtype=np.int64),
                                 "activeness": activeness.astype(np.int64), "stratum": stratum.astype(np.int8)}),
                       tmp / "users.parquet")
        popularity = np.bincount(items, minlength=num_items)
        pq.write_table(pa.table({"item_id": item_ids, "item": np.arange(num_items, dtype=np.int64),
                                 "popularity": popularity.astype(np.int64),
                                 "train_count": np.bincount(items[part == 0], minlength=num_items).astype(np.int64)}),
                       tmp / "items.parquet")
        meta = {"num_users": num_users, "num_items": num_items, "rows": rows, "num_strata": cfg.strata.num_strata,
                "strata": stats, "hot_share": cfg.hot_share, "labeled": labels is not None}
        if labels is not None:
            meta["positive_share"] = {name: float(labels[part == code].mean()) if rows[name] else math.nan
                                      for code, name in enumerate(SPLITS)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "prepare_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    if progress:
        removed = ", ".join(f"{v:,} {k}" for k, v in report["removed"].items()) or "nothing"
        print(f"pairs: {report['rows_read']:,} rows read from {', '.join(files)}; removed {removed}")
        print(f"pairs: {num_users:,} users, {num_items:,} items; rows " +
              " / ".join(f"{k} {v:,}" for k, v in rows.items()) + f" -> {out}")
        print(format_strata_table(stats))
    return out


def load_meta(path: str | Path) -> dict:
    p = Path(path) / "meta.json"
    if not p.exists():
        raise FileNotFoundError(f"no pair data at {path} (no meta.json): run `ray-pinet twotower` with "
                                "data.source set, which prepares it")
    return json.loads(p.read_text())
