"""Where a run's tensors live and in which precision the forward runs: decided once per worker.

``resolve_device`` turns ``run.device`` into a ``torch.device``; the caller moves the model
(``model.to(device)``) and hands the device to the ``Engine`` / two-tower loop, so models stay ignorant of
devices. Ray is imported lazily: the Ray-free ``Engine`` (and a GPU box without Ray) uses this module too.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch

from ray_pinet.config_base import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


def _ray_train_worker_gpu() -> tuple[bool, Optional[torch.device]]:
    """(inside a Ray Train worker, the GPU Ray reserved for it or None). A worker without a GPU
    reservation still sees its node's GPUs: torch.cuda.is_available() cannot tell, the reservation
    (``ray.get_gpu_ids()``) can."""
    try:
        import ray
        import ray.train
        from ray.train.torch import get_device
    except ImportError:
        return False, None
    try:
        if ray.train.get_context().get_world_size() is None:
            return False, None
    except Exception:  # not inside a Ray Train worker: get_context refuses
        return False, None
    if not ray.get_gpu_ids():
        return True, None
    device = get_device()
    return True, (device if device.type == "cuda" else None)


def resolve_device(device: str) -> torch.device:
    """``"cpu"`` | ``"cuda"`` | ``"auto"`` -> a ``torch.device``.

    In a Ray Train worker: the GPU Ray reserved for it (``run.gpus_per_worker`` > 0,
    ``ray.train.torch.get_device()``), else cpu for auto; ``"cuda"`` without a reservation is a ConfigError
    (unreserved workers would all pile onto the node's first GPU). Outside Ray (the Ray-free Engine, a GPU box
    without Ray): cuda when torch sees one, else cpu for auto and a ConfigError for ``"cuda"``."""
    if device not in DEVICES:
        raise ConfigError(f"run.device must be one of {list(DEVICES)}, got {device!r}", key="run.device")
    if device == "cpu":
        return torch.device("cpu")
    in_ray, gpu = _ray_train_worker_gpu()
    if gpu is not None:
        return gpu
    if in_ray:
        if device == "cuda":
            raise ConfigError("run.device is 'cuda' but this Ray Train worker holds no GPU: set "
                              "run.gpus_per_worker (e.g. 1), or run.device=auto/cpu", key="run.device")
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if device == "cuda":
        raise ConfigError(
            "run.device is 'cuda' but torch sees no CUDA device here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); install the CUDA build "
            "of torch, give the workers GPUs (run.gpus_per_worker > 0) or set run.device=cpu",
            key="run.device")
    return torch.device("cpu")


def autocast(device: Union[torch.device, str], precision: str) -> contextlib.AbstractContextManager:
    """The context a forward (and its loss) runs in: bf16 autocast on ``device`` for
    ``precision == "bf16"`` (CUDA and CPU both support bfloat16 autocast), nothing for fp32.
    Parameters stay fp32 under autocast; only the matmul-like ops compute in bf16."""
    if precision not in PRECISIONS:
        raise ConfigError(f"run.precision must be one of {list(PRECISIONS)}, got {precision!r}",
                          key="run.precision")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def backend_for(device_kind: Union[str, torch.device]) -> str:
    """The torch.distributed backend for tensors of this device kind: nccl on CUDA, gloo else."""
    kind = device_kind.type if isinstance(device_kind, torch.device) else str(device_kind)
    return "nccl" if kind.startswith("cuda") else "gloo"
