"""SASRec (Kang & McAuley 2018), following pmixer/SASRec.pytorch ``python/model.py``.

Item embeddings scaled by sqrt(d) plus learned positional embeddings, blocks of
``Q = LN(x); x = Q + MHA(Q, x, x)`` then ``x = FFN(LN(x)) + LN(x)``, a final layernorm. Two
deliberate differences: attention also masks padding keys (a real position attends only to real
items <= itself), and positions count from the right (the newest item is position 1), so states do
not depend on how much left padding a batch has.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ray_pinet.models.layers import Dropout, xavier_init_
from ray_pinet.models.layers import dropout as apply_dropout


class SelfAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter layout (one [3d, d] in-projection)."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query, keys: [B, L, d]; mask: Bool[B, 1, L, L], True = may attend."""
        b, length, dim = query.shape
        w_q, w_kv = self.in_proj.weight.split([dim, 2 * dim])
        b_q, b_kv = self.in_proj.bias.split([dim, 2 * dim])
        q = F.linear(query, w_q, b_q)
        k, v = F.linear(keys, w_kv, b_kv).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

        # Written out rather than F.scaled_dot_product_attention: its CPU dropout uses the slow bernoulli_.
        att = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(dim // self.num_heads)
        att = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
        out = apply_dropout(att, self.dropout, self.training) @ heads(v)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, dim))


class PointWiseFeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.drop1 = Dropout(dropout)
        self.drop2 = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop2(self.fc2(F.relu(self.drop1(self.fc1(x)))))


class SASRec(nn.Module):
    """Sequence encoder: ``forward(inputs[B, L]) -> states[B, L, d]``; logits are states · item_emb."""

    supports_full = True

    def __init__(
        self, num_items: int, dim: int, num_blocks: int, num_heads: int, dropout: float, max_len: int
    ) -> None:
        super().__init__()
        self.max_len = max_len
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len + 1, dim, padding_idx=0)
        self.emb_dropout = Dropout(dropout)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-8) for _ in range(num_blocks))
        self.attns = nn.ModuleList(SelfAttention(dim, num_heads, dropout) for _ in range(num_blocks))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(dim, eps=1e-8) for _ in range(num_blocks))
        self.ffns = nn.ModuleList(PointWiseFeedForward(dim, dropout) for _ in range(num_blocks))
        self.last_norm = nn.LayerNorm(dim, eps=1e-8)
        xavier_init_(self)

    @property
    def output_embedding(self) -> torch.Tensor:
        return self.item_emb.weight

    def forward(self, inputs: torch.Tensor, segments: torch.Tensor | None = None) -> torch.Tensor:
        """``segments`` Long[B, L] (optional): packed rows, several sequences side by side in one row
        (training/packing.py). ``segments[b, t]`` names the sequence that column t belongs to (-1 = padding);
        each sequence occupies contiguous columns, oldest item first. A position then attends only to earlier
        positions of its own sequence and its positional index counts from its own sequence's end, so every
        sequence's states are those it gets alone in a left-padded row (up to float rounding)."""
        b, length = inputs.shape
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={self.max_len}")
        valid = inputs != 0
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).tril()
        if segments is None:
            positions = torch.arange(length, 0, -1, device=inputs.device).expand(b, length) * valid
            # Real keys only; the diagonal stays open so padding rows have one key (no NaN softmax).
            eye = torch.eye(length, dtype=torch.bool, device=inputs.device)
            mask = (causal & (valid.unsqueeze(1) | eye)).unsqueeze(1)
        else:
            if segments.shape != inputs.shape:
                raise ValueError(f"segments {tuple(segments.shape)} must match inputs {tuple(inputs.shape)}")
            positions = _positions_from_end(segments) * valid
            # Same sequence and not later; padding columns (-1) see each other, so no row is empty.
            mask = (causal & (segments.unsqueeze(2) == segments.unsqueeze(1))).unsqueeze(1)
        x = self.item_emb(inputs) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(positions)
        keep = valid.unsqueeze(-1).to(x.dtype)
        x = self.emb_dropout(x) * keep
        for attn_norm, attn, ffn_norm, ffn in zip(self.attn_norms, self.attns, self.ffn_norms, self.ffns):
            q = attn_norm(x)
            x = q + attn(q, x, mask)
            x = ffn(ffn_norm(x)) * keep
        return self.last_norm(x)


def _positions_from_end(segments: torch.Tensor) -> torch.Tensor:
    """Long[B, L]: 1 at the last column of each contiguous run of equal ``segments``, 2 before it,
    ... (the left-padded convention: the newest item is position 1)."""
    b, length = segments.shape
    cols = torch.arange(length, device=segments.device).expand(b, length)
    last = torch.ones_like(segments, dtype=torch.bool)
    last[:, :-1] = segments[:, :-1] != segments[:, 1:]
    # the end column of each run: a reversed running minimum of "column if last else L"
    end = torch.where(last, cols, torch.full_like(cols, length)).flip(1).cummin(1).values.flip(1)
    return end - cols + 1
