"""DIN (Zhou et al. 2018): target attention over the behaviour sequence, then an MLP to one logit.

For target item e and history items h_j the attention unit scores MLP([h_j, e, h_j - e, h_j * e])
(no softmax, as in the paper: weights also carry how much history is relevant); the interest
u = Σ_j w_j h_j over the real items j <= t when scoring the next item after position t. The
prediction MLP (default 200-80, PReLU) reads [u, e, u * e] and outputs the logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_pinet.models.layers import MLP, xavier_init_


def _prelu(width: int) -> nn.Module:
    return nn.PReLU()  # one slope: PReLU(width) would act on dim 1, not the feature dim


class DIN(nn.Module):
    supports_full = False

    def __init__(
        self, num_items: int, dim: int, attention_hidden: list[int], mlp: list[int], dropout: float
    ) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.attention = MLP(4 * dim, attention_hidden, out_dim=1, activation=_prelu)
        self.head = MLP(3 * dim, mlp, out_dim=1, activation=_prelu, dropout=dropout)
        xavier_init_(self)

    def attention_logits(self, hist: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """hist: [B, L, d], target: [B, T, C, d] -> weights [B, T, C, L].

        The first attention layer on [h, e, h - e, h * e] is split into its four d-column blocks, so the
        [B, T, C, L, 4d] input is never built: W·x = (W_h + W_d) h + (W_e - W_d) e + W_p (h * e)."""
        b, length, d = hist.shape
        _, t, c, _ = target.shape
        first = self.attention.blocks[0]
        w_h, w_e, w_d, w_p = first[0].weight.split(d, dim=1)  # each [H1, d]
        h1 = w_h.shape[0]
        a_h = F.linear(hist, w_h + w_d)  # [B, L, H1]
        a_e = F.linear(target, w_e - w_d, first[0].bias)  # [B, T, C, H1]
        hw = (hist.unsqueeze(2) * w_p).reshape(b, length * h1, d)  # [B, L*H1, d]
        a_p = torch.bmm(target.reshape(b, t * c, d), hw.transpose(1, 2)).view(b, t, c, length, h1)
        x = a_p + a_h[:, None, None] + a_e.unsqueeze(3)
        x = first[2](first[1](x))  # activation, dropout of the first block
        return self.attention(x, start=1).squeeze(-1)

    def features(self, inputs: torch.Tensor, items: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Head input [B, T, C, 3d] for items [B, T, C]: T = L (item c after inputs[:, :t+1]) or,
        with ``last_only``, T = 1 (after the whole history)."""
        b, length = inputs.shape
        hist = self.item_emb(inputs)
        target = self.item_emb(items)
        weights = self.attention_logits(hist, target)
        valid = inputs != 0
        if last_only:
            mask = valid.unsqueeze(1)  # [B, 1, L]
        else:
            causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).tril()
            mask = causal.unsqueeze(0) & valid.unsqueeze(1)  # [B, T, L]
        weights = weights * mask.unsqueeze(2).to(weights.dtype)
        interest = torch.einsum("btcl,bld->btcd", weights, hist)
        return torch.cat([interest, target, interest * target], dim=-1)

    def forward(self, inputs: torch.Tensor, items: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        return self.head(self.features(inputs, items, last_only)).squeeze(-1)
