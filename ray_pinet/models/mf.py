"""Two-tower matrix factorisation: s_ui = <U_u, V_i> (methods.md §3.2 / §4.2).

Plain ``nn.Module``; users and items are dense 0-based indices (no padding row). Both tables are
Xavier-normal initialised, as the AUC-NS and OneBP code do (``nn.init.xavier_normal_`` on an
``nn.Embedding``: std = sqrt(2 / (rows + d))). Seed with ``torch.manual_seed`` before building:
the user table is drawn first, then the item table.
"""

from __future__ import annotations

import torch
from torch import nn


class MF(nn.Module):
    def __init__(self, num_users: int, num_items: int, dim: int = 32) -> None:
        super().__init__()
        if min(num_users, num_items, dim) < 1:
            raise ValueError(f"num_users, num_items, dim must be >= 1, got {num_users}, {num_items}, {dim}")
        self.num_users = num_users
        self.num_items = num_items
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_items, dim)
        nn.init.xavier_normal_(self.user.weight)
        nn.init.xavier_normal_(self.item.weight)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Float[B, *]: users Long[B], items Long[B] or Long[B, k] -> one score per (user, item)."""
        u = self.user(users)
        v = self.item(items)
        if items.dim() == users.dim():
            return (u * v).sum(-1)
        return (u.unsqueeze(1) * v).sum(-1)

    def full_scores(self, users: torch.Tensor) -> torch.Tensor:
        """Float[B, num_items]: every item's score for each user (full-catalogue ranking)."""
        return self.user(users) @ self.item.weight.t()

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self.score(users, items)
