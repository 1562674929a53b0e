"""Paired bootstrap intervals of a per-user metric: the same users resampled for both models.

Used where a decision must not follow validation noise: the retrain gate's report and stage 2's
``keep: significant`` rule. Pure numpy; callers gather the per-user values first (sorted by
sample id, so the resamples do not depend on the number of workers)."""

from __future__ import annotations

import numpy as np

from ray_pinet.evaluation.protocol import slice_names


def paired_intervals(base: np.ndarray, other: np.ndarray, stratum: np.ndarray, num_strata: int,
                     draws: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Per slice, the central ``level`` bootstrap interval of the relative change of the mean,
    (mean(other) - mean(base)) / mean(base), over that slice's users (0 where the resampled base
    mean is 0). Slices without users are left out. Seeded."""
    rng = np.random.default_rng(seed)
    tail = (1.0 - level) / 2.0
    out = {}
    for i, name in enumerate(slice_names(num_strata)):
        sel = np.ones(len(stratum), bool) if name == "all" else stratum == i
        a, b = base[sel], other[sel]
        if len(a) == 0:
            continue
        idx = rng.integers(0, len(a), size=(draws, len(a)))
        ma, mb = a[idx].mean(axis=1), b[idx].mean(axis=1)
        rel = np.where(ma > 0, (mb - ma) / np.where(ma > 0, ma, 1.0), 0.0)
        out[name] = (float(np.quantile(rel, tail)), float(np.quantile(rel, 1.0 - tail)))
    return out
