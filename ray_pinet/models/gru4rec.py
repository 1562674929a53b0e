"""GRU4Rec (Hidasi et al. 2016) as a next-item sequence encoder: embedding -> GRU -> projection to d.

Left padding would feed the GRU padding steps before the real items; the batch is rotated to
right padding and packed, so a state depends only on the real items before it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ray_pinet.models.layers import Dropout, xavier_init_


class GRU4Rec(nn.Module):
    """``forward(inputs[B, L]) -> states[B, L, d]``; logits are states · item_emb."""

    supports_full = True

    def __init__(self, num_items: int, dim: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.emb_dropout = Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers=num_layers, batch_first=True)
        self.proj = nn.Linear(dim, dim)
        xavier_init_(self)
        for name, p in self.gru.named_parameters():
            if name.startswith("weight"):
                nn.init.xavier_normal_(p)

    @property
    def output_embedding(self) -> torch.Tensor:
        return self.item_emb.weight

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        b, length = inputs.shape
        lengths = (inputs != 0).sum(1)
        shift = (length - lengths).unsqueeze(1)
        cols = torch.arange(length, device=inputs.device).unsqueeze(0)
        right = inputs.gather(1, (cols + shift) % length)  # real items first
        x = self.emb_dropout(self.item_emb(right))
        if torch.compiler.is_exporting():
            # Packing needs the lengths on the host, which an exported graph cannot read. The GRU
            # is causal, so after the rotation every real item's state is the same without it;
            # the trailing padding's states are zeroed as pad_packed_sequence leaves them.
            out, _ = self.gru(x)
            out = out * (cols < lengths.clamp(min=1).unsqueeze(1)).unsqueeze(-1).to(out.dtype)
        else:
            packed = pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.gru(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=length)
        back = ((cols - shift) % length).unsqueeze(-1).expand(b, length, out.shape[-1])
        return self.proj(out.gather(1, back))  # back to left padding
