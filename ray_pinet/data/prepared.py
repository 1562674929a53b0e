"""Reading a prepared directory (docs/design.md contract): the small metadata the trainer needs,
and the split tables with their per-sample ``stratum`` as the folder defines it.

A *restratified view* (``data/restratify.py``, marked by ``restratified.json``) holds its own
``users.parquet`` / ``strata.json`` and links to the sample files of the prepared folder it was
made from; the ``stratum`` column of those files is the base stratification, so every reader
takes a sample's stratum from the view's ``users.parquet`` instead (``read_split``, and
``training/shards.py::read_shard`` for the training workers). A plain ``prepare`` output is read as written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_pinet.errors import DataError

SPLITS = ("train", "valid", "test")
# The prepared-data contract's version, ``report.json["prepared_format"]`` (docs/design.md).
# 2: user_idx numbers users bucket by bucket in (hash slot, id) order and the strata break ties by
# it. 1 (no field): user_idx in id order. A folder of another version is refused, never mixed in.
PREPARED_FORMAT = 2
VIEW_FILE = "restratified.json"  # marks a restratified view; names the base folder
# The users.parquet columns a view shares with its base (only ``stratum`` is its own).
VIEW_SHARED_USER_COLUMNS = ("user_idx", "user_id", "activeness")


@dataclass
class PreparedMeta:
    path: Path
    num_users: int
    num_items: int  # item_idx runs 1..num_items; 0 is padding
    num_strata: int
    strata: dict[str, Any]  # strata.json
    user_share: list[float]  # prior pi_s = |U_s| / |U|
    interaction_share: list[float]  # prior pi_s = training events of s / all training events
    max_len: int
    train_negatives: int
    eval_candidates: int
    config: dict[str, Any] = field(repr=False)  # prepare_config.json

    def split_files(self, split: str) -> list[str]:
        """The Parquet parts of ``train``, ``valid`` or ``test``, sorted."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return sorted(str(p) for p in (self.path / split).glob("part-*.parquet"))


def check_format(path: str | Path) -> None:
    """DataError unless ``path`` holds prepared data of this version of the contract
    (``PREPARED_FORMAT``), naming the file, the field and the version found."""
    report = Path(path) / "report.json"
    try:
        found = json.loads(report.read_text()).get("prepared_format", 1)
    except FileNotFoundError:
        raise DataError("not a prepared directory (run `ray-pinet prepare`)", file=str(report)) from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise DataError(f"unreadable ({exc!r}): prepare the folder again", file=str(report)) from None
    if found != PREPARED_FORMAT:
        raise DataError(
            f"prepared data of format {found}, this ray-pinet reads format {PREPARED_FORMAT} (format 2 "
            "numbers users bucket by bucket, format 1 by id; models and results of one do not carry "
            "over to the other): run `ray-pinet prepare` for this folder again",
            file=str(report), column="prepared_format", value=found)


def load_meta(path: str | Path) -> PreparedMeta:
    """Metadata of a prepared directory; DataError naming the file when a part is missing."""
    root = Path(path)
    for name in ("strata.json", "prepare_config.json", "users.parquet", "items.parquet", *SPLITS):
        if not (root / name).exists():
            raise DataError("not a prepared directory (run `ray-pinet prepare`)", file=str(root / name))
    check_format(root)
    strata = json.loads((root / "strata.json").read_text())
    config = json.loads((root / "prepare_config.json").read_text())
    samples = config["samples"]
    return PreparedMeta(
        path=root,
        num_users=pq.read_metadata(root / "users.parquet").num_rows,
        num_items=pq.read_metadata(root / "items.parquet").num_rows,
        num_strata=strata["num_strata"],
        strata=strata,
        user_share=strata["priors"]["user_share"],
        interaction_share=strata["priors"]["interaction_share"],
        max_len=samples["max_len"],
        train_negatives=samples["train_negatives"],
        eval_candidates=samples["eval_candidates"],
        config=config,
    )


def view_base(path: str | Path) -> Path | None:
    """The prepared folder (resolved) whose sample files the view ``path`` reads; None for a plain
    prepare output. The marker stores the base relative to the view (the pair can move together)."""
    root = Path(path)
    marker = root / VIEW_FILE
    if not marker.is_file():
        return None
    try:
        return (root / json.loads(marker.read_text())["base"]).resolve()
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"restratified view marker is unreadable ({exc!r}): make the view again",
                        file=str(marker)) from None


def _shared_config(config: dict) -> dict:
    """A prepare config without what a view may change (its strata) or where it was written."""
    return {k: v for k, v in config.items() if k not in ("strata", "output")}


def check_view(path: str | Path) -> Path:
    """The base of the view ``path``, checked to be the data the view was made from: same prepare
    settings apart from the strata, and the same users with the same activeness. Otherwise (the
    base was prepared again since) a DataError naming the first difference."""
    root = Path(path)
    base = view_base(root)
    if base is None:
        raise DataError("not a restratified view", file=str(root / VIEW_FILE))
    for name in ("prepare_config.json", "users.parquet"):
        if not (base / name).is_file():
            raise DataError("the base data of this restratified view is gone: make the view again "
                            "(tuning does it by itself)", file=str(base / name))
    mine = _shared_config(json.loads((root / "prepare_config.json").read_text()))
    theirs = _shared_config(json.loads((base / "prepare_config.json").read_text()))
    if mine != theirs:
        key = next(k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k))
        raise DataError("the base data was prepared again with other settings since this restratified "
                        "view was made: make the view again", file=str(base / "prepare_config.json"),
                        column=key, value=theirs.get(key))
    cols = list(VIEW_SHARED_USER_COLUMNS)
    a = pq.read_table(root / "users.parquet", columns=cols)
    b = pq.read_table(base / "users.parquet", columns=cols)
    if not a.equals(b):
        column, row, value = _first_difference(a, b)
        raise DataError("the base data holds other users than this restratified view (prepared "
                        "again since?): make the view again", file=str(base / "users.parquet"),
                        column=column, row=row, value=value)
    return base


def _first_difference(a: pa.Table, b: pa.Table) -> tuple[str, int, object]:
    """(column, row, value in ``b``) of the first cell where two same-schema tables differ."""
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        for i, (u, v) in enumerate(zip(x, y)):
            if u != v:
                return name, i, v
        if len(x) != len(y):
            i = min(len(x), len(y))
            return name, i, y[i] if i < len(y) else None
    return a.column_names[0], 0, None


def sample_strata(path: str | Path) -> np.ndarray | None:
    """Stratum of each user (int8, index = user_idx) that replaces the samples' own ``stratum``
    column, or None when the samples carry the folder's stratification (a plain prepare output).
    A view is checked against its base first (``check_view``)."""
    root = Path(path)
    if view_base(root) is None:
        return None
    check_view(root)
    users = pq.read_table(root / "users.parquet", columns=["user_idx", "stratum"])
    return by_user_idx(users, "stratum", root / "users.parquet").astype(np.int8)


def by_user_idx(users: pa.Table, column: str, where: str | Path) -> np.ndarray:
    """``column`` of a users table as an array indexed by user_idx. DataError unless the rows run
    user_idx 0..U-1 in order, as prepare writes them: a lookup by position, and the strata's
    tie-break by array position, need that order."""
    idx = users.column("user_idx").to_numpy()
    off = np.flatnonzero(idx != np.arange(len(idx)))
    if len(off):
        raise DataError("user_idx must run 0..U-1 in file order", file=str(where), column="user_idx",
                        row=int(off[0]), value=int(idx[off[0]]))
    return users.column(column).to_numpy()


def with_user_strata(table: pa.Table, strata: np.ndarray, where: str) -> pa.Table:
    """``table`` (samples with ``user_idx`` and ``stratum``) with ``stratum = strata[user_idx]``.
    Row-wise, so it gives the same rows whichever block, file or worker a sample is read by.
    ``where`` names the split in the error for a user the table of strata lacks (row = sample_id:
    inside a Ray Data block the file row is not known)."""
    idx = table.column("user_idx").to_numpy()
    bad = np.flatnonzero((idx < 0) | (idx >= len(strata)))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"sample of a user the view's users.parquet ({len(strata)} users) does not "
                        "have (row = sample_id)", file=where, column="user_idx",
                        row=int(table.column("sample_id")[i].as_py()), value=int(idx[i]))
    pos = table.schema.get_field_index("stratum")
    return table.set_column(pos, "stratum", pa.array(strata[idx], pa.int8()))


def read_split(path: str | Path, split: str) -> pa.Table:
    """One split of a prepared folder as one table, its ``stratum`` column the folder's (taken
    from users.parquet for a restratified view)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(path)
    table = pq.read_table(root / split)
    strata = sample_strata(root)
    return table if strata is None else with_user_strata(table, strata, str(root / split))
