"""torch.distributed helpers. Every function is an exact no-op (or identity) without a process
group, so the same loop runs in one process (tests, local mode) and on W Ray Train workers.
Every buffer lives on the device of the tensors passed in (nccl only reduces CUDA tensors, gloo
CPU ones, and CUDA ones by staging): nothing here moves data to the host."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM all-reduce (float32/float64/int64 on gloo and nccl alike)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max_(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers bitwise equal to rank ``src``'s."""
    if not is_distributed():
        return
    with torch.no_grad():
        tensors = [p.data for p in module.parameters()] + [b for b in module.buffers()]
        if not tensors:
            return
        # float64 holds every float32 and int64 (< 2^53) value exactly; on the tensors' device
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        dist.broadcast(flat, src=src)
        for t, part in zip(tensors, split_flat(flat, tensors)):
            t.copy_(part.to(t.dtype))


def split_flat(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped as each of ``like`` in turn: the inverse of concatenating them flat."""
    out, offset = [], 0
    for t in like:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def flatten_grads(params: Sequence[torch.nn.Parameter], grads: Iterable[torch.Tensor | None] | None = None) -> torch.Tensor:
    """One contiguous float32 vector of the gradients (zeros where a parameter got none)."""
    grads = [p.grad for p in params] if grads is None else list(grads)
    parts = [
        (g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32)
        for p, g in zip(params, grads)
    ]
    if not parts:
        return torch.zeros(0, device=params[0].device if len(params) else "cpu")
    return torch.cat(parts)


def assign_flat_grads_(params: Sequence[torch.nn.Parameter], flat: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        g = flat[offset : offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n
    if offset != flat.numel():
        raise RuntimeError(f"flat gradient has {flat.numel()} values for {offset} parameters")


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank order); ranks may hold different numbers of rows."""
    if not is_distributed():
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_i = torch.cat(sizes).tolist()  # once per gather (not per step): one host read
    max_n = max(sizes_i)
    padded = torch.zeros((max_n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes_i)])
