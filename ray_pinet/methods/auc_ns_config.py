"""The AUC-NS sampler's settings (methods.md §4.2): one dataclass, both the ``model.auc_ns``
section of the two-tower config and what ``negative_sampling.NegativeSampler`` reads. Torch-free,
so the config (and ``ray-pinet --help``) loads without torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ray_pinet.config_base import require


@dataclass(frozen=True)
class AucNsConfig:
    """Defaults: the ML-100K MF row of methods.md §4.2."""

    num_extra: int = 10  # N = |P_u| = |Q_u|
    num_candidates: int = 5  # M = |C_u|
    alpha: float = 0.60  # model AUC (model-dependent bias)
    beta: float = 0.025  # popularity-prior flattening (model-independent bias)
    gamma: float = 0.006  # FPR range of the partial AUC
    cdf_mode: Literal["exact", "sampled"] = "exact"
    cdf_samples: int = 1000  # items that estimate F(j) in cdf_mode=sampled

    def validate(self) -> None:
        """ConfigError (a ValueError) naming the field: at config load, and again in the sampler
        for a config built in code."""
        require(self.num_extra >= 1, "num_extra", ">= 1", self.num_extra)
        require(self.num_candidates >= 1, "num_candidates", ">= 1", self.num_candidates)
        require(0.0 <= self.alpha <= 1.0, "alpha", "in [0, 1]", self.alpha)
        require(self.beta >= 0, "beta", ">= 0", self.beta)
        require(self.gamma >= 0, "gamma", ">= 0", self.gamma)
        require(self.cdf_mode in ("exact", "sampled"), "cdf_mode", "'exact' or 'sampled'", self.cdf_mode)
        require(self.cdf_samples >= (1000 if self.cdf_mode == "sampled" else 1), "cdf_samples",
                ">= 1 (>= 1000 with cdf_mode=sampled, methods.md §4.2)", self.cdf_samples)
