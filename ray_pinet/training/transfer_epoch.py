"""One epoch of ``transfer`` (Yin et al., methods.md §2): first-order Reptile over user tasks with
an adversarial stratum discriminator, data-parallel and exact for any worker count.

Per outer iteration every rank runs the inner loops of its trajectories (``trajectory_ids``):
from the shared start θ_0, ``inner_steps`` tasks, each one Adam step (fresh Adam per trajectory,
§2.4) on L_rec + L_disc with the encoder behind gradient reversal. One SUM all-reduce carries
[Σ_j (θ_k^j − θ_0) | trajectories run | loss sum | positions]; every rank then applies
θ ← θ_0 + β · Σ_j(θ_k^j − θ_0) / #trajectories run. The set of trajectories and each one's tasks
do not depend on W, so W workers compute the one-process update up to float summation order.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from ray_pinet.config import TrainConfig
from ray_pinet.methods.losses import per_position_losses
from ray_pinet.methods.transfer import (
    Discriminator,
    grad_reverse,
    num_iterations,
    rank_trajectories,
    trajectory_ids,
)
from ray_pinet.training.batches import TrainRows
from ray_pinet.training.collectives import all_reduce_sum_, rank_and_world, split_flat
from ray_pinet.training.device import autocast
from ray_pinet.training.loop import EpochStats


@torch.no_grad()
def copy_into_(params: list[torch.nn.Parameter], vec: torch.Tensor) -> None:
    """Copy a flat vector into the parameters' own storage. (torch's vector_to_parameters rebinds ``p.data``
    to views of ``vec``: later in-place optimizer steps would then write into θ_0 itself.)"""
    for p, part in zip(params, split_flat(vec, params)):
        p.copy_(part)


def task_loss(model, disc: Discriminator, batch, cfg: TrainConfig) -> tuple[torch.Tensor, int]:
    """(L_rec + L_disc with gradient reversal into the encoder, positions) for one task."""
    adversarial = cfg.transfer.adv_weight > 0
    states = model.states(batch.inputs) if adversarial else None
    # With loss ce one encoder pass serves both losses.
    loss_vec, _ = per_position_losses(model, batch.inputs, batch.targets, batch.negs, None, cfg.loss,
                                      states=states if cfg.loss == "ce" else None)
    loss = loss_vec.mean() if loss_vec.numel() else loss_vec.sum()
    if adversarial:
        # The state after the last item (rows are left-padded, so column -1 is the newest item).
        logits = disc(grad_reverse(states[:, -1], cfg.transfer.adv_weight))
        loss = loss + F.cross_entropy(logits, batch.stratum)
    return loss, int(loss_vec.numel())


def transfer_epoch(model: torch.nn.Module, disc: Discriminator, rows: TrainRows, num_samples: int,
                   cfg: TrainConfig, epoch: int,
                   progress: Optional[Callable[[int, int], None]] = None) -> EpochStats:
    t = cfg.transfer
    rank, world = rank_and_world()
    model.train()
    disc.train()
    params = [p for p in list(model.backbone_parameters()) + list(disc.parameters()) if p.requires_grad]
    torch.manual_seed((cfg.run.seed * 1_000_003 + epoch * 1_009 + rank) % (2**31))
    trajs = {j: trajectory_ids(num_samples, t.trajectories, j, cfg.run.seed, epoch)
             for j in rank_trajectories(t.trajectories, rank, world)}
    per_iter = t.inner_steps * t.users_per_task
    iters = num_iterations(num_samples, t.trajectories, per_iter)
    stats = EpochStats()
    t_epoch = time.perf_counter()
    device = params[0].device
    # Statistics stay on the device and are read once after the epoch, as in ``run_epoch``.
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    pos_acc = torch.zeros((), dtype=torch.float64, device=device)
    for it in range(iters):
        t0 = time.perf_counter()
        with torch.no_grad():
            theta0 = parameters_to_vector(params).clone()
        delta = torch.zeros(theta0.shape, dtype=torch.float64, device=device)
        ran = positions = 0.0
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for j, traj in trajs.items():
            ids = traj[it * per_iter : (it + 1) * per_iter]
            if len(ids) == 0:
                continue
            copy_into_(params, theta0)
            inner = torch.optim.Adam(params, lr=t.inner_lr)  # state reset per trajectory (§2.4)
            for start in range(0, len(ids), t.users_per_task):
                batch = rows.take(torch.from_numpy(ids[start : start + t.users_per_task]))
                with autocast(device, cfg.run.precision):
                    loss, n_pos = task_loss(model, disc, batch, cfg)
                loss = loss.float()
                inner.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                    inner.step()
                loss_sum += loss.detach()
                positions += n_pos
            with torch.no_grad():
                delta += (parameters_to_vector(params) - theta0).to(torch.float64)
            ran += 1
        t1 = time.perf_counter()
        tail = torch.tensor([ran, 0.0, positions], dtype=torch.float64, device=device)
        tail[1] = loss_sum
        buf = torch.cat([delta, tail])
        all_reduce_sum_(buf)
        total_ran = buf[-3]
        with torch.no_grad():
            step = (buf[:-3] / total_ran.clamp(min=1.0)).to(theta0.dtype)
            copy_into_(params, theta0 + t.outer_lr * step)
        loss_acc += buf[-2] / (total_ran * t.inner_steps).clamp(min=1.0)
        stats.steps += 1
        pos_acc += buf[-1]
        stats.time_forward += t1 - t0
        stats.time_allreduce += time.perf_counter() - t1
        if progress is not None:
            progress(it + 1, iters)
    stats.loss, stats.positions = float(loss_acc), int(pos_acc)
    stats.rows = num_samples
    stats.seconds = time.perf_counter() - t_epoch
    return stats
