"""Typed configs of the recommendation models and of the per-stratum plugins (methods.md §1.4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ray_pinet.config_base import ConfigError


def _check_widths(name: str, widths: list[int]) -> None:
    if any(w < 1 for w in widths):
        raise ConfigError(f"{name}: every layer width must be >= 1, got {widths}")


@dataclass
class ModelConfig:
    """Backbone architecture. Defaults = the SASRec setting of methods.md §1.6."""

    backbone: Literal["sasrec", "gru4rec", "din"] = "sasrec"
    dim: int = 64  # item embedding / hidden size d
    num_blocks: int = 2  # sasrec: transformer blocks; gru4rec: GRU layers; din: unused
    num_heads: int = 1  # sasrec only; dim must be divisible by it
    dropout: float = 0.5  # sasrec/gru4rec: embedding, attention, FFN; din: prediction-MLP hidden layers
    max_len: int = 50  # longest input sequence L (sasrec positional table size)
    din_attention_hidden: list[int] = field(default_factory=lambda: [80, 40])
    din_mlp: list[int] = field(default_factory=lambda: [200, 80])  # hidden widths; output 1 logit

    def validate(self) -> None:
        if self.dim < 1:
            raise ConfigError(f"dim must be >= 1, got {self.dim}")
        if self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.num_heads < 1 or self.dim % self.num_heads:
            raise ConfigError(f"num_heads must be >= 1 and divide dim={self.dim}, got {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.max_len < 1:
            raise ConfigError(f"max_len must be >= 1, got {self.max_len}")
        _check_widths("din_attention_hidden", self.din_attention_hidden)
        _check_widths("din_mlp", self.din_mlp)
        if self.backbone == "din" and not self.din_attention_hidden:
            raise ConfigError("din_attention_hidden must have at least one layer")


@dataclass
class PluginConfig:
    """What one per-stratum plugin holds (each starts as the identity, models/plugins.py).

    Dot-product backbones (sasrec, gru4rec) use ``adapter_hidden`` and ``item_offset``; DIN uses
    ``head_layers``; ``item_bias`` applies to all. A field that does not apply to the backbone is ignored, so
    one plugin config can serve a sweep over backbones."""

    # Residual MLP on the sequence state h: h + MLP(h), d -> hidden... -> d, ReLU between layers.
    # The last layer starts at zero. Empty list = no adapter.
    adapter_hidden: list[int] = field(default_factory=lambda: [64])
    # Per-stratum output bias b_s[i] added to every item's logit (zero init).
    item_bias: bool = True
    # Per-stratum offset of the output item embeddings, e_i + D_s[i] (zero init; K x (M+1) x d).
    item_offset: bool = False
    # DIN: how many final linear layers of the prediction MLP (output layer included) are copied per
    # stratum, initialised from the backbone's head. 0 = no head copies.
    head_layers: int = 2

    def validate(self) -> None:
        _check_widths("adapter_hidden", self.adapter_hidden)
        if self.head_layers < 0:
            raise ConfigError(f"head_layers must be >= 0, got {self.head_layers}")
