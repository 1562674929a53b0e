"""Checkpoint files: written as plain data, read with ``torch.load(weights_only=True)``.

``torch.load(weights_only=False)`` unpickles arbitrary objects, which runs whatever code a tampered or foreign
file names (a ``__reduce__`` payload runs while the file is read, before any check of its content could). With
``weights_only=True`` torch builds only tensors and plain containers and refuses anything else before building
it. So every checkpoint ray-pinet writes holds only tensors, dicts, lists, tuples and str/int/float/bool/None
(``plain`` turns numpy values and dataclasses into those), and every checkpoint it reads goes through
``load_weights``: a file holding anything else is refused with one error naming it, and nothing in it runs.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections import Counter, OrderedDict
from pathlib import PurePath
from typing import Any, Optional

import torch

from ray_pinet.errors import DataError

# Leaves torch's weights_only unpickler builds without being told about them.
_PLAIN_LEAVES = (torch.Tensor, torch.Size, torch.dtype, torch.device, str, bytes, int, float, complex,
                 bool, type(None))
# Dict types kept as they are: the scheduler states hold a Counter that must stay one (MultiStepLR
# indexes its milestones with missing keys), and both load under weights_only.
_KEPT_DICTS = (dict, OrderedDict, Counter)


class RefusedCheckpoint(DataError):
    """A checkpoint that holds code or objects other than weights, or is no checkpoint at all:
    refused without running anything in it."""


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with numpy values as Python numbers / tensors, dataclasses and other mappings as
    dicts, paths as strings: what ``torch.load(weights_only=True)`` reads back. Anything else is
    a ``TypeError`` naming its place, at save time rather than when the checkpoint is needed."""
    import numpy as np

    if isinstance(obj, np.generic):  # first: np.float64 is also a float, and pickles as numpy
        return obj.item()
    if isinstance(obj, _PLAIN_LEAVES):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) in _KEPT_DICTS else {}
        for k, v in obj.items():
            out[plain(k, where)] = plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return type(obj)(items) if type(obj) in (list, tuple, set, frozenset) else list(items)
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds "
                    "only tensors and plain values (it is read with torch.load(weights_only=True))")


def save_weights(obj: Any, path: str | os.PathLike) -> None:
    torch.save(plain(obj), os.fspath(path))


def load_weights(path: str | os.PathLike, label: Optional[str] = None) -> Any:
    """The content of checkpoint file ``path`` on the CPU, loaded with ``weights_only=True``.
    ``label``: how errors name the file (e.g. a models:/ URI for a downloaded artifact)."""
    path = os.fspath(path)
    name = label or path
    if not os.path.isfile(path):
        raise RefusedCheckpoint("no checkpoint file here", file=name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise RefusedCheckpoint(f"not a readable checkpoint ({text.strip()[:200]})", file=name) from None
        # torch names the first global it refused ("Unsupported global: GLOBAL posix.system ...").
        culprit = None
        if "Unsupported global:" in text:
            culprit = text.split("Unsupported global:", 1)[1].strip().split(" was not", 1)[0]
        raise RefusedCheckpoint(
            "refused to load this checkpoint: it holds code or objects other than weights, and "
            "ray-pinet loads only tensors and plain values (nothing in the file was run). Use a "
            "checkpoint written by ray-pinet, or re-save your own as a plain state dict",
            file=name, value=culprit) from None
    except Exception as exc:  # truncated or foreign: the unpickler fails in many ways (KeyError...)
        raise RefusedCheckpoint(f"not a readable checkpoint ({type(exc).__name__}: {str(exc).strip()[:200]})",
                                file=name) from None
