"""Counter-based draws (ray_pinet/keyed_random.py): a pure function of (stream, entity, draw index),
whatever the batching, and uniform enough for sampling."""

from __future__ import annotations

import numpy as np
import pytest

from ray_pinet.keyed_random import stream_key, uniform_matrix, uniform_ragged


def test_ragged_draws_are_the_matrix_prefixes_and_batch_independent():
    key = stream_key(3, 1)
    ids, counts = np.array([7, 0, 12, 5]), np.array([3, 0, 5, 1])
    r = uniform_ragged(key, ids, counts)
    m = uniform_matrix(key, ids, 5)
    assert np.array_equal(r, np.concatenate([m[i, :c] for i, c in enumerate(counts)]))
    split = np.concatenate([uniform_ragged(key, ids[:2], counts[:2]), uniform_ragged(key, ids[2:], counts[2:])])
    assert np.array_equal(r, split)
    assert not np.array_equal(uniform_matrix(stream_key(3, 2), ids, 5), m)
    assert not np.array_equal(uniform_matrix(stream_key(4, 1), ids, 5), m)


def test_draws_look_uniform_and_independent():
    u = uniform_ragged(stream_key(0, 1), np.arange(50_000), np.full(50_000, 4))
    assert u.min() >= 0.0 and u.max() < 1.0
    hist = np.bincount((u * 20).astype(int), minlength=20)
    expected = len(u) / 20
    assert ((hist - expected) ** 2 / expected).sum() < 45  # chi-square, 19 dof: p ~ 1e-3
    a, b = u.reshape(-1, 4)[:, 0], u.reshape(-1, 4)[:, 1]  # neighbouring draws of one entity
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02


def test_negative_parts_are_rejected():
    with pytest.raises(ValueError):
        stream_key(1, -2)
    with pytest.raises(ValueError):
        uniform_ragged(stream_key(1), np.array([-1]), np.array([1]))
