"""Raw interaction logs -> canonical, validated Arrow tables, one adapter per ``source.format``.

Adapters (``SourceConfig.format``):

==================  =================================================================================
``movielens_100k``  ``ml-100k/u.data``: tab-separated, no header, ``user item rating timestamp``
``movielens_csv``   ``ml-latest-small/ratings.csv``: header ``userId,movieId,rating,timestamp``
``amazon_seq``      ``amazon-iclrec/Beauty.txt``: one line per user, ``user item_1 ... item_n``. The file
                    holds the order only, so ``timestamp`` = the item's position 0..n-1 in its line.
``amazon2018_csv``  ``Magazine_Subscriptions.csv``: no header, item FIRST: ``item,user,rating,timestamp``
``taobao_csv``      ``UserBehavior.csv``: no header, ``user,item,category,behavior,timestamp``
                    (``source.behaviors`` filters them later, in cleaning, where removals are counted)
``csv``             generic, ``source.columns`` maps canonical names to the file's column names (or, with
                    ``has_header: false``, to 0-based column indices such as ``"2"``)
``parquet``         generic, ``source.columns`` maps canonical names to the file's column names
==================  =================================================================================

Generic readers map ``user_id``/``item_id``/``timestamp`` to the same names unless told otherwise and read
``rating``/``behavior`` only when ``source.columns`` names them. The fixed adapters' timestamps are unix
seconds; the generic readers keep integer timestamps unchanged (``source.timestamp_unit`` says what they are)
and turn ISO-8601 strings (``timestamp_unit: iso``) and Parquet timestamp columns into unix seconds.

Canonical form: ids are strings with surrounding whitespace removed (integer ids become their decimal
text); ``timestamp`` int64; ``rating`` float64; ``behavior`` string. Nothing may be null or empty,
and no id may hold a control character (C0 or DEL: a NUL, a newline).
Every problem raises :class:`~ray_pinet.errors.DataError` naming the file, the column, the 1-based
row (the physical line number in text files, counting the header; the row number in Parquet files)
and the value. Blank lines are not skipped: they are reported, so line numbers stay exact.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_pinet.config_base import ConfigError
from ray_pinet.data.canonical import Lines, first_failure, to_canonical
from ray_pinet.data.config import SourceConfig
from ray_pinet.data.inputs import display_name, resolve_inputs
from ray_pinet.data.schema import BEHAVIOR, ITEM, OPTIONAL, RATING, REQUIRED, TS, USER, canonical_schema
from ray_pinet.errors import DataError

CHUNK_ROWS = 1 << 20  # rows per yielded table (bounds the memory of one reader)
_CSV_BLOCK = 8 << 20

# Headerless fixed layouts: file columns in order (canonical names; others are read and dropped).
_FIXED = {
    "movielens_100k": ("\t", [USER, ITEM, RATING, TS]),
    "amazon2018_csv": (",", [ITEM, USER, RATING, TS]),
    "taobao_csv": (",", [USER, ITEM, "category_id", BEHAVIOR, TS]),
}
_MOVIELENS_CSV = {USER: "userId", ITEM: "movieId", RATING: "rating", TS: "timestamp"}


@dataclass
class FileStats:
    """What one file contributed: rows read (and, with a behavior column, rows per behaviour)."""

    file: str
    rows_read: int = 0
    behaviors: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        out = {"file": self.file, "rows_read": self.rows_read}
        if self.behaviors:
            out["behaviors_read"] = dict(sorted(self.behaviors.items()))
        return out


def output_columns(src: SourceConfig) -> list[str]:
    """Canonical columns this source produces (in canonical order)."""
    if src.format in _FIXED:
        cols = [c for c in _FIXED[src.format][1] if c in (*REQUIRED, *OPTIONAL)]
    elif src.format == "movielens_csv":
        cols = list(_MOVIELENS_CSV)
    elif src.format == "amazon_seq":
        cols = list(REQUIRED)
    else:
        cols = [*REQUIRED, *(c for c in OPTIONAL if c in src.columns)]
    return canonical_schema(cols).names


def read_file(fs: pafs.FileSystem, path: str, src: SourceConfig, stats: FileStats) -> Iterator[pa.Table]:
    """Canonical tables of ``path`` in source order, ``CHUNK_ROWS`` rows or fewer each (no filtering);
    ``stats`` is filled in as the file is read."""
    name = display_name(fs, path)
    schema = canonical_schema(output_columns(src))
    if src.format == "amazon_seq":
        raw_chunks = _seq_chunks(fs, path, name)
    elif src.format == "parquet":
        raw_chunks = _parquet_chunks(fs, path, name, _generic_mapping(src))
    else:
        raw_chunks = _csv_chunks(fs, path, name, src)
    unit = src.timestamp_unit if src.format in ("csv", "parquet") else "s"
    for raw, lines in raw_chunks:
        table = to_canonical(raw, lines, name, unit, schema)
        stats.rows_read += table.num_rows
        if BEHAVIOR in schema.names:
            counts = pc.value_counts(table[BEHAVIOR])
            stats.behaviors.update(dict(zip(counts.field(0).to_pylist(), counts.field(1).to_pylist())))
        yield table


def read_log(src: SourceConfig, file_rows: list[int] | None = None) -> tuple[pa.Table, list[str]]:
    """A whole (small) source as one canonical table, and its files: for tools that need the log
    in memory (``ray-pinet partition``); ``prepare`` streams it instead. ``file_rows`` (optional)
    gets the number of rows of each file, in order, so a row of the table can be traced back to
    its file and line (``first_row``)."""
    fs, files = resolve_inputs(src.path)
    tables = []
    for f in files:
        stats = FileStats(display_name(fs, f))
        tables.extend(read_file(fs, f, src, stats))
        if file_rows is not None:
            file_rows.append(stats.rows_read)
    if not tables:
        raise DataError("input is empty: no data rows", file=files[0] if len(files) == 1 else str(src.path))
    return pa.concat_tables(tables), files


def first_row(src: SourceConfig) -> int:
    """The 1-based line (row, in Parquet) of a file's first data row: 2 below a header, else 1.
    Data rows are consecutive lines from there (blank lines are errors, never skipped); not for
    ``amazon_seq``, whose rows are items of a line."""
    header = src.format == "movielens_csv" or (src.format == "csv" and src.has_header)
    return 2 if header else 1


def _generic_mapping(src: SourceConfig) -> dict[str, str]:
    mapping = {c: src.columns.get(c, c) for c in REQUIRED}
    mapping.update({c: src.columns[c] for c in OPTIONAL if c in src.columns})
    unknown = sorted(set(src.columns) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        valid = [*REQUIRED, *OPTIONAL]
        raise ConfigError(f"source.columns: unknown canonical column(s) {unknown}; valid: {valid}")
    return mapping


def _csv_chunks(fs, path, name, src: SourceConfig) -> Iterator[tuple[dict[str, pa.Array], Lines]]:
    if src.format in _FIXED:
        delimiter, names = _FIXED[src.format]
        header, mapping = False, {c: c for c in names if c in (*REQUIRED, *OPTIONAL)}
    elif src.format == "movielens_csv":
        delimiter, names, header, mapping = ",", None, True, dict(_MOVIELENS_CSV)
    else:
        delimiter, names, header = src.delimiter, None, src.has_header
        mapping = _generic_mapping(src)
        if not header:
            bad = {k: v for k, v in mapping.items() if not str(v).isdigit()}
            if bad:
                raise ConfigError(
                    f"source.columns: without a header, map columns to 0-based indices, got {bad}"
                )
            mapping = {k: f"f{int(v)}" for k, v in mapping.items()}

    read_opts = dict(block_size=_CSV_BLOCK, use_threads=False)
    if names is not None:
        read_opts["column_names"] = names
    elif not header:
        read_opts["autogenerate_column_names"] = True
    invalid: list = []
    canonical = {col: canon for canon, col in mapping.items()}  # file column -> canonical name

    def on_invalid(row):  # keeps the parser's physical line number for the error
        invalid.append(row)
        return "error"

    parse = pacsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=False, invalid_row_handler=on_invalid)

    def open_reader(convert: pacsv.ConvertOptions | None):
        stream = fs.open_input_stream(path, compression="detect")
        try:
            return pacsv.open_csv(stream, pacsv.ReadOptions(**read_opts), parse, convert)
        except OSError as exc:  # truncated or corrupt compressed stream, I/O error
            stream.close()
            raise _unreadable(exc, name, 1) from None
        except pa.ArrowInvalid as exc:
            stream.close()
            if "Empty CSV file" in str(exc):
                return None
            cols = names or (_header_names(fs, path, delimiter) if header else [])
            raise _csv_error(exc, invalid, name, cols, 1, canonical) from None

    probe = open_reader(None)  # header (or first row) only: which columns exist
    if probe is None:
        return
    file_cols = probe.schema.names
    probe.close()
    for canon, col in mapping.items():
        if col not in file_cols:
            where = f"column {col!r}" if header else f"column index {col[1:]}"
            raise DataError(
                f"missing {where} for {canon!r} (the file has {len(file_cols)} columns: {file_cols})",
                file=name, column=canon, row=1, value=delimiter.join(file_cols) if header else None,
            )
    convert = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in file_cols},
        include_columns=list(dict.fromkeys(mapping.values())),
    )
    reader = open_reader(convert)
    if reader is None:
        return
    line = 2 if header else 1
    with reader:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                raise _csv_error(exc, invalid, name, names or file_cols, line, canonical) from None
            except OSError as exc:
                raise _unreadable(exc, name, line) from None
            if batch.num_rows:
                yield {canon: batch.column(col) for canon, col in mapping.items()}, Lines(line)
                line += batch.num_rows


def _unreadable(exc: OSError, name: str, line: int) -> DataError:
    """A file that stops being readable part-way (a truncated ``.gz``, an I/O error): the rows
    before ``line`` were read, the rest cannot be."""
    return DataError(f"cannot read the file at or after this line (truncated or corrupt?): {exc}",
                     file=name, row=line)


def _header_names(fs, path: str, delimiter: str) -> list[str]:
    """Column names of a CSV header line (for errors raised before the reader knows them)."""
    try:
        with fs.open_input_stream(path, compression="detect") as f:
            first = f.read(1 << 16).split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
    except OSError:
        return []
    return [c.strip() for c in first.split(delimiter)]


def _csv_error(exc: Exception, invalid: list, name: str, names: list[str], line: int,
               canonical: dict[str, str]) -> DataError:
    if invalid:
        bad = invalid[0]
        missing = names[bad.actual_columns] if bad.actual_columns < len(names) else None
        missing = canonical.get(missing, missing)
        reason = f"expected {bad.expected_columns} columns, got {bad.actual_columns}"
        if missing:
            reason += f" (no {missing!r})"
        return DataError(reason, file=name, column=missing, row=bad.number, value=bad.text)
    return DataError(f"cannot parse CSV: {exc}", file=name, row=line, value=None)


def _seq_chunks(fs, path, name, block: int = _CSV_BLOCK) -> Iterator[tuple[dict[str, pa.Array], Lines]]:
    line = 1
    rest = b""
    with fs.open_input_stream(path, compression="detect") as f:
        while True:
            try:
                buf = f.read(block)
            except OSError as exc:
                raise _unreadable(exc, name, line) from None
            data = rest + buf
            if buf:
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                    continue
                data, rest = data[:cut], data[cut + 1 :]
            elif not data:
                return
            lines = data.split(b"\n")
            yield _explode_seq(lines, line, name)
            line += len(lines)
            if not buf:
                return


def _explode_seq(lines: list[bytes], first: int, name: str) -> tuple[dict[str, pa.Array], Lines]:
    binary = pa.array(lines, pa.binary())
    try:
        text = binary.cast(pa.string())
    except pa.ArrowInvalid:
        i = first_failure(binary, lambda a: a.cast(pa.string()))
        raise DataError(
            "line is not valid UTF-8", file=name, column=USER, row=first + i, value=lines[i]
        ) from None
    text = pc.utf8_trim_whitespace(text)
    empty = np.flatnonzero(pc.equal(pc.utf8_length(text), 0).to_numpy(zero_copy_only=False))
    if len(empty):
        raise DataError("empty line", file=name, column=USER, row=first + int(empty[0]), value="")
    parts = pc.split_pattern_regex(text, r"\s+")
    n_items = pc.list_value_length(parts).to_numpy() - 1
    lonely = np.flatnonzero(n_items < 1)
    if len(lonely):
        i = int(lonely[0])
        raise DataError(
            "line has a user id but no items", file=name, column=ITEM, row=first + i, value=text[i].as_py()
        )
    parent = np.repeat(np.arange(len(lines)), n_items)
    starts = np.cumsum(n_items) - n_items
    position = np.arange(len(parent), dtype=np.int64) - starts[parent]
    raw = {
        USER: pc.list_element(parts, 0).take(pa.array(parent)),
        ITEM: pc.list_flatten(pc.list_slice(parts, 1)),
        TS: pa.array(position),
    }
    return raw, Lines(first, first + parent)


def _parquet_chunks(fs, path, name, mapping: dict[str, str]) -> Iterator[tuple[dict[str, pa.Array], Lines]]:
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
        file_cols = pf.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"not a readable Parquet file: {exc}", file=name) from None
    for canon, col in mapping.items():
        if col not in file_cols:
            raise DataError(
                f"missing column {col!r} for {canon!r}", file=name, column=canon, row=None, value=file_cols
            )
    row = 1
    batches = pf.iter_batches(batch_size=CHUNK_ROWS, columns=list(dict.fromkeys(mapping.values())))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"corrupt Parquet data at or after this row: {exc}", file=name, row=row) from None
        if batch.num_rows:
            yield {canon: batch.column(col) for canon, col in mapping.items()}, Lines(row)
            row += batch.num_rows
