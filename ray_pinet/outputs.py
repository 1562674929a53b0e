"""Outputs that appear whole or not at all.

Every command that writes a folder or file a user keeps (prepared data, partitions, reports,
retrain artifacts) writes it into a temporary sibling and swaps it in only when the command
succeeded: a failed or interrupted run leaves the previous output exactly as it was, and a reader
never sees a half-written one. Siblings (same parent folder) keep the final ``rename`` on one
filesystem, where it is atomic for a file and a two-rename swap for a folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

from ray_pinet.config_base import ConfigError

_TMP_PREFIX = "."  # hidden: listings of the parent (date partitions, report folders) skip it


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_sibling(target: Path, kind: str) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{target.name}.{kind}-", dir=target.parent))
    # mkdtemp makes it owner-only (0700); once swapped in it is the output, with the mode a
    # plain mkdir gives (prepared data on a shared mount is read by other users' workers)
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextmanager
def replaced_dir(target: str | Path, keep: Iterable[str] = ()) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``target``; when the block ends without an
    exception it replaces ``target``, else it is removed and ``target`` is left untouched.

    ``keep``: names inside an existing ``target`` that the writer does not produce but that
    belong to the folder (e.g. a marker written by another command); they are moved into the new
    folder when it has no entry of that name.
    """
    target = Path(target)
    tmp = _tmp_sibling(target, "new")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_in(tmp, target, keep)


def swap_in(new: Path, target: Path, keep: Iterable[str] = ()) -> None:
    """Put the finished folder ``new`` at ``target`` (a sibling), removing the previous one only
    after the new one is in place. Between the two renames a crash leaves the previous content
    under ``.<name>.old-*`` beside ``target``, never deleted."""
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
