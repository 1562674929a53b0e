"""The one checkpoint format of both training kinds: ``state.pt`` in a Ray Train checkpoint folder.

A snapshot is a dict of tensors and plain values (``checkpoint_io.plain``), written with
``save_weights`` and read back with ``weights_only=True``: nothing in a checkpoint runs when it
is loaded. It always holds ``config`` (the resolved config as a dict); the rest is the kind's:
the sequence Engine's ``engine``/``model``/``meta``, the two-tower loop's ``run``/``history``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from ray_pinet import storage_uri
from ray_pinet.checkpoint_io import load_weights, save_weights

STATE_FILE = "state.pt"


def load_state(checkpoint_dir: str) -> dict:
    """The snapshot (``state.pt``) of a checkpoint directory (local or a storage URI), on the CPU.
    A file holding anything but tensors and plain values is refused (``RefusedCheckpoint``, a
    ``DataError`` naming it) and nothing in it runs."""
    if storage_uri.is_remote(checkpoint_dir):  # a checkpoint in object storage (run.storage_path)
        uri = storage_uri.join(checkpoint_dir, STATE_FILE)
        with tempfile.TemporaryDirectory() as tmp:
            return load_weights(storage_uri.download_file(uri, Path(tmp) / STATE_FILE), label=uri)
    return load_weights(os.path.join(checkpoint_dir, STATE_FILE))


def load_backbone_state(checkpoint_dir: str) -> dict:
    """The backbone weights (``backbone.`` keys, prefix removed) of a sequence run's checkpoint."""
    snap = load_state(checkpoint_dir)
    prefix = "backbone."
    return {k[len(prefix):]: v for k, v in snap["model"].items() if k.startswith(prefix)}


def report(metrics: dict, snap: Optional[dict]) -> None:
    """``ray.train.report`` of a worker: the numeric metrics, with a checkpoint of ``snap`` when
    given (rank 0 gives it; the other ranks report metrics only)."""
    import ray.train  # lazy: the kinds' loops also run without Ray (Engine, tests, the GPU check)

    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if snap is None:
        ray.train.report(clean)
        return
    d = tempfile.mkdtemp(prefix="ray-pinet-ckpt-")
    try:
        save_weights(snap, os.path.join(d, STATE_FILE))
        ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)
