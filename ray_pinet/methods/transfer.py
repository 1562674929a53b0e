"""Yin et al. (KDD 2020), transferrable parameters: the pieces of methods.md §2 that are math.

- ``GradReverse``: identity forward, −λ·gradient backward, so one backward pass gives the
  encoder ∇L_rec − λ∇L_disc and the discriminator ∇L_disc (§2.3).
- ``Discriminator``: 2-layer MLP on the sequence state (hidden = d by default) with K outputs,
  trained by cross-entropy on the user's stratum. With K = 2 this is the paper's head/tail
  BCE (softmax over two logits); with K buckets it generalises to "which activeness bucket".
- ``trajectory_ids``, ``rank_trajectories``: the W-independent assignment of training rows to
  Reptile trajectories, and of trajectories to ranks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ray_pinet.models.layers import MLP

PURPOSE_TRAJECTORY_ORDER = 23


class GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    return GradReverse.apply(x, lam)


class Discriminator(nn.Module):
    def __init__(self, dim: int, num_strata: int, hidden: int = 0) -> None:
        super().__init__()
        self.net = MLP(dim, [hidden or dim], out_dim=num_strata)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def trajectory_ids(num_samples: int, trajectories: int, j: int, seed: int, epoch: int) -> np.ndarray:
    """Trajectory j's training rows for one epoch: the contiguous block ``shard_range(N, j, P)`` of sample
    ids, permuted by rng(seed, epoch, j). Every row is visited once per epoch. With P a multiple of W, the
    block of trajectory j lies inside rank j // (P / W)'s block (the blocks of ``shard_range`` nest), so a
    trajectory's inner loop never needs another rank's rows, and the set of trajectories, hence the outer
    update, does not depend on W. A rank builds only its own trajectories: O(N / W)."""
    lo, hi = num_samples * j // trajectories, num_samples * (j + 1) // trajectories
    ids = np.arange(lo, hi, dtype=np.int64)
    return ids[np.random.default_rng([seed, PURPOSE_TRAJECTORY_ORDER, epoch, j]).permutation(len(ids))]


def rank_trajectories(trajectories: int, rank: int, world: int) -> list[int]:
    """The trajectories whose rows rank holds (P a multiple of W, checked by the config)."""
    per_rank = trajectories // world
    return list(range(rank * per_rank, (rank + 1) * per_rank))


def num_iterations(num_samples: int, trajectories: int, rows_per_iteration: int) -> int:
    """Outer iterations per epoch: enough for the longest trajectory (same on every rank)."""
    longest = -(-num_samples // trajectories)
    return -(-longest // rows_per_iteration)
