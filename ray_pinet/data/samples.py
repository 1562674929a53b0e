"""Leave-one-out samples, training windows and seeded negatives for one bucket. Pure, no Ray.

Per user (events in time order, n >= 3): the last event is the test target, the second-last the
validation target, the first ``a = n - 2`` events (the activeness) are the training sequence.

Training windows (``window="all"``): windows of at most ``L + 1`` items whose ends lie ``L`` apart,
counted back from the last training event, so every training position 1..a-1 is a target exactly
once (position 0 never is: it has no history). ``window="last"`` keeps only the latest window. Users
with ``a < 2`` have no training target and no training row. Windows are numbered oldest first.

Negatives are drawn uniformly from the items the user never interacted with (in any split): a uniform draw
``r`` in [0, 1) picks the ``floor(r * (M - P))``-th non-positive item exactly, without rejection. All of a
user's draws are keyed by (seed, purpose, user_idx): a counter-based hash (``samples.draws = keyed``,
ray_pinet/keyed_random.py) or ``numpy.random.default_rng([seed, purpose, user_idx])`` (``generator``), so the
output does not depend on buckets, blocks or workers. Purpose ``NEGATIVES`` draws the validation negative,
then the test negative, then the training negatives (target-major, ``train_negatives`` per target, windows
oldest first): eval negatives do not move when ``train_negatives`` changes. Candidate lists
(``eval_candidates > 0``) are drawn without replacement from their own purposes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ray_pinet.config_base import ConfigError
from ray_pinet.data.config import SamplesConfig
from ray_pinet.data.schema import ITEM, USER
from ray_pinet.errors import DataError
from ray_pinet.keyed_random import stream_key, uniform_ragged

NEGATIVES, VALID_CANDIDATES, TEST_CANDIDATES = 1, 2, 3  # randomness purposes
_I32 = np.iinfo(np.int32).max


def num_windows(train_len: np.ndarray, max_len: int, window: str) -> np.ndarray:
    """Training rows per user for training-sequence lengths ``train_len`` (= activeness)."""
    a = np.asarray(train_len, dtype=np.int64)
    if window == "last":
        return (a >= 2).astype(np.int64)
    return np.where(a >= 2, (a - 1 + max_len - 1) // max_len, 0)


def window_bounds(train_len: np.ndarray, max_len: int, window: str):
    """``(user, window index, start, end)`` per training row; start/end inclusive, within the sequence."""
    a = np.asarray(train_len, dtype=np.int64)
    w_count = num_windows(a, max_len, window)
    user = np.repeat(np.arange(len(a)), w_count)
    w = np.arange(len(user)) - np.repeat(np.cumsum(w_count) - w_count, w_count)
    end = a[user] - 1 - (w_count[user] - 1 - w) * max_len
    start = np.maximum(0, end - max_len)
    return user, w, start, end


@dataclass
class SampleMaps:
    """What one bucket needs from the driver: its own users only, so a task's work and memory do
    not grow with the total number of users (the global map cost 2.9 s per task at 10^8 rows)."""

    user_ids: pa.Array  # this bucket's users, sorted by id (hence by user_idx)
    user_idx: np.ndarray  # global user_idx of each entry of user_ids
    stratum: np.ndarray  # int8, per entry of user_ids
    train_first: np.ndarray  # first training sample_id, per entry of user_ids
    valid_id: np.ndarray  # validation sample_id, per entry of user_ids; -1 = dropped (unseen item)
    test_id: np.ndarray


def build_samples(
    rows: pa.Table, maps: SampleMaps, item_ids: pa.Array, cfg: SamplesConfig, seed: int
) -> dict[str, pa.Table]:
    """The train/valid/test tables of one bucket (users contiguous, events in time order).
    ``item_ids``: every item, sorted (position + 1 = item_idx), shared by all buckets."""
    m = len(item_ids)
    loc = _index(rows[USER], maps.user_ids)  # position in the bucket's map; ascending = by user_idx
    item = (_index(rows[ITEM], item_ids) + 1).astype(np.int32)
    first = np.flatnonzero(np.r_[True, loc[1:] != loc[:-1]]) if len(loc) else np.zeros(0, np.int64)
    n_old = np.diff(np.r_[first, len(loc)])
    perm = np.argsort(loc[first], kind="stable")  # users by user_idx -> rows in sample_id order
    uloc, n = loc[first][perm], n_old[perm]
    user = maps.user_idx[uloc]
    item = item[_ranges(first[perm], n)]
    start = np.cumsum(n) - n
    g_rows = np.repeat(np.arange(len(n)), n)
    # Each user's distinct items with the position of their first occurrence (group-major, ascending).
    fg, fitem, frel = _first_occurrences(g_rows, item, np.arange(len(item)) - start[g_rows], m)
    neg = _NegativeSampler(fg, fitem, m, user)

    # Training windows and the per-user draw counts.
    a = n - 2
    wg, w, ws, we = window_bounds(a, cfg.max_len, cfg.window)
    wlen = we - ws + 1
    n_neg = (wlen - 1) * cfg.train_negatives
    draws = 2 + np.bincount(wg, weights=n_neg, minlength=len(n)).astype(np.int64)
    r = _draws(user, draws, seed, NEGATIVES, cfg.draws)
    is_eval = np.zeros(len(r), dtype=bool)
    off = np.cumsum(draws) - draws
    is_eval[off] = is_eval[off + 1] = True
    g_train = np.repeat(np.arange(len(n)), draws - 2)
    out = {"train": pa.table({
        "sample_id": pa.array(maps.train_first[uloc[wg]] + w, pa.int64()),
        "user_idx": pa.array(user[wg], pa.int64()),
        "stratum": pa.array(maps.stratum[uloc[wg]], pa.int8()),
        "seq": _list(wlen, item[_ranges(start[wg] + ws, wlen)]),
        "neg": _list(n_neg, neg.map(g_train, r[~is_eval])),
    })}
    for split, back, ids, k, purpose in (
        ("valid", 2, maps.valid_id, 0, VALID_CANDIDATES),
        ("test", 1, maps.test_id, 1, TEST_CANDIDATES),
    ):
        g = np.flatnonzero(ids[uloc] >= 0)
        t = n[g] - back  # position of the target = number of events before it
        h0 = np.maximum(0, t - cfg.max_len)
        before = frel < (n - back)[fg]  # distinct items seen before the target
        seen_len, seen = np.bincount(fg[before], minlength=len(n)), fitem[before]
        cols = {
            "sample_id": pa.array(ids[uloc[g]], pa.int64()),
            "user_idx": pa.array(user[g], pa.int64()),
            "stratum": pa.array(maps.stratum[uloc[g]], pa.int8()),
            "history": _list(t - h0, item[_ranges(start[g] + h0, t - h0)]),
            "target": pa.array(item[start[g] + t], pa.int32()),
            "neg": pa.array(neg.map(g, r[off[g] + k]), pa.int32()),
            "seen": _list(seen_len[g], seen[_ranges((np.cumsum(seen_len) - seen_len)[g], seen_len[g])]),
        }
        if cfg.eval_candidates > 0:
            cols["candidates"] = _list(
                np.full(len(g), cfg.eval_candidates), neg.candidates(g, cfg.eval_candidates, seed, purpose)
            )
        out[split] = pa.table(cols)
    return out


class _NegativeSampler:
    """Maps per-user uniform draws to items 1..M that are not among the user's positives."""

    def __init__(self, pg: np.ndarray, pos: np.ndarray, m: int, user: np.ndarray) -> None:
        """``pg``, ``pos``: each user's distinct items, group-major and ascending within a group."""
        self.m, self.user = m, user
        n_pos = np.bincount(pg, minlength=len(user))
        self.avail = m - n_pos
        full = np.flatnonzero(self.avail <= 0)
        if len(full):
            u = int(user[full[0]])
            raise DataError(
                "user interacted with every item: no negative can be sampled",
                file="(cleaned log)", column=USER, row=None, value=f"user_idx {u}",
            )
        # q_j = p_j - j (p sorted per user) is non-decreasing; the x-th non-positive item (1-based)
        # is x + #{j : q_j <= x}. Keys are offset per user so one searchsorted serves all users.
        self.stride = m + 2
        self.pstart = pstart = np.cumsum(n_pos) - n_pos
        self.qkey = pg * self.stride + (pos - (np.arange(len(pos)) - pstart[pg]))

    def map(self, g: np.ndarray, r: np.ndarray) -> np.ndarray:
        avail = self.avail[g]
        x = np.minimum((r * avail).astype(np.int64), avail - 1) + 1
        return self._nth(g, x)

    def _nth(self, g: np.ndarray, x: np.ndarray) -> np.ndarray:
        below = np.searchsorted(self.qkey, g * self.stride + x, side="right") - self.pstart[g]
        return (x + below).astype(np.int32)

    def candidates(self, g: np.ndarray, c: int, seed: int, purpose: int) -> np.ndarray:
        short = np.flatnonzero(self.avail[g] < c)
        if len(short):
            raise ConfigError(
                f"samples.eval_candidates={c} exceeds the {int(self.avail[g[short[0]]])} items "
                f"user_idx {int(self.user[g[short[0]]])} has not interacted with"
            )
        x = np.empty((len(g), c), dtype=np.int64)
        for i, gi in enumerate(g):
            rng = np.random.default_rng([seed, purpose, int(self.user[gi])])
            x[i] = rng.choice(int(self.avail[gi]), size=c, replace=False) + 1
        return self._nth(np.repeat(g, c), x.ravel())


def _draws(user: np.ndarray, counts: np.ndarray, seed: int, purpose: int, source: str) -> np.ndarray:
    """Uniform [0, 1) draws, ``counts[i]`` for user_idx ``user[i]``, user after user."""
    if source == "keyed":
        return uniform_ragged(stream_key(seed, purpose), user, counts)
    out = np.empty(int(counts.sum()), dtype=np.float64)
    off = 0
    for u, c in zip(user.tolist(), counts.tolist()):
        out[off : off + c] = np.random.default_rng([seed, purpose, u]).random(c)
        off += c
    return out


def _index(col: pa.ChunkedArray, values: pa.Array) -> np.ndarray:
    idx = pc.index_in(col, value_set=values)
    if idx.null_count:
        raise RuntimeError("internal error: an id is missing from the driver's id map")
    return idx.to_numpy().astype(np.int64)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for each pair."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    shift = np.repeat(np.asarray(starts, dtype=np.int64) - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + shift


def _first_occurrences(group: np.ndarray, item: np.ndarray, rel: np.ndarray, m: int):
    """Distinct ``(group, item)`` pairs sorted by group then item, with the first ``rel`` of each."""
    key = group.astype(np.int64) * (m + 1) + item
    o = np.argsort(key, kind="stable")  # stable: the first of equal keys has the smallest rel
    ks = key[o]
    first = o[np.r_[True, ks[1:] != ks[:-1]]] if len(ks) else o
    return group[first], item[first], rel[first]


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """``np.unique`` for int64 keys by sort + neighbour compare (numpy 2's hash path is ~10x slower)."""
    x = np.sort(x)
    return x[np.r_[True, x[1:] != x[:-1]]] if len(x) else x


def _list(lengths: np.ndarray, values: np.ndarray) -> pa.Array:
    offsets = np.r_[0, np.cumsum(lengths, dtype=np.int64)]
    if offsets[-1] > _I32:
        raise ConfigError("a bucket's list column exceeds 2^31 values; raise num_buckets")
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))
