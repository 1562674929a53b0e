"""Which files a ``source.path`` names: a file, a folder (walked, hidden entries skipped), a glob,
or a list of them, on the local disk or behind an s3:// / gs:// URI; each file once, and every
rule that dropped a name reported (``notes``)."""

from __future__ import annotations

import os
import re
import sys

import pyarrow as pa
import pyarrow.fs as pafs

from ray_pinet import storage_uri
from ray_pinet.config_base import ConfigError
from ray_pinet.errors import DataError

_GLOB_CHARS = "*?["


def resolve_inputs(path: str | list[str],
                   notes: list[str] | None = None) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the sorted list of data files for a local path/dir/glob or a URI, or
    for a list of them (their union: how ``retrain`` names the date partitions it reads).

    Directories are listed recursively; names starting with ``.`` or ``_`` (``_SUCCESS``, ``.crc``)
    are skipped. URIs go through pyarrow (``file://``, ``s3://``, ``gs://``, ``hdfs://``) and fall back
    to fsspec for other schemes and for globs.

    Local symlinks are followed, to files and to folders (data often lives on another disk), but every real
    folder is listed once and every real file read once: a link back into a folder already listed (a loop) is
    not entered, and a file reached under a second name (a link and its target, a list naming a folder and a
    file in it) is read under the first name only. Each such path, and each broken link or non-regular file,
    goes into ``notes`` (printed to stderr when ``notes`` is None) rather than being dropped without a word.
    An empty ``source.path`` is a ConfigError (it would read the working directory).
    """
    found: list[str] = [] if notes is None else notes
    fs, files = _resolve(path, found)
    if notes is None:
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
        files = _local_glob(root, notes) if local else _expand_glob(fs, root)
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
        first = _first_name(d, dirs)
        if first != d:
            notes.append(f"{d}: not listed, the same folder as {first} (a symlink loop or a second link)")
            continue
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
    seen: dict[tuple[int, int], str] = {}
    for f in files:
        first = _first_name(f, seen)
        if first != f:
            notes.append(f"{f}: skipped, the same file as {first} (read once)")
    return list(seen.values())


def _first_name(path: str, seen: dict[tuple[int, int], str]) -> str:
    """The first name met of the real file or folder ``path`` names (``path`` itself if new)."""
    st = os.stat(path)
    return seen.setdefault((st.st_dev, st.st_ino), path)


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


def _expand_glob(fs: pafs.FileSystem, root: str) -> list[str]:
    ffs = fs.handler.fs  # PyFileSystem over fsspec (see _uri_filesystem)
    return [p for p in ffs.glob(root) if ffs.isfile(p)]


def display_name(fs: pafs.FileSystem, path: str) -> str:
    """How a file is named in reports and errors."""
    return path if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{path}"
