"""Counter-based random numbers: draw j of entity e in stream (seed, purpose, ...) is a pure function
of those integers (splitmix64 finaliser, as in SplitMix64 / Java's SplittableRandom), so a sampler
gives the same values however the entities are batched, bucketed or spread over workers.

Why not ``numpy.random.default_rng([seed, purpose, e])`` per entity: building one Generator costs
~30 µs, which made per-user draws 30 s of CPU for a million users (benchmarks/data_pipeline.py,
docs/design.md); the hash is vectorised over every entity of a batch at once.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def stream_key(*parts: int) -> np.ndarray:
    """uint64[1] key of a stream, e.g. (seed, purpose) or (seed, purpose, epoch); parts >= 0."""
    if min(parts, default=0) < 0:
        raise ValueError(f"stream key parts must be >= 0, got {parts}")
    key = np.zeros(1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for part in parts:
            key = splitmix(key ^ splitmix(np.asarray([part], dtype=np.uint64) + _GOLDEN))
    return key


def _entity_keys(key: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and ids.min() < 0:
        raise ValueError("entity ids must be >= 0")
    with np.errstate(over="ignore"):
        return splitmix(key ^ splitmix(ids.astype(np.uint64) + _GOLDEN))


def _to_unit(bits: np.ndarray) -> np.ndarray:
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # 53 bits -> [0, 1)


def uniform_matrix(key: np.ndarray, ids: np.ndarray, num: int) -> np.ndarray:
    """Float64[len(ids), num] in [0, 1): column j is draw j of each entity."""
    row = _entity_keys(key, ids)
    with np.errstate(over="ignore"):
        slots = (np.arange(1, num + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        return _to_unit(splitmix(row[:, None] + slots))


def uniform_ragged(key: np.ndarray, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Float64[sum(counts)]: draws 0..counts[i]-1 of entity ids[i], entity after entity. Draw j of
    an entity equals ``uniform_matrix(key, [id], j + 1)[0, j]``: a prefix does not depend on how
    many draws are taken."""
    counts = np.asarray(counts, dtype=np.int64)
    row = np.repeat(_entity_keys(key, ids), counts)
    j = np.arange(len(row), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    with np.errstate(over="ignore"):
        return _to_unit(splitmix(row + (j + 1).astype(np.uint64) * _GOLDEN))
