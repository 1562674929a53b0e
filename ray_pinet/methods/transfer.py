"""Yin et al. (KDD 2020), transferrable parameters: the pieces of methods.md §2 that are math.

- ``GradReverse``: identity forward, −λ·gradient backward, so one backward pass gives the
  encoder ∇L_rec − λ∇L_disc and the discriminator ∇L_disc (§2.3).
- ``Discriminator``: 2-layer MLP on the sequence state (hidden = d by default) with K outputs,
  trained by cross-entropy on the user's stratum. With K = 2 this is the paper's head/tail
  BCE (softmax over two logits); with K buckets it generalises to "which activeness bucket".
- ``trajectory_ids``: the W-independent assignment of training rows to Reptile trajectories.
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


def trajectory_ids(num_samples: int, trajectories: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Trajectory j's training rows for one epoch: the sample ids ≡ j (mod P), permuted by
    rng(seed, epoch, j). Every row is visited once per epoch. With P a multiple of W, rank
    r holds every row of trajectories j ≡ r (mod W) (it holds sample ids ≡ r mod W), so a
    trajectory's inner loop never needs another rank's rows, and the set of trajectories, hence
    the outer update, does not depend on W."""
    out = []
    for j in range(trajectories):
        ids = np.arange(j, num_samples, trajectories, dtype=np.int64)
        out.append(ids[np.random.default_rng([seed, PURPOSE_TRAJECTORY_ORDER, epoch, j]).permutation(len(ids))])
    return out


def num_iterations(num_samples: int, trajectories: int, rows_per_iteration: int) -> int:
    """Outer iterations per epoch: enough for the longest trajectory (same on every rank)."""
    longest = -(-num_samples // trajectories)
    return -(-longest // rows_per_iteration)
