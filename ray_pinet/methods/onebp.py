"""OneBP (Chen & Wang, arXiv 2403.18227): the item tower learns by backprop, the user tower by a
moving aggregation of the items each user interacts with (methods.md §3). Pure torch, no Ray.

Duplicate users in a batch (``duplicate_rule``):
* ``last_write`` (as coded): the public code assigns ``U[users] = β·U[users] + (1−β)·V[pos]``, so
  of several rows of one user only one survives. Which one is left to the indexed assignment
  there; here it is, by definition, the user's *last row in global-batch order*, so the result
  does not depend on the worker count or on scatter semantics.
* ``mean``: one EMA step per user with the mean v⁺ of its rows.

Both rules give every user one EMA step per batch it appears in, however many rows it has there.
"""

from __future__ import annotations

from typing import Literal

import torch

DUPLICATE_RULES = ("last_write", "mean")


def infonce_losses(pos_scores: torch.Tensor, neg_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Float[B]: −log(exp(s⁺/T) / (exp(s⁺/T) + Σ_n exp(s_n/T))); pos Float[B], neg Float[B, N]."""
    logits = torch.cat([pos_scores.unsqueeze(1), neg_scores], dim=1) / temperature
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def ema_targets(users: torch.Tensor, vectors: torch.Tensor,
                rule: Literal["last_write", "mean"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique users Long[U'], their aggregated v⁺ Float[U', d]) from batch rows in batch order.

    users Long[B]; vectors Float[B, d] (each row's positive item vector)."""
    if rule not in DUPLICATE_RULES:
        raise ValueError(f"duplicate_rule must be one of {DUPLICATE_RULES}, got {rule!r}")
    uniq, inverse = torch.unique(users, return_inverse=True)
    if rule == "mean":
        sums = torch.zeros(len(uniq), vectors.shape[1], dtype=vectors.dtype,
                           device=vectors.device).index_add_(0, inverse, vectors)
        counts = torch.bincount(inverse, minlength=len(uniq)).to(vectors.dtype)
        return uniq, sums / counts.unsqueeze(1)
    # last_write: the largest batch position of each user
    pos = torch.arange(len(users), device=users.device)
    last = torch.full((len(uniq),), -1, dtype=torch.long, device=users.device).scatter_reduce_(
        0, inverse, pos, reduce="amax")
    return uniq, vectors[last]


@torch.no_grad()
def ema_update_(user_table: torch.Tensor, users: torch.Tensor, vectors: torch.Tensor, beta: float,
                rule: Literal["last_write", "mean"] = "last_write") -> None:
    """In place: U[u] ← β·U[u] + (1−β)·v̄_u for each user of the batch (see ``ema_targets``)."""
    if users.numel() == 0:
        return
    uniq, target = ema_targets(users, vectors, rule)
    user_table[uniq] = beta * user_table[uniq] + (1.0 - beta) * target.to(user_table.dtype)
