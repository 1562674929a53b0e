"""Columns as a reader found them -> the canonical, validated form (``sources`` module docstring):
ids as stripped strings without control characters, int64 timestamps (ISO-8601 and Parquet
timestamps to unix seconds), float64 ratings; the first bad value named by file, column, row."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_pinet.data.schema import BEHAVIOR, ITEM, TS, USER
from ray_pinet.errors import DataError

_CONTROL = "[\\x00-\\x1f\\x7f]"  # C0 controls and DEL


class Lines:
    """1-based line/row number of each row of a chunk: ``first + i``, or an explicit array."""

    def __init__(self, first: int, explicit: np.ndarray | None = None) -> None:
        self.first, self.explicit = first, explicit

    def __call__(self, i: int) -> int:
        return int(self.explicit[i]) if self.explicit is not None else self.first + int(i)


def to_canonical(
    raw: dict[str, pa.Array], lines: Lines, name: str, unit: str, schema: pa.Schema
) -> pa.Table:
    out = []
    for col in schema.names:
        arr = raw[col]
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        err = _Err(name, col, lines, arr)
        if arr.null_count:
            i = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
            raise err(f"missing value (null) in {col!r}", i)
        if col in (USER, ITEM, BEHAVIOR):
            out.append(_strings(arr, err))
        elif col == TS:
            out.append(_timestamps(arr, unit, err))
        else:
            out.append(_numbers(arr, err))
    return pa.Table.from_arrays(out, schema=schema)


class _Err:
    def __init__(self, name: str, col: str, lines: Lines, arr: pa.Array) -> None:
        self.name, self.col, self.lines, self.arr = name, col, lines, arr

    def __call__(self, reason: str, i: int) -> DataError:
        row, value = self.lines(i), self.arr[i].as_py()
        return DataError(reason, file=self.name, column=self.col, row=row, value=value)

    def wrong_type(self, expected: str) -> DataError:
        return self(f"column {self.col!r} has type {self.arr.type}, expected {expected}", 0)


def _strings(arr: pa.Array, err: _Err) -> pa.Array:
    if pa.types.is_integer(arr.type):
        return arr.cast(pa.string())
    if pa.types.is_large_string(arr.type) or pa.types.is_string_view(arr.type):
        arr = arr.cast(pa.string())
    if not pa.types.is_string(arr.type):
        raise err.wrong_type("string or integer")
    arr = pc.utf8_trim_whitespace(arr)
    empty = pc.equal(pc.utf8_length(arr), 0).to_numpy(zero_copy_only=False)
    if empty.any():
        raise err(f"empty {err.col!r}", int(np.flatnonzero(empty)[0]))
    # A NUL, newline or other control character inside an id is a broken export, and it would
    # break every line-based file written from it later (samples, reports, served id lists).
    if _has_control_bytes(arr):  # a scan of the bytes first: the regex costs 5x more per row
        ctrl = pc.match_substring_regex(arr, _CONTROL).to_numpy(zero_copy_only=False)
        if ctrl.any():
            raise err(f"control character (NUL, newline, tab, ...) inside {err.col!r}",
                      int(np.flatnonzero(ctrl)[0]))
    return arr


def _has_control_bytes(arr: pa.Array) -> bool:
    """Whether the bytes of a string array's values contain a C0 control or DEL (UTF-8 encodes
    them as themselves, never inside a multi-byte character)."""
    if isinstance(arr, pa.ChunkedArray):
        return any(_has_control_bytes(c) for c in arr.chunks)
    _, offsets, data = arr.buffers()
    if data is None or len(arr) == 0:
        return False
    off = np.frombuffer(offsets, dtype=np.int32)[arr.offset : arr.offset + len(arr) + 1]
    b = np.frombuffer(data, dtype=np.uint8)[off[0] : off[-1]]
    return bool(((b < 0x20) | (b == 0x7F)).any())


def _timestamps(arr: pa.Array, unit: str, err: _Err) -> pa.Array:
    t = arr.type
    if pa.types.is_integer(t):
        return _cast(arr, pa.int64(), err, "timestamp out of the int64 range")
    if pa.types.is_floating(t):
        x = arr.to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(x) | (np.floor(x) != x)
        if bad.any():
            raise err("timestamp is not a whole number", int(np.flatnonzero(bad)[0]))
        return _cast(arr, pa.int64(), err, "timestamp out of the int64 range")
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return arr.cast(pa.timestamp("s"), safe=False).cast(pa.int64())
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise err.wrong_type("integer, timestamp or string")
    text = pc.utf8_trim_whitespace(arr.cast(pa.string()))
    if unit == "iso":
        return _iso_seconds(text, err)
    ok = pc.match_substring_regex(text, r"^[+-]?[0-9]+(\.0*)?$").to_numpy(zero_copy_only=False)
    if not ok.all():
        raise err(f"unparsable timestamp (expected an integer in unit {unit!r})", int(np.flatnonzero(~ok)[0]))
    digits = pc.replace_substring_regex(text, r"\.0*$", "")
    return _cast(digits, pa.int64(), err, "timestamp out of the int64 range")


def _iso_seconds(text: pa.Array, err: _Err) -> pa.Array:
    import pandas as pd

    raw = pd.Series(text.to_pylist(), dtype=object)
    values = pd.to_datetime(raw, utc=True, format="ISO8601", errors="coerce")
    bad = values.isna().to_numpy()
    if bad.any():
        raise err("unparsable ISO-8601 timestamp", int(np.flatnonzero(bad)[0]))
    ns = values.dt.tz_convert(None).astype("datetime64[ns]").to_numpy().astype(np.int64)
    return pa.array(ns // 1_000_000_000)


def _numbers(arr: pa.Array, err: _Err) -> pa.Array:
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        return arr.cast(pa.float64())
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        raise err.wrong_type("a number")
    text = pc.utf8_trim_whitespace(arr.cast(pa.string()))
    return _cast(text, pa.float64(), err, f"{err.col!r} is not a number")


def _cast(arr: pa.Array, to: pa.DataType, err: _Err, reason: str) -> pa.Array:
    try:
        return arr.cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError):
        raise err(reason, first_failure(arr, lambda a: a.cast(to))) from None


def first_failure(arr: pa.Array, fn: Callable[[pa.Array], object]) -> int:
    """Index of the first element of ``arr`` that ``fn`` rejects (binary search over slices)."""
    lo, hi = 0, len(arr)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            fn(arr.slice(lo, mid - lo))
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError):
            hi = mid
    return lo
