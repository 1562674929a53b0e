"""``RecModel``: one backbone plus optional per-stratum plugins behind the interface the trainer uses.

Shapes: inputs/history Long[B, L] (item indices 1..M, left-padded with 0, oldest first); stratum
Long[B] in 0..K-1 or None. With ``use_plugins = False`` or ``stratum=None`` the plugins are
bypassed exactly (backbone-only output).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ray_pinet.models.layers import check_stratum
from ray_pinet.models.plugins import HeadPlugins, SequencePlugins


class RecModel(nn.Module):
    # State-dict entries indexed by item (name -> axis of the M+1 item rows, row 0 = padding):
    # what `retrain` remaps when a newer log brings a new item vocabulary.
    ITEM_AXES = {"backbone.item_emb.weight": 0, "plugins.item_bias.weight": 1, "plugins.item_offset": 1}

    def __init__(
        self, backbone: nn.Module, plugins: SequencePlugins | HeadPlugins | None, num_strata: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.plugins = plugins
        self.num_strata = num_strata
        self.use_plugins = True

    @property
    def supports_full(self) -> bool:
        """True when items are scored by a dot product with the sequence state (full catalogue)."""
        return bool(self.backbone.supports_full)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return self.backbone.parameters()

    def plugin_parameters(self) -> Iterator[nn.Parameter]:
        return iter(()) if self.plugins is None else self.plugins.parameters()

    @torch.no_grad()
    def reset_plugins(self) -> None:
        """Make every plugin the identity on the current backbone (DIN: re-copy the trained head)."""
        if isinstance(self.plugins, HeadPlugins):
            self.plugins.reset(self.backbone.head)
        elif self.plugins is not None:
            self.plugins.reset()

    def _active(self, stratum: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if self.plugins is None or not self.use_plugins or stratum is None:
            return None
        check_stratum(stratum, batch, self.num_strata)
        return stratum

    def _require_full(self, what: str) -> None:
        if not self.supports_full:
            raise ValueError(
                f"{what} needs a dot-product backbone (sasrec, gru4rec); "
                f"{type(self.backbone).__name__} scores given items only: pass candidates / use score()"
            )

    def states(self, inputs: torch.Tensor, stratum: torch.Tensor | None = None) -> torch.Tensor:
        """Float[B, L, d]: the state at each position (adapter applied)."""
        self._require_full("states()")
        h = self.backbone(inputs)
        s = self._active(stratum, inputs.shape[0])
        return h if s is None else self.plugins.adapt(h, s)

    def position_states(self, inputs: torch.Tensor, valid: torch.Tensor, stratum: torch.Tensor | None = None,
                        segments: torch.Tensor | None = None) -> torch.Tensor:
        """Float[P, d]: the states at the P positions where ``valid`` Bool[R, L] is true (row-major),
        adapter applied with ``stratum`` Long[P] given per position. ``segments``: packed rows
        (the backbone's ``forward(inputs, segments)``, sasrec)."""
        self._require_full("position_states()")
        h = self.backbone(inputs) if segments is None else self.backbone(inputs, segments)
        h = h[valid]
        s = self._active(stratum, h.shape[0])
        return h if s is None else self.plugins.adapt(h, s)

    def position_logits(self, states: torch.Tensor, stratum: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
        """Float[P, C]: logits of items Long[P, C] for states Float[P, d] (stratum Long[P])."""
        return self._item_logits(states.unsqueeze(1), stratum, items.unsqueeze(1))[:, 0]

    def full_logits(
        self, states: torch.Tensor, stratum: torch.Tensor | None = None, skip_padding: bool = False
    ) -> torch.Tensor:
        """Float[N, M+1] for states Float[N, d]; column 0 (padding) is not meaningful. With
        ``skip_padding`` the padding column is not computed: Float[N, M], column j = item j+1
        (cheaper than masking column 0 of an [N, M+1] tensor in the loss)."""
        self._require_full("full_logits()")
        first = 1 if skip_padding else 0
        emb = self.backbone.output_embedding[first:]
        s = self._active(stratum, states.shape[0])
        return states @ emb.T if s is None else self.plugins.shared_logits(states, s, emb, slice(first, None))

    def candidate_logits(self, states: torch.Tensor, stratum: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
        """Float[P, C]: logits of one candidate set items Long[C] shared by all states Float[P, d]
        (stratum Long[P]): the columns ``full_logits`` gives for those items, at O(P·C) cost."""
        self._require_full("candidate_logits()")
        emb = self.backbone.output_embedding[items]
        s = self._active(stratum, states.shape[0])
        return states @ emb.T if s is None else self.plugins.shared_logits(states, s, emb, items)

    def _item_logits(self, states: torch.Tensor, stratum: torch.Tensor | None, items: torch.Tensor) -> torch.Tensor:
        emb = self.backbone.output_embedding
        s = self._active(stratum, states.shape[0])
        if s is None:
            return (states.unsqueeze(2) * emb[items]).sum(-1)
        return self.plugins.item_logits(states, s, emb, items)

    def _din_logits(
        self, inputs: torch.Tensor, items: torch.Tensor, stratum: torch.Tensor | None, last_only: bool
    ) -> torch.Tensor:
        feats = self.backbone.features(inputs, items, last_only)
        s = self._active(stratum, inputs.shape[0])
        if s is None:
            return self.backbone.head(feats).squeeze(-1)
        return self.plugins.logits(self.backbone.head, feats, s, items)

    def score(self, inputs: torch.Tensor, items: torch.Tensor, stratum: torch.Tensor | None = None) -> torch.Tensor:
        """Float[B, L, C]: logit of items[b, t, c] as the next item after inputs[b, :t+1]."""
        if items.dim() != 3 or items.shape[:2] != inputs.shape:
            raise ValueError(f"items must be [B, L, C] with [B, L] = {tuple(inputs.shape)}, got {tuple(items.shape)}")
        if not self.supports_full:
            return self._din_logits(inputs, items, stratum, last_only=False)
        return self._item_logits(self.states(inputs, stratum), stratum, items)

    def predict(
        self, history: torch.Tensor, stratum: torch.Tensor | None = None, candidates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores after the whole history: Float[B, C] for candidates Long[B, C], or Float[B, M+1]
        over the full catalogue when candidates is None (dot-product backbones only)."""
        if candidates is None:
            self._require_full("predict(candidates=None)")
            return self.full_logits(self.states(history, stratum)[:, -1], stratum)
        items = candidates.unsqueeze(1)
        if not self.supports_full:
            return self._din_logits(history, items, stratum, last_only=True)[:, 0]
        return self._item_logits(self.states(history, stratum)[:, -1:], stratum, items)[:, 0]
