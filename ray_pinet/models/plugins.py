"""Per-stratum plugins (methods.md §1.4, §1.6). Every plugin starts as the identity, so a model with
fresh plugins gives exactly its backbone-only output; ``reset`` restores that state later (e.g. to
start stage 2 from a backbone trained in stage 1).

- ``SequencePlugins`` (sasrec, gru4rec): a residual MLP adapter on the sequence state with a
  zero-initialised last layer, a per-stratum item bias, optional per-stratum item-embedding offsets.
- ``HeadPlugins`` (din): per-stratum copies of the last ``head_layers`` layers of DIN's prediction
  MLP, initialised from the backbone's head, plus the optional item bias.

Rows are routed by their stratum (0..K-1; the caller maps users unseen in training to 0 = tail).
"""

from __future__ import annotations

import torch
from torch import nn

from ray_pinet.models.config import PluginConfig
from ray_pinet.models.layers import MLP, route


class _ItemBias(nn.Module):
    def __init__(self, num_strata: int, num_items: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_strata, num_items + 1))

    def reset(self) -> None:
        nn.init.zeros_(self.weight)

    def items(self, stratum: torch.Tensor, items: torch.Tensor) -> torch.Tensor:  # items [B, ...]
        rows = stratum.view(-1, *([1] * (items.dim() - 1))).expand_as(items)
        return self.weight[rows, items]


class SequencePlugins(nn.Module):
    def __init__(self, dim: int, num_items: int, num_strata: int, cfg: PluginConfig) -> None:
        super().__init__()
        self.adapters = (
            nn.ModuleList(MLP(dim, cfg.adapter_hidden, out_dim=dim) for _ in range(num_strata))
            if cfg.adapter_hidden
            else None
        )
        self.item_bias = _ItemBias(num_strata, num_items) if cfg.item_bias else None
        self.item_offset = (
            nn.Parameter(torch.zeros(num_strata, num_items + 1, dim)) if cfg.item_offset else None
        )
        self.static_routing = False  # layers.route: True in the exported scoring graph (serving.py)
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        for adapter in self.adapters or []:
            last = adapter.last_linear()
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        if self.item_bias is not None:
            self.item_bias.reset()
        if self.item_offset is not None:
            self.item_offset.zero_()

    def adapt(self, states: torch.Tensor, stratum: torch.Tensor) -> torch.Tensor:
        """states [B, ..., d] -> states + adapter_{s(b)}(states)."""
        if self.adapters is None:
            return states
        return states + route(states, stratum, list(self.adapters), self.static_routing)

    def shared_logits(
        self, states: torch.Tensor, stratum: torch.Tensor, emb: torch.Tensor, items: slice | torch.Tensor
    ) -> torch.Tensor:
        """Logits of one item set shared by every state: states [N, d], ``items`` the C item ids
        (a slice such as ``slice(1, None)`` for the catalogue: views, no copy; or Long[C], e.g.
        sampled softmax's candidates), ``emb`` = their output embeddings [C, d] -> [N, C]."""
        logits = states @ emb.T
        if self.item_bias is not None:
            # onehot(s) @ bias adds row b_s exactly (x + 0 and x + b are exact) and its backward
            # is a [K, N] @ [N, C] matmul; gathering bias[s] instead materialises an [N, C]
            # copy and backpropagates through a serial index_add (1.5x the whole step, measured).
            onehot = torch.nn.functional.one_hot(stratum, self.item_bias.weight.shape[0]).to(states.dtype)
            logits = logits.addmm_(onehot, self.item_bias.weight[:, items])
        if self.item_offset is not None:  # added separately: exactly + 0 while the offsets are zero
            offset = self.item_offset[:, items]
            logits = logits + route(states, stratum, [lambda h, s=s: h @ offset[s].T for s in range(len(offset))],
                                   self.static_routing)
        return logits

    def item_logits(
        self, states: torch.Tensor, stratum: torch.Tensor, emb: torch.Tensor, items: torch.Tensor
    ) -> torch.Tensor:
        """states [B, T, d], items [B, T, C] -> [B, T, C]."""
        e = emb[items]
        if self.item_offset is not None:
            e = e + self.item_offset[stratum.view(-1, 1, 1).expand_as(items), items]
        logits = (states.unsqueeze(2) * e).sum(-1)
        if self.item_bias is not None:
            logits = logits + self.item_bias.items(stratum, items)
        return logits


class HeadPlugins(nn.Module):
    def __init__(self, head: MLP, num_items: int, num_strata: int, cfg: PluginConfig) -> None:
        super().__init__()
        n = min(cfg.head_layers, len(head.blocks))
        self.start = len(head.blocks) - n  # head blocks before this index stay shared
        self.heads = nn.ModuleList(head.tail(self.start) for _ in range(num_strata)) if n else None
        self.item_bias = _ItemBias(num_strata, num_items) if cfg.item_bias else None
        self.static_routing = False  # layers.route: True in the exported scoring graph (serving.py)

    @torch.no_grad()
    def reset(self, head: MLP) -> None:
        """Copy the backbone head's current weights into every plugin head; zero the bias."""
        if self.heads is not None:
            state = head.tail(self.start).state_dict()
            for h in self.heads:
                h.load_state_dict(state)
        if self.item_bias is not None:
            self.item_bias.reset()

    def logits(self, head: MLP, feats: torch.Tensor, stratum: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """feats [B, T, C, F] (DIN head input) -> [B, T, C]."""
        if self.heads is None:
            out = head(feats)
        else:
            out = route(head(feats, end=self.start), stratum, list(self.heads), self.static_routing)
        out = out.squeeze(-1)
        if self.item_bias is not None:
            out = out + self.item_bias.items(stratum, items)
        return out
