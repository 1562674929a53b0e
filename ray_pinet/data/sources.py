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

Generic readers map ``user_id``/``item_id``/``timestamp`` to the same names unless told otherwise and
read ``rating``/``behavior`` only when ``source.columns`` names them. The fixed adapters' timestamps are
unix seconds; the generic readers keep integer timestamps unchanged (``source.timestamp_unit`` says
what they are) and turn ISO-8601 strings (``timestamp_unit: iso``) and Parquet timestamp columns into
unix seconds.

Canonical form: ids are strings with surrounding whitespace removed (integer ids become their decimal
text); ``timestamp`` int64; ``rating`` float64; ``behavior`` string. Nothing may be null or empty,
and no id may hold a control character (C0 or DEL: a NUL, a newline).
Every problem raises :class:`~ray_pinet.errors.DataError` naming the file, the column, the 1-based
row (the physical line number in text files, counting the header; the row number in Parquet files)
and the value. Blank lines are not skipped: they are reported, so line numbers stay exact.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_pinet.config_base import ConfigError
from ray_pinet.data.config import SourceConfig
from ray_pinet.data.schema import BEHAVIOR, ITEM, OPTIONAL, RATING, REQUIRED, TS, USER, canonical_schema
from ray_pinet.errors import DataError

CHUNK_ROWS = 1 << 20  # rows per yielded table (bounds the memory of one reader)
_CSV_BLOCK = 8 << 20
_GLOB_CHARS = "*?["
_CONTROL = "[\\x00-\\x1f\\x7f]"  # C0 controls and DEL

# Headerless fixed layouts: file columns in order (canonical names; others are read and dropped).
_FIXED = {
    "movielens_100k": ("\t", [USER, ITEM, RATING, TS]),
    "amazon2018_csv": (",", [ITEM, USER, RATING, TS]),
    "taobao_csv": (",", [USER, ITEM, "category_id", BEHAVIOR, TS]),
}
_MOVIELENS_CSV = {USER: "userId", ITEM: "movieId", RATING: "rating", TS: "timestamp"}


# ----------------------------------------------------------------------------------------------
# Input files
# ----------------------------------------------------------------------------------------------


def resolve_inputs(path: str | list[str],
                   notes: list[str] | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the sorted list of data files for a local path/dir/glob or a URI, or
    for a list of them (their union: how ``retrain`` names the date partitions it reads).

    Directories are listed recursively; names starting with ``.`` or ``_`` (``_SUCCESS``, ``.crc``)
    are skipped. URIs go through pyarrow (``file://``, ``s3://``, ``gs://``, ``hdfs://``) and fall back
    to fsspec for other schemes and for globs.

    Local symlinks are followed, to files and to folders (data often lives on another disk), but
    every real folder is listed once and every real file read once: a link back into a folder
    already listed (a loop) is not entered, and a file reached under a second name (a link and its
    target, a list naming a folder and a file in it) is read under the first name only. Each such
    path, and each broken link or non-regular file, goes into ``notes`` (printed to stderr when
    ``notes`` is None) rather than being dropped without a word. An empty ``source.path`` is a
    ConfigError (it would read the working directory).
    """
    found: list[str] = []
    fs, files = _resolve(path, found)
    if notes is not None:
        notes.extend(found)
    else:
        for n in found:
            print(f"ray-pinet: input: {n}", file=sys.stderr, flush=True)
    return fs, files


def _resolve(path: str | list[str], notes: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    if isinstance(path, (list, tuple)):
        if not path:
            raise DataError("input is empty: source.path is an empty list")
        resolved = [_resolve(p, notes) for p in path]
        kinds = {type(fs).__name__ + getattr(fs, "type_name", "") for fs, _ in resolved}
        if len(kinds) > 1:
            raise DataError(f"source.path mixes filesystems ({sorted(kinds)}): list paths of one kind")
        fs, files = resolved[0][0], sorted({f for _, files in resolved for f in files})
        if isinstance(fs, pafs.LocalFileSystem):
            files = _once(files, notes)
        return fs, files
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"source.path is empty ({path!r}): name a file, folder, glob or URI "
                          "(an empty path would read the working directory)", key="source.path")
    if "://" in path:
        fs, root = _uri_filesystem(path)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    local = isinstance(fs, pafs.LocalFileSystem)
    if any(c in root for c in _GLOB_CHARS):
        files = _local_glob(root, notes) if local else _expand_glob(fs, path, root)
    else:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise DataError("input path does not exist", file=path)
        if info.type == pafs.FileType.Directory and local:
            files = _walk(root, notes)
        elif info.type == pafs.FileType.Directory:  # object stores: no links, no loops
            listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            files = [i.path for i in listing if i.type == pafs.FileType.File and not _hidden(i.path, root)]
        else:
            files = [root]
    if not files:
        raise DataError("input is empty: no data files found", file=path)
    return fs, sorted(files)


def _walk(root: str, notes: list[str], hidden: tuple[str, ...] = (".", "_"), depth: int = -1) -> list[str]:
    """Regular files under ``root`` (links followed), each real folder listed and each real file
    kept once; what is passed over is noted. Folders in sorted order, so which of two names of
    one file is kept does not depend on the listing order. ``depth`` >= 0: no deeper folders."""
    files: list[str] = []
    dirs: dict[tuple[int, int], str] = {}
    seen: dict[tuple[int, int], str] = {}
    stack = [(root, 0)]
    while stack:
        d, level = stack.pop()
        st = os.stat(d)
        key = (st.st_dev, st.st_ino)
        if key in dirs:
            notes.append(f"{d}: not listed, the same folder as {dirs[key]} (a symlink loop or a second link)")
            continue
        dirs[key] = d
        with os.scandir(d) as it:
            entries = sorted((e for e in it if not e.name.startswith(hidden)), key=lambda e: e.name)
        subdirs = []
        for e in entries:
            try:
                if e.is_dir():
                    if depth < 0 or level < depth:
                        subdirs.append((e.path, level + 1))
                    continue
                if not e.is_file():
                    notes.append(f"{e.path}: skipped, " + ("a broken symlink" if e.is_symlink() else
                                                             "not a regular file"))
                    continue
                fst = os.stat(e.path)
            except OSError as exc:  # e.g. a link loop on a file name (ELOOP)
                notes.append(f"{e.path}: skipped, {exc.strerror or exc}")
                continue
            fkey = (fst.st_dev, fst.st_ino)
            if fkey in seen:
                first = seen[fkey]
                if os.path.islink(first) and not e.is_symlink():  # the file's own name wins over a link's
                    files[files.index(first)] = seen[fkey] = e.path
                    first, e_path = e.path, first
                else:
                    e_path = e.path
                notes.append(f"{e_path}: skipped, the same file as {first} (read once)")
                continue
            seen[fkey] = e.path
            files.append(e.path)
        stack.extend(reversed(subdirs))  # depth-first in name order
    return files


def _once(files: list[str], notes: list[str]) -> list[str]:
    """``files`` (sorted) without second names of one real file, each noted."""
    out, seen = [], {}
    for f in files:
        st = os.stat(f)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            notes.append(f"{f}: skipped, the same file as {seen[key]} (read once)")
            continue
        seen[key] = f
        out.append(f)
    return out


def _local_glob(pattern: str, notes: list[str]) -> list[str]:
    """The files matching a local glob (``*``, ``?``, ``[...]`` within a name, ``**`` for any
    folders), found by ``_walk`` from the pattern's fixed prefix: Python's ``glob`` follows a
    symlink loop 40 levels deep (a file listed 41 times), and two loops multiply."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    base = "/".join(parts[:fixed]) or "/"
    if not os.path.isdir(base):
        return []
    regex = re.compile(re.escape(base.rstrip("/")) + "/" + _glob_regex(parts[fixed:]))
    # glob's own rule: wildcards do not match names starting with "." (``_x`` names do match)
    depth = -1 if "**" in parts[fixed:] else len(parts) - fixed - 1
    return [f for f in _walk(base, notes, hidden=(".",), depth=depth) if regex.fullmatch(f)]


def _glob_regex(parts: list[str]) -> str:
    out = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        j, rx = 0, ""
        while j < len(part):
            c = part[j]
            if c == "*":
                rx += "[^/]*"
            elif c == "?":
                rx += "[^/]"
            elif c == "[":
                k = j + 1 + (part[j + 1:j + 2] == "!")
                k += part[k:k + 1] == "]"  # a "]" first in the class is literal
                end = part.find("]", k)
                if end < 0:
                    rx += re.escape(c)
                else:
                    body = part[j + 1:end].replace("\\", "\\\\")
                    if body.startswith("!"):
                        body = "^" + body[1:]
                    elif body.startswith("^"):  # literal in a glob, negation in a regex
                        body = "\\" + body
                    rx += "[" + body + "]"
                    j = end
            else:
                rx += re.escape(c)
            j += 1
        out.append(rx + ("" if last else "/"))
    return "".join(out)


def _hidden(p: str, root: str) -> bool:
    rel = os.path.relpath(p, root) if p.startswith(root) else os.path.basename(p)
    return any(part.startswith((".", "_")) for part in rel.replace("\\", "/").split("/"))


def _uri_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    from ray_pinet import storage_uri

    if storage_uri.scheme(uri) in ("s3", "s3a", "file") and not any(c in uri for c in _GLOB_CHARS):
        # s3: endpoint and credentials from the environment, written into the filesystem that the
        # ingest tasks receive (storage_uri.filesystem_for)
        return storage_uri.filesystem_for(uri)
    if not any(c in uri for c in _GLOB_CHARS):
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            pass
    import fsspec  # only for schemes pyarrow does not know, and for globs

    ffs, root = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(ffs)), root


def _expand_glob(fs: pafs.FileSystem, path: str, root: str) -> list[str]:
    ffs = fs.handler.fs  # PyFileSystem over fsspec (see _uri_filesystem)
    return [p for p in ffs.glob(root) if ffs.isfile(p)]


def display_name(fs: pafs.FileSystem, path: str) -> str:
    """How a file is named in reports and errors."""
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"


# ----------------------------------------------------------------------------------------------
# Reading one file
# ----------------------------------------------------------------------------------------------


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
    """Canonical tables of ``path`` in source order, ``CHUNK_ROWS`` rows or fewer each (no filtering).

    ``stats`` is filled in as the file is read. Raises DataError on any bad input.
    """
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
        table = _to_canonical(raw, lines, name, unit, schema)
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


class _Lines:
    """1-based line/row number of each row of a chunk: ``first + i``, or an explicit array."""

    def __init__(self, first: int, explicit: np.ndarray | None = None) -> None:
        self.first, self.explicit = first, explicit

    def __call__(self, i: int) -> int:
        return int(self.explicit[i]) if self.explicit is not None else self.first + int(i)


# --- CSV --------------------------------------------------------------------------------------


def _csv_chunks(fs, path, name, src: SourceConfig) -> Iterator[tuple[dict[str, pa.Array], _Lines]]:
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
                yield {canon: batch.column(col) for canon, col in mapping.items()}, _Lines(line)
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


def _csv_error(
    exc: Exception,
    invalid: list,
    name: str,
    names: list[str],
    line: int,
    canonical: dict[str, str] | None = None,
) -> DataError:
    if invalid:
        bad = invalid[0]
        missing = names[bad.actual_columns] if bad.actual_columns < len(names) else None
        missing = (canonical or {}).get(missing, missing)
        reason = f"expected {bad.expected_columns} columns, got {bad.actual_columns}"
        if missing:
            reason += f" (no {missing!r})"
        return DataError(reason, file=name, column=missing, row=bad.number, value=bad.text)
    return DataError(f"cannot parse CSV: {exc}", file=name, row=line, value=None)


# --- amazon_seq -------------------------------------------------------------------------------


def _seq_chunks(fs, path, name, block: int = _CSV_BLOCK) -> Iterator[tuple[dict[str, pa.Array], _Lines]]:
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


def _explode_seq(lines: list[bytes], first: int, name: str) -> tuple[dict[str, pa.Array], _Lines]:
    try:
        text = pa.array(lines, pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:
        i = next(i for i, b in enumerate(lines) if not _is_utf8(b))
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
    return raw, _Lines(first, first + parent)


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- Parquet ----------------------------------------------------------------------------------


def _parquet_chunks(fs, path, name, mapping: dict[str, str]) -> Iterator[tuple[dict[str, pa.Array], _Lines]]:
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
            yield {canon: batch.column(col) for canon, col in mapping.items()}, _Lines(row)
            row += batch.num_rows


# ----------------------------------------------------------------------------------------------
# Validation and conversion to the canonical types
# ----------------------------------------------------------------------------------------------


def _to_canonical(
    raw: dict[str, pa.Array], lines: _Lines, name: str, unit: str, schema: pa.Schema
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
    def __init__(self, name: str, col: str, lines: _Lines, arr: pa.Array) -> None:
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
        raise err(reason, _first_failure(arr, lambda a: a.cast(to))) from None


def _first_failure(arr: pa.Array, fn: Callable[[pa.Array], object]) -> int:
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
