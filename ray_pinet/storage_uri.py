"""Local paths and object-store URIs (``s3://``, ``gs://``, ``file://``) for ``source.path``, ``output``
(prepare), ``data.path`` and ``run.storage_path`` (docs/design.md "Object storage").

A URI is never turned into a ``Path`` (``Path("s3://b/x").resolve()`` is ``<cwd>/s3:/b/x``): ``local_or_uri``
expands and resolves real local paths only, maps ``file://`` URIs to local paths and returns other URIs
unchanged. Filesystems are pyarrow's (``filesystem_for``); an ``s3://`` filesystem is built from the standard
AWS_* environment variables (``_s3_from_env``: endpoint for an S3-compatible server, keys, session token,
region) with the values written into it, so the filesystem object that Ray ships to its tasks and Train
workers (pickled) works there without those variables.

* ``source.path``: listed and read through the filesystem (``data/sources.py``).
* ``output``: ``data.pipeline.prepare_output`` prepares into a local staging folder
  (``<scratch>/staging/<key>``, so a stopped run resumes there) and uploads the finished folder,
  prepare_config.json last: a folder whose upload stopped lacks it, and ``train`` refuses it as partial.
* ``data.path``: ``local_copy`` syncs the prepared folder to ``<scratch>/cache/<key>`` on the driver and
  training reads that copy.
* ``run.storage_path``: Ray Train's ``RunConfig(storage_path, storage_filesystem)``; the driver's resume check
  reads the run's snapshot and latest checkpoint through the filesystem (``mirror_run``).

``<scratch>`` is ``$RAY_PINET_SCRATCH``, by default ``<tempdir>/ray-pinet-<uid>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from ray_pinet.config_base import ConfigError

SCRATCH_ENV = "RAY_PINET_SCRATCH"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_FS_SCHEME = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}  # pyarrow type_name -> URI scheme
_MANIFEST = ".ray-pinet-manifest.json"


def scheme(path: object) -> str | None:
    """The URI scheme of ``path`` in lower case (``s3``, ``gs``, ``file``), None for a plain path."""
    m = _SCHEME.match(str(path))
    return m.group(1).lower() if m else None


def is_remote(path: object) -> bool:
    """A URI of a filesystem other than the local one (``file://`` is local)."""
    return scheme(path) not in (None, "file")


def file_uri_path(uri: str) -> str:
    """``file:///tmp/x`` -> ``/tmp/x`` (percent-escapes decoded; host empty or localhost)."""
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ConfigError(f"{uri!r}: a file:// URI names a path on this machine (file:///abs/path), "
                          f"not on host {parsed.netloc!r}")
    return unquote(parsed.path) or "/"


def local_path(path: str) -> str:
    return file_uri_path(path) if scheme(path) == "file" else path


def local_or_uri(path: str) -> str:
    """A remote URI unchanged (less a trailing ``/``); a local path or ``file://`` URI expanded
    and resolved to an absolute local path."""
    path = str(path)
    if is_remote(path):
        return path if path.endswith("://") else path.rstrip("/")
    return str(Path(local_path(path)).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def same_place(a: str, b: str) -> bool:
    return local_or_uri(a) == local_or_uri(b)


def _s3_from_env() -> pafs.S3FileSystem:
    env = os.environ
    kwargs: dict = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = env["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ("us-east-1" if endpoint else None)
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a URI or local path; schemes other than ``s3://`` through
    ``pyarrow.fs.FileSystem.from_uri``, then fsspec."""
    uri = str(uri)
    kind = scheme(uri)
    if kind is None or kind == "file":
        return pafs.LocalFileSystem(), local_or_uri(uri)
    if kind in ("s3", "s3a"):
        parsed = urlparse(uri)
        return _s3_from_env(), (parsed.netloc + parsed.path).rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        import fsspec

        ffs, root = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(ffs)), root


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{_FS_SCHEME.get(fs.type_name, fs.type_name)}://{path.lstrip('/')}"


def _info(uri: str, key: str) -> pafs.FileInfo:
    """``get_file_info`` of a URI; a missing bucket or an unreachable store: a ConfigError naming ``key``."""
    fs, path = filesystem_for(uri)
    bucket = path.split("/", 1)[0]
    try:
        if not isinstance(fs, pafs.LocalFileSystem) and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ConfigError(f"{key}={uri!r}: bucket {bucket!r} does not exist (or the credentials in "
                              "the environment cannot see it)", key=key)
        return fs.get_file_info(path)
    except OSError as exc:
        raise ConfigError(f"{key}={uri!r}: cannot reach it ({' '.join(str(exc).split())})", key=key) from None


def check_reachable(uri: str, key: str) -> None:
    """ConfigError (one line, naming ``key`` and ``uri``) unless the URI's bucket exists."""
    _info(uri, key)


def exists(uri: str, key: str = "path") -> bool:
    return _info(uri, key).type != pafs.FileType.NotFound


def has_files(uri: str, key: str = "path") -> bool:
    """Whether the folder ``uri`` holds at least one object."""
    if _info(uri, key).type != pafs.FileType.Directory:
        return False
    fs, path = filesystem_for(uri)
    return any(i.type == pafs.FileType.File for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)))


def _listing(fs: pafs.FileSystem, path: str) -> list[list]:
    """[relative path, size, mtime_ns] of every file under ``path``, sorted."""
    out = []
    for i in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
        if i.type == pafs.FileType.File:
            out.append([i.path[len(path.rstrip("/")) + 1:], i.size, i.mtime_ns])
    return sorted(out)


def scratch_dir(kind: str, uri: str) -> Path:
    """``<scratch>/<kind>/<readable key>-<hash>``: one folder per URI, stable across runs."""
    root = Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / f"ray-pinet-{os.getuid()}")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.split("://", 1)[-1]).strip("_")[-60:]
    return root.expanduser() / kind / f"{readable}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def download_file(uri: str, target: Path) -> Path:
    fs, path = filesystem_for(uri)
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def local_copy(uri: str, key: str = "data.path") -> Path:
    """A local copy of the remote folder ``uri``, downloaded again only when the remote listing (names, sizes,
    modification times) differs from the copy's. Swapped in whole: a download that stops leaves the previous
    copy."""
    uri = local_or_uri(uri)
    fs, path = filesystem_for(uri)
    listing = _listing(fs, path)
    if not listing:
        raise ConfigError(f"{key}={uri!r}: nothing there", key=key)
    cache = scratch_dir("cache", uri)
    manifest = cache.with_name(cache.name + _MANIFEST)
    if cache.is_dir() and manifest.is_file() and json.loads(manifest.read_text()) == listing:
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    new = cache.with_name(f".{cache.name}.new-{uuid.uuid4().hex[:8]}")
    try:
        pafs.copy_files(path, str(new), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        _swap(new, cache)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    manifest.write_text(json.dumps(listing))
    return cache


def _swap(new: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def staging_for(uri: str, allowed: tuple[str, ...], sources: list[str]) -> Path:
    """The local folder a ``prepare`` into the remote folder ``uri`` writes first (then ``publish_staged``):
    refused when ``uri`` is a file, holds entries other than ``allowed`` or contains one of ``sources``."""
    fs, root = filesystem_for(uri)
    if _info(uri, "output").type == pafs.FileType.File:
        raise ConfigError(f"output={uri!r} is a file, not a folder", key="output")
    foreign = sorted({rel.split("/", 1)[0] for rel, _, _ in _listing(fs, root)} - set(allowed))
    if foreign:  # as refuse_foreign: replacing the folder would delete them
        raise ConfigError(f"output={uri!r} holds entries prepare does not write ({', '.join(foreign[:5])}): "
                          "choose an empty or new folder", key="output")
    for s in sources:
        if is_remote(s) and (local_or_uri(s) == uri or local_or_uri(s).startswith(uri + "/")):
            raise ConfigError(f"input {s} lies inside the output {uri}, which prepare replaces: "
                              "copy the input elsewhere or choose another output", key="output")
    stage = scratch_dir("staging", uri)
    stage.parent.mkdir(parents=True, exist_ok=True)
    return stage


def publish_staged(stage: Path, uri: str) -> Path:
    """Upload a prepared ``stage`` folder to ``uri`` (its prepare_config.json naming ``uri`` as the output);
    the staged folder becomes the local copy ``local_copy`` would download."""
    conf = stage / "prepare_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "output": uri}, indent=2))
    upload_dir(stage, uri, last=("report.json", "strata.json", "prepare_config.json"))
    cache = scratch_dir("cache", uri)
    cache.parent.mkdir(parents=True, exist_ok=True)
    _swap(stage, cache)
    fs, root = filesystem_for(uri)
    cache.with_name(cache.name + _MANIFEST).write_text(json.dumps(_listing(fs, root)))
    print(f"ray-pinet prepare: uploaded to {uri}", flush=True)
    return cache


def upload_dir(local: Path, uri: str, last: tuple[str, ...] = ()) -> None:
    """Replace the remote folder ``uri`` by the local folder ``local``: its old objects are deleted, then
    every file is copied, the top-level files named in ``last`` at the end, in that order (object stores have
    no atomic folder rename)."""
    fs, root = filesystem_for(uri)
    fs.delete_dir_contents(root, missing_dir_ok=True)
    src = pafs.LocalFileSystem()
    names = [e.name for e in sorted(local.iterdir()) if e.name not in last]
    for name in names + [n for n in last if (local / n).exists()]:
        pafs.copy_files(str(local / name), f"{root}/{name}", source_filesystem=src, destination_filesystem=fs)


def move_aside(uri: str) -> str | None:
    """``resume.move_aside`` for a remote folder: copied to ``<name>.replaced-<UTC time>`` beside it, then
    deleted (object stores have no rename); the new URI, or None when nothing was there."""
    fs, path = filesystem_for(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    kept = f"{path}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 1
    while fs.get_file_info(kept if n == 1 else f"{kept}-{n}").type != pafs.FileType.NotFound:
        n += 1
    kept = kept if n == 1 else f"{kept}-{n}"
    pafs.copy_files(path, kept, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(path)
    return uri_of(fs, kept)


def mirror_run(run_uri: str, target: Path, snapshot: str) -> Path:
    """What ``resume.latest_checkpoint`` reads of a remote run folder, copied to ``target``: the Ray Train
    snapshot file, an empty folder for each checkpoint it names that exists, the whole latest checkpoint."""
    fs, path = filesystem_for(run_uri)
    target.mkdir(parents=True, exist_ok=True)
    if fs.get_file_info(f"{path}/{snapshot}").type != pafs.FileType.File:
        return target
    download_file(f"{run_uri}/{snapshot}", target / snapshot)
    try:
        state = json.loads((target / snapshot).read_text())
        latest = state["latest_checkpoint_result"]["checkpoint_dir_name"] if state.get(
            "latest_checkpoint_result") else None
        names = {r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])} | {latest} - {None}
    except (ValueError, AttributeError, KeyError, TypeError):
        return target  # latest_checkpoint names the unreadable file
    for name in names:
        if fs.get_file_info(f"{path}/{name}").type == pafs.FileType.Directory:
            (target / name).mkdir(exist_ok=True)
            if name == latest:
                download_file(f"{run_uri}/{name}", target / name)
    return target


def run_storage(storage: str) -> dict:
    """``RunConfig`` keywords for ``run.storage_path`` (already ``local_or_uri``)."""
    if not is_remote(storage):
        return {"storage_path": storage}
    fs, path = filesystem_for(storage)
    return {"storage_path": path, "storage_filesystem": fs}
