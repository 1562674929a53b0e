"""Explicit backbone name -> constructor registry and ``build_model``."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ray_pinet.models.config import ModelConfig, PluginConfig
from ray_pinet.models.din import DIN
from ray_pinet.models.gru4rec import GRU4Rec
from ray_pinet.models.plugins import HeadPlugins, SequencePlugins
from ray_pinet.models.recmodel import RecModel
from ray_pinet.models.sasrec import SASRec

BACKBONES: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "sasrec": lambda c, m: SASRec(m, c.dim, c.num_blocks, c.num_heads, c.dropout, c.max_len),
    "gru4rec": lambda c, m: GRU4Rec(m, c.dim, c.num_blocks, c.dropout),
    "din": lambda c, m: DIN(m, c.dim, c.din_attention_hidden, c.din_mlp, c.dropout),
}


def build_model(
    cfg: ModelConfig, num_items: int, num_strata: int = 1, plugins: PluginConfig | None = None
) -> RecModel:
    """Backbone (+ plugins when ``plugins`` is given). Seed with torch.manual_seed before calling:
    initialisation consumes the global generator in a fixed order."""
    cfg.validate()
    if num_items < 1 or num_strata < 1:
        raise ValueError(f"num_items and num_strata must be >= 1, got {num_items}, {num_strata}")
    backbone = BACKBONES[cfg.backbone](cfg, num_items)
    plugin_module: SequencePlugins | HeadPlugins | None = None
    if plugins is not None:
        plugins.validate()
        if backbone.supports_full:
            plugin_module = SequencePlugins(cfg.dim, num_items, num_strata, plugins)
        else:
            plugin_module = HeadPlugins(backbone.head, num_items, num_strata, plugins)
    return RecModel(backbone, plugin_module, num_strata)
