"""Plain nn.Module recommenders (SASRec, GRU4Rec, DIN) with optional per-stratum plugins.

Nothing here knows about Ray or torch.distributed; ``build_model`` is the entry point.
"""

from ray_pinet.models.config import ModelConfig, PluginConfig
from ray_pinet.models.recmodel import RecModel
from ray_pinet.models.registry import BACKBONES, build_model

__all__ = ["BACKBONES", "ModelConfig", "PluginConfig", "RecModel", "build_model"]
