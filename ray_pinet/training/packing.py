"""Padding-free training batches: several users' windows packed side by side into one row.

A training window is left-padded to L columns, but most windows are short (Beauty: ~7 of 50 columns are
items), so a padded batch spends most of the backbone's work on padding. Packing places each rank's windows of
a global batch into rows of width <= L, first-fit in order of decreasing length; ``segments`` names the window
of every column (-1 = padding) and the backbone masks attention to the window's own earlier columns and counts
positions from the window's end (models/sasrec.py). Every window's states, hence every per-position loss, are
what the padded batch gives, up to float rounding.

Why this keeps GA and exactness (docs/design.md, "Padding-free batches"): packing changes only the layout of a
rank's part of a global batch, never which windows form the global batch. The global batches are still the
W-independent permutation of sample ids (batches.epoch_batches), so every step mixes strata exactly as before,
the GA counts N_s and weights are those of the padded batch, and W workers still compute the one-process
gradient; only the summation order of positions moves. Sort-by-length bucketing would instead make batches
stratum-pure (length correlates with activeness) and bias the per-batch prior.

The plan is computed on the host from the windows' lengths (known when the rows are loaded): an O(n · rows)
first-fit over the rank's n windows of the step, well under a millisecond at n = 128, and it is built one
batch ahead with the gather (TrainRows.prefetched).
"""

from __future__ import annotations

import numpy as np


def pack_plan(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """First-fit decreasing of windows of ``lengths`` (each <= ``width``) into rows of ``width``.

    Returns (row Int64[n], offset Int64[n], number of rows, used width): window k occupies columns
    offset[k] .. offset[k] + lengths[k] - 1 of row[k]. Empty windows (length 0) get row -1. The
    used width is the longest row's fill (<= width): columns past it would be padding in every row.
    Deterministic: ties in length keep the windows' order."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > width:
        raise ValueError(f"a window of {int(lengths.max())} items does not fit rows of width {width}")
    n = len(lengths)
    row = np.full(n, -1, dtype=np.int64)
    offset = np.zeros(n, dtype=np.int64)
    fill = np.zeros(max(n, 1), dtype=np.int64)  # at most one row per window
    rows = 0
    for k in np.argsort(-lengths, kind="stable"):
        m = int(lengths[k])
        if m == 0:
            break  # sorted: the rest are empty too
        fits = np.flatnonzero(fill[:rows] + m <= width)
        r = int(fits[0]) if fits.size else rows
        rows += r == rows
        row[k], offset[k] = r, fill[r]
        fill[r] += m
    return row, offset, rows, int(fill[:rows].max()) if rows else 0


def pack_indices(lengths: np.ndarray, row: np.ndarray, offset: np.ndarray, width: int, src_width: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each item column goes: (window Int64[T], source column Int64[T], packed flat index
    Int64[T]) over the T = Σ lengths item columns, window by window, oldest first. Source rows are
    left-padded to ``src_width`` (the window's items are its last ``lengths[k]`` columns); the
    packed flat index is ``row * width + column`` in a [rows, width] matrix."""
    lengths = np.asarray(lengths, dtype=np.int64)
    window = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    src_col = src_width - lengths[window] + within
    dst = row[window] * width + offset[window] + within
    return window, src_col, dst
