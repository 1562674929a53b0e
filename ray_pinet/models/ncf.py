"""GMF and NeuMF-end (He et al., NCF), as the Inverse Learning and DenoisingRec code builds them
(methods.md §5.5). Plain ``nn.Module``s over dense 0-based user and item indices; one logit per
(user, item) pair.

* GMF: s = wᵀ(p_u ⊙ q_i) + b.
* NeuMF-end (no pre-training): [p_u ⊙ q_i ‖ MLP([p'_u ‖ q'_i])] -> one logit, the MLP tower
  8d → 4d → 2d → d for ``num_layers`` = 3 (MLP embeddings 2^(L−1)·d each), ReLU, dropout.

Initialisation as coded: embeddings N(0, 0.01), MLP Xavier-uniform, output layer Kaiming-uniform
(a = 1, sigmoid gain), biases zero. Seed with ``torch.manual_seed`` before building.
"""

from __future__ import annotations

import torch
from torch import nn


class NCF(nn.Module):
    def __init__(self, num_users: int, num_items: int, dim: int = 32, kind: str = "gmf",
                 num_layers: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in ("gmf", "neumf"):
            raise ValueError(f"kind must be 'gmf' or 'neumf', got {kind!r}")
        if min(num_users, num_items, dim, num_layers) < 1:
            raise ValueError("num_users, num_items, dim and num_layers must be >= 1")
        self.kind, self.num_users, self.num_items = kind, num_users, num_items
        self.user_gmf = nn.Embedding(num_users, dim)
        self.item_gmf = nn.Embedding(num_items, dim)
        out_dim = dim
        if kind == "neumf":
            mlp_dim = dim * 2 ** (num_layers - 1)
            self.user_mlp = nn.Embedding(num_users, mlp_dim)
            self.item_mlp = nn.Embedding(num_items, mlp_dim)
            layers: list[nn.Module] = []
            width = 2 * mlp_dim
            for _ in range(num_layers):
                layers += [nn.Dropout(dropout), nn.Linear(width, width // 2), nn.ReLU()]
                width //= 2
            self.mlp = nn.Sequential(*layers)
            out_dim = 2 * dim
        self.predict = nn.Linear(out_dim, 1)
        for emb in self.embeddings():
            nn.init.normal_(emb.weight, std=0.01)
        if kind == "neumf":
            for m in self.mlp:
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        nn.init.kaiming_uniform_(self.predict.weight, a=1, nonlinearity="sigmoid")
        nn.init.zeros_(self.predict.bias)

    def embeddings(self) -> list[nn.Embedding]:
        out = [self.user_gmf, self.item_gmf]
        if self.kind == "neumf":
            out += [self.user_mlp, self.item_mlp]
        return out

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Float[B]: the logit of each (users[b], items[b])."""
        h = self.user_gmf(users) * self.item_gmf(items)
        if self.kind == "neumf":
            h = torch.cat([h, self.mlp(torch.cat([self.user_mlp(users), self.item_mlp(items)], dim=-1))], dim=-1)
        # = self.predict(h), written as a row-wise reduction: a GEMV's summation order may depend
        # on the batch size, and T-CE's truncation must see the same loss on any worker count
        return (h * self.predict.weight[0]).sum(-1) + self.predict.bias[0]
