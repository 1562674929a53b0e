"""Outputs that appear whole or not at all.

Every command that writes a folder or file a user keeps (prepared data, partitions, reports, retrain
artifacts) writes it into a temporary sibling and swaps it in only when the command succeeded: a failed or
interrupted run leaves the previous output exactly as it was, and a reader never sees a half-written one.
Siblings (same parent folder) keep the final ``rename`` on one filesystem, where it is atomic for a file and a
two-rename swap for a folder. ``resumable_dir`` is the same swap for a long command whose work is worth
keeping when it stops (``prepare``).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ray_pinet.config_base import ConfigError

_TMP_PREFIX = "."  # hidden: listings of the parent (date partitions, report folders) skip it


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def replaced_dir(target: str | Path, keep: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``target``; when the block ends without an
    exception it replaces ``target``, else it is removed and ``target`` is left untouched.

    ``keep``: names inside an existing ``target`` that the writer does not produce but that
    belong to the folder (e.g. a marker written by another command); they are moved into the new
    folder when it has no entry of that name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}.new-", dir=target.parent))
    # mkdtemp makes it owner-only (0700); once swapped in it is the output, with the mode a
    # plain mkdir gives (prepared data on a shared mount is read by other users' workers)
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, target, keep)


def swap_in(new: Path, target: Path, keep: Iterable[str] = ()) -> None:
    """Put the finished folder ``new`` at ``target`` (a sibling), removing the previous one only after the new
    one is in place. Between the two renames a crash leaves the previous content under ``.<name>.old-*``
    beside ``target``, never deleted."""
    old: Optional[Path] = None
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise ConfigError(f"output {target} exists and is not a folder: refusing to replace it")
        for name in keep:
            if (target / name).exists() and not (new / name).exists():
                shutil.copytree(target / name, new / name) if (target / name).is_dir() \
                    else shutil.copy2(target / name, new / name)
        old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_STATE = f"{_TMP_PREFIX}state.json"  # inside a partial folder: what its work depends on


def partial_dir(target: str | Path) -> Path:
    """Where ``resumable_dir`` keeps the unfinished work for ``target``: ``.<name>.partial`` beside it."""
    target = Path(target)
    return target.parent / f"{_TMP_PREFIX}{target.name}.partial"


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary name beside ``target``; what the block wrote there is renamed over
    ``target`` (``os.replace``, atomic) when the block ends without an exception, else deleted.
    A process killed inside the block leaves only the hidden temporary file, never a half
    ``target``: readers that list files skip hidden names, and ``resumable_dir`` sweeps them."""
    target = Path(target)
    tmp = target.with_name(f"{_TMP_PREFIX}{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


@dataclass
class Partial:
    path: Path  # the folder to write into
    note: str | None  # what became of an earlier run's folder, to print; None when there was none


@contextmanager
def resumable_dir(target: str | Path, state: dict[str, Any],
                  discard_on: tuple[type[BaseException], ...] = ()) -> Iterator[Partial]:
    """``replaced_dir`` whose folder survives a run that stops, so the next run can reuse its work.

    The folder is ``partial_dir(target)``, held under an exclusive lock for the whole block (a second run for
    the same ``target`` waits for the first); every file in it is to be written through ``atomic_path``.
    ``state`` (JSON-able) is what the work in it depends on, e.g. config, input files and code: an earlier
    run's folder is kept only when its state is equal, else emptied (``Partial.note`` says so and why). When
    the block ends without an exception, stray temporary files are removed and the folder replaces ``target``
    (``swap_in``). On an exception of a ``discard_on`` type (bad input or settings: a rerun cannot reuse
    anything) it is removed; on any other exception (a crash, Ctrl-C, a worker lost beyond its retries) and
    when the process is killed it stays, and a rerun with an equal state resumes there.
    """
    target = Path(target)
    partial = partial_dir(target)
    state = json.loads(json.dumps(state))  # as it reads back from the file (tuples -> lists)
    fd = _lock_dir(partial, target)
    try:
        note = _reset_unless_same(partial, state)
        write_file(partial / _STATE, json.dumps(state, indent=1))
        try:
            yield Partial(partial, note)
        except discard_on:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except BaseException:
            print(f"{target}: the finished work of this run is kept in {partial}; the same command "
                  "with the same inputs resumes from it (delete it to start over)", file=sys.stderr, flush=True)
            raise
        (partial / _STATE).unlink()
        for stray in partial.rglob(f"{_TMP_PREFIX}*.tmp"):  # left by task attempts that were killed
            stray.unlink()
        swap_in(partial, target)
    finally:
        os.close(fd)


def _lock_dir(path: Path, target: Path) -> int:
    """An open descriptor of the folder ``path`` (created if missing), exclusively locked. The lock sits on
    the folder itself, which the holder renames to its target when it is done: a waiter then holds a lock on a
    folder no longer at ``path``, and starts over on a new one."""
    waited = False
    while True:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    print(f"{target}: another run is writing it ({path}); waiting for it to end",
                          file=sys.stderr, flush=True)
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            # A filesystem without locks (some network mounts): run unguarded rather than not at all.
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
        try:
            if os.path.samestat(os.stat(path), os.fstat(fd)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _reset_unless_same(partial: Path, state: dict[str, Any]) -> str | None:
    """Empty ``partial`` unless it holds work of an equal ``state``; a note on what was done."""
    entries = list(partial.iterdir())
    if not entries:
        return None
    try:
        old = json.loads((partial / _STATE).read_text())
    except (OSError, ValueError):
        old = None
    old = old if isinstance(old, dict) else None
    if old == state:
        return f"resuming the unfinished run in {partial}"
    if old is None:
        why = "it has no readable state file"
    else:
        why = ", ".join(k for k in sorted({*old, *state}) if old.get(k) != state.get(k)) + " changed"
    for entry in entries:  # the folder itself stays: it is what the lock is on
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    return f"discarded the unfinished run in {partial}: {why}"


def write_file(target: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to a temporary sibling, then ``os.replace`` it over ``target`` (atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have made
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def refuse_input_inside(output: str | Path, inputs: Iterable[str | Path], what: str = "output") -> None:
    """ConfigError when an input path is the output folder or lies inside it: replacing the output
    would delete the input (e.g. re-preparing from a prepared folder's own ``canonical/``)."""
    out = Path(output).expanduser().resolve()
    for p in inputs:
        if not p:
            continue
        q = Path(p).expanduser().resolve()
        if q == out or out in q.parents:
            raise ConfigError(f"input {p} lies inside the {what} {output}, which this command replaces: "
                              f"copy the input elsewhere or choose another {what}")


def refuse_foreign(output: str | Path, known: Iterable[str], what: str = "output") -> None:
    """ConfigError when an existing ``output`` folder holds entries outside ``known`` (the names
    the command writes): replacing the folder as a whole would delete them with it, e.g. a
    prepare pointed at ``.`` or at a folder of raw logs."""
    out = Path(output)
    if not out.is_dir():
        return
    foreign = sorted(e.name for e in out.iterdir() if e.name not in set(known))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"the {what} {output} holds entries this command did not write ({shown}); "
                          f"it replaces the whole folder: choose another {what}, or move them away")
