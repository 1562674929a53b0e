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


_FEISTEL_ROUNDS = 6


def permute(key: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Int64 positions ``pi(index)`` under a keyed pseudo-random permutation ``pi`` of 0..n-1,
    evaluated for the given indices only: O(len(index)) time and memory, never O(n).

    A balanced Feistel network on the smallest even number of bits 2h with 2^(2h) >= n, round
    function = splitmix of (key, round, half), and *cycle walking* for the values that land in
    [n, 2^(2h)): apply the network again until the value is below n. Feistel rounds are
    bijections, so the result is a permutation of 0..n-1 (restricting a permutation of a larger
    set by cycle walking keeps it one); since 2^(2h) < 4n a value walks < 4 times on average.
    Six rounds: four already make a pseudo-random permutation (Luby-Rackoff); two more for the
    non-cryptographic round function. What it replaces: ``default_rng(...).permutation(n)``, which
    every rank had to hold whole (8 bytes per training row, per epoch)."""
    if n < 1:
        raise ValueError(f"permute: n must be >= 1, got {n}")
    x = np.asarray(index, dtype=np.int64)
    if x.size and (x.min() < 0 or x.max() >= n):
        raise ValueError(f"permute: indices must lie in 0..{n - 1}")
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    round_keys = [splitmix(key ^ splitmix(np.asarray([r + 1], dtype=np.uint64) * _GOLDEN))
                  for r in range(_FEISTEL_ROUNDS)]

    def network(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & mask
        with np.errstate(over="ignore"):
            for rk in round_keys:
                left, right = right, left ^ (splitmix(rk ^ (right + _GOLDEN)) & mask)
        return (left << np.uint64(half)) | right

    out = network(x.astype(np.uint64))
    walking = np.flatnonzero(out >= np.uint64(n))
    while walking.size:  # terminates: the cycle of each start holds a value below n (itself)
        out[walking] = network(out[walking])
        walking = walking[out[walking] >= np.uint64(n)]
    return out.astype(np.int64)
