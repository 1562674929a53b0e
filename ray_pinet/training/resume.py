"""Relaunching a run name: resume only what the same config made, or start afresh on request.

Ray Train V2 resumes a run from ``<storage_path>/<name>``: its ``checkpoint_manager_snapshot.json`` names the
latest checkpoint (``latest_checkpoint_result.checkpoint_dir_name``, a ``checkpoint_<timestamp>`` folder
beside it), which the controller hands to every worker (``ray.train.get_checkpoint``). It does not look at the
config. The driver therefore reads that checkpoint's resolved config before Ray Train starts and refuses a
relaunch whose config differs in any key that shapes the result (model, data, method, optimisation, GA,
stage 2, evaluation and selection, seeds, init/warm-start runs), naming each key with its old and new value.

Keys that may differ (``RESUME_FREE``) do not change what is trained or measured: console progress, tracking,
the restart budget, how the work is spread (the data feed and the GA all-reduce are independent of the number
of workers, tested), the device it runs on and timeouts. ``run.name`` and ``run.storage_path`` locate the run
itself, and ``data.prepare`` only says how the prepared folder is made (the folder's own settings are checked
by ``run_inputs.ensure_prepared``).

``fresh``: the run folder is renamed aside (``<name>.replaced-<UTC time>``, nothing deleted) and the run
starts from scratch, in a new MLflow run.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ray_pinet import storage_uri
from ray_pinet.config_base import ConfigError, config_diff, format_diff

SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2 CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
RESUME_FREE = (
    "run.name", "run.storage_path", "run.progress", "run.max_failures", "run.num_workers",
    "run.cpus_per_worker", "run.torch_threads", "run.collective_timeout_s", "tracking", "data.prepare",
    # Checkpoints hold CPU tensors and load with map_location="cpu": a run may continue on
    # another device. run.precision is not free (bf16 changes the numbers).
    "run.device", "run.gpus_per_worker", "run.device_data_mb",
)
# Checkpoint paths of finished runs: every checkpoint a finished run keeps holds its final model
# (resuming it re-evaluates and checkpoints again, under a new folder name), so they compare by run.
_RUN_PATHS = ("run.init_from", "run.warm_start")


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint Ray Train would hand to a relaunch of ``run_dir`` (None: it starts from
    scratch). A snapshot naming a missing checkpoint is refused, as Ray Train would refuse it."""
    snap = run_dir / SNAPSHOT
    if not snap.exists():
        return None
    try:
        state = json.loads(snap.read_text())
        latest = state.get("latest_checkpoint_result")
        kept = [r["checkpoint_dir_name"] for r in state.get("checkpoint_results", [])]
    except (OSError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise ConfigError(f"run folder {run_dir}: {SNAPSHOT} is unreadable ({exc!r}); relaunch with "
                          "--fresh (the folder is kept aside) or another run.name") from None
    if not latest:
        return None
    missing = [name for name in [latest.get("checkpoint_dir_name", "?"), *kept] if not (run_dir / name).is_dir()]
    if missing:  # Ray Train's controller would stop on it ("corrupted run directory")
        raise ConfigError(f"run folder {run_dir}: checkpoint(s) {sorted(set(missing))} named by its {SNAPSHOT} "
                          "are missing; relaunch with --fresh (the folder is kept aside) or another run.name")
    return run_dir / latest["checkpoint_dir_name"]


def _by_run(resolved: dict) -> dict:
    out = json.loads(json.dumps(resolved))
    for dotted in _RUN_PATHS:
        section, key = dotted.split(".")
        if out.get(section, {}).get(key):
            p = Path(out[section][key])
            out[section][key] = str(p.parent if p.name.startswith("checkpoint_") else p)
    return out


def move_aside(path: Path) -> Optional[Path]:
    """Rename ``path`` (when it exists) to ``<name>.replaced-<UTC time>[-n]`` beside it, nothing
    deleted; the new name, or None when there was nothing to move."""
    if not (path.exists() or path.is_symlink()):
        return None
    base = f"{path.name}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    kept, n = path.with_name(base), 1
    while kept.exists():
        n += 1
        kept = path.with_name(f"{base}-{n}")
    path.rename(kept)
    return kept


def config_changes(config_cls, stored: dict, cfg) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) of every key outside ``RESUME_FREE`` in which ``cfg`` differs from
    the resolved config ``stored`` with an earlier result (a checkpoint, a finished compare cell).
    A ``stored`` config that no longer loads is a ConfigError ("no longer loads (...)")."""
    try:
        old = config_cls.from_dict(stored).to_dict()  # defaults of keys added since: filled in
    except ConfigError as exc:
        raise ConfigError(f"no longer loads ({exc})") from None
    return config_diff(_by_run(old), _by_run(cfg.to_dict()), free=RESUME_FREE)


def check_resume(config_cls, cfg, storage: str, load_checkpoint_config: Callable[[Path], dict],
                 fresh: bool = False, extra: Optional[Callable[[Path], list[tuple[str, Any, Any]]]] = None,
                 say: Callable[[str], None] = print) -> Optional[Path]:
    """Before Ray Train starts: the checkpoint this run resumes from (None: from scratch).

    ``load_checkpoint_config(checkpoint_dir)`` gives the config stored with a checkpoint;
    ``extra(checkpoint_dir)`` further (key, old, new) differences (e.g. of the data's sizes).
    With ``fresh`` the run folder is moved aside first and None is returned. A remote
    ``storage`` (a URI): the same check on a local copy of what it reads (``storage_uri.mirror_run``),
    errors naming the remote run folder; the checkpoint's URI is returned."""
    remote = storage_uri.is_remote(storage)
    if fresh:
        kept = (storage_uri.move_aside(storage_uri.join(storage, cfg.run.name)) if remote
                else move_aside(Path(storage) / cfg.run.name))
        if kept is not None:
            say(f"--fresh: run {cfg.run.name!r} starts anew; its previous folder is kept as {kept}")
        return None
    if remote:
        run_uri = storage_uri.join(storage, cfg.run.name)
        with tempfile.TemporaryDirectory() as tmp:
            storage_uri.mirror_run(run_uri, Path(tmp) / cfg.run.name, SNAPSHOT)
            try:
                ckpt = check_resume(config_cls, cfg, tmp, load_checkpoint_config, extra=extra, say=say)
            except ConfigError as exc:
                raise ConfigError(str(exc).replace(str(Path(tmp) / cfg.run.name), run_uri)) from None
            return None if ckpt is None else storage_uri.join(run_uri, ckpt.name)
    run_dir = Path(storage) / cfg.run.name
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    try:
        diffs = config_changes(config_cls, load_checkpoint_config(ckpt), cfg)
    except ConfigError as exc:
        raise ConfigError(f"run {cfg.run.name!r} ({run_dir}): the config of its checkpoint {ckpt.name} "
                          f"{exc}; relaunch with --fresh (the folder is kept aside) or another run.name") from None
    diffs += extra(ckpt) if extra else []
    if diffs:
        raise ConfigError(
            f"run {cfg.run.name!r} already has a checkpoint ({ckpt}) made with another config; "
            f"resuming it would label that model with this config: {format_diff(diffs)}. Relaunch "
            "with the old values to resume, with --fresh to train anew (the old run folder is kept "
            "aside), or under another run.name")
    return ckpt
