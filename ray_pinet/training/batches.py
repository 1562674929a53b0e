"""Typed batches and the W-independent global batching of training rows.

Training rows carry a dense ``sample_id`` in 0..N-1 (docs/design.md). Rank r of W holds the contiguous block
``shard_range(N, r, W)`` (training/shards.py reads only that block). Epoch e puts row j of the visited rows
(dense index 0..n-1) at position ``pi_e(j)`` of a keyed pseudo-random permutation (``keyed_random.permute``);
global batch b is the rows at positions [bB, (b+1)B). A rank evaluates pi_e for its own rows only
(no O(N) array) and yields its share of each global batch. Hence the global batches, and so the GA gradient of
every step, are the same for any W, every rank runs exactly ceil(n/B) steps (equal collective counts, no
dropped rows), and a run with W workers can be compared with one process sample for sample
(methods.md §6, "Our choice").
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import torch

from ray_pinet import keyed_random
from ray_pinet.training.collectives import all_reduce_sum_, rank_and_world
from ray_pinet.training.packing import pack_indices, pack_plan

PURPOSE_EPOCH_ORDER = 11


@dataclass
class TrainBatch:
    """B windows of a rank. Padded: row b of ``inputs`` is window b. Packed (``segments`` set,
    training/packing.py): ``inputs``/``targets``/``negs`` are R <= B rows holding several windows
    each, ``segments[r, t]`` the window (0..B-1) of column t, -1 for padding."""

    inputs: torch.Tensor  # Long[R, L]   item indices (padded: left-padded with 0, R = B)
    targets: torch.Tensor  # Long[R, L]  next item at each position (0 = no target)
    negs: torch.Tensor  # Long[R, L, n] sampled negatives per target (n may be 0)
    stratum: torch.Tensor  # Long[B]
    sample_id: torch.Tensor  # Long[B]
    segments: Optional[torch.Tensor] = None  # Long[R, L] when packed

    def __len__(self) -> int:
        return int(self.stratum.shape[0])  # windows, not rows


@dataclass
class EvalBatch:
    history: torch.Tensor  # Long[B, L]
    target: torch.Tensor  # Long[B]
    neg: torch.Tensor  # Long[B]
    stratum: torch.Tensor  # Long[B]
    seen_rows: torch.Tensor  # Long[S] row index of each seen item
    seen_items: torch.Tensor  # Long[S]
    candidates: Optional[torch.Tensor] = None  # Long[B, C]

    def __len__(self) -> int:
        return int(self.history.shape[0])

    def to(self, device: torch.device) -> "EvalBatch":
        """The batch on ``device`` (itself when already there); ranking and masking run there."""
        if self.history.device == torch.device(device):
            return self
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return EvalBatch(*(move(getattr(self, f.name)) for f in fields(self)))


def _list_column(table: pa.Table, name: str, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, int64 offsets) of a list<int> column; ``dtype=None``: the values as stored
    (zero-copy)."""
    col = table.column(name).combine_chunks()
    if isinstance(col, pa.ChunkedArray):  # empty table
        col = pa.array([], type=table.schema.field(name).type)
    offsets = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False)
    values = values if dtype is None else values.astype(dtype)
    start = offsets[0]
    return values[start : offsets[-1]], offsets - start


def _left_pad(values: np.ndarray, offsets: np.ndarray, width: int, dtype=np.int64,
              trim: tuple[int, int] = (0, 0), out: Optional[np.ndarray] = None) -> np.ndarray:
    """Ragged rows -> [n, width] matrix, right-aligned (keeps the last ``width`` items). ``trim``
    = (a, b): row i is values[offsets[i] + a : offsets[i+1] - b] (training inputs drop the last
    item, targets the first), so no wider intermediate is built and copied. ``out``: a zeroed
    C-contiguous [n, width] array to fill instead of a new one."""
    n = len(offsets) - 1
    if out is None:
        out = np.zeros((n, width), dtype=dtype)
    assert out.shape == (n, width) and out.flags.c_contiguous
    ends = offsets[1:] - trim[1]
    keep = np.clip(ends - (offsets[:-1] + trim[0]), 0, width)
    # One vectorised copy: element k of row i's last keep[i] items sits at ends[i]-keep[i]+k and
    # goes to flat position i*width + width-keep[i] + k; with e = the element's index in the
    # concatenation of the kept items, k = e - start[i].
    start = np.cumsum(keep) - keep
    e = np.arange(int(start[-1] + keep[-1]) if n else 0, dtype=np.int64)
    dst = np.repeat(np.arange(n, dtype=np.int64) * width + width - keep - start, keep) + e
    src = np.repeat(ends - keep - start, keep) + e
    out.reshape(-1)[dst] = values[src]
    return out


def _ascending(ids: pa.ChunkedArray) -> bool:
    a = ids.to_numpy()
    return len(a) < 2 or bool((a[1:] > a[:-1]).all())


BUILD_ROWS = 1 << 18  # windows per chunk while TrainRows is built


def _fill_negatives(out: np.ndarray, offs: np.ndarray, nvals: np.ndarray, noffs: np.ndarray) -> None:
    """Row i's negatives (``neg``: ``avail`` per target, target-major) into ``out[i]`` ([n, L, k]),
    right-aligned by target like the targets: the last L targets, the first k of each one's draws."""
    n, max_len, num_negatives = out.shape
    t = np.maximum(np.diff(offs) - 1, 0)  # targets per row
    avail = np.where(t > 0, np.diff(noffs) // np.maximum(t, 1), 0)
    k = np.minimum(avail, num_negatives)
    keep = np.minimum(t, max_len)  # the last max_len targets of a row
    # (row, target slot, negative) of every kept draw, vectorised
    per_row = keep * k
    row = np.repeat(np.arange(n), per_row)
    j = np.arange(int(per_row.sum())) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    tk = np.maximum(k[row], 1)
    slot, neg = j // tk, j % tk
    src = noffs[row] + (t[row] - keep[row] + slot) * avail[row] + neg
    out[row, max_len - keep[row] + slot, neg] = nvals[src]


@dataclass
class RowSubset:
    """The rows an epoch visits when not all of them (``data.train_strata``): this rank's global
    sample ids in the subset (sorted) and their dense index in the whole subset, ``offset`` +
    0..len-1 (ranks hold contiguous id blocks, so the subset's index is rank-major)."""

    local_ids: np.ndarray  # int64, sorted
    offset: int  # the subset rows on lower ranks
    total: int  # the subset rows on all ranks


class TrainRows:
    """One rank's training rows, the contiguous block of sample ids [first, first + n), held as
    padded int32 tensors (batches are int64) and addressed by global sample id.

    Placement (``device``, ``budget_mb``): the rows live on ``device`` when they take at most
    ``budget_mb`` there (``resident``); a batch is then gathered on the device. Otherwise they stay
    in host memory (pinned when the device is CUDA) and each gathered batch is copied with
    ``non_blocking=True``; ``prefetched`` keeps one batch in flight so the copy overlaps the step.
    The batch sampler (``epoch_batches``, numpy ids) stays on the host either way."""

    def __init__(self, table: pa.Table, max_len: int, num_samples: int, num_negatives: int,
                 device: torch.device = torch.device("cpu"), budget_mb: float = float("inf")):
        if not _ascending(table.column("sample_id")):
            table = table.sort_by("sample_id")
        self.max_len, self.num_samples = max_len, num_samples
        ids = table.column("sample_id").to_numpy().astype(np.int64)
        self.first = int(ids[0]) if len(ids) else 0
        if not np.array_equal(ids, np.arange(self.first, self.first + len(ids))) or self.first + len(ids) > num_samples:
            raise ValueError(
                f"training sample ids are not one contiguous block of 0..{num_samples - 1} "
                "(was the training split written by `ray-pinet prepare`?)"
            )
        self.sample_id = torch.from_numpy(ids)
        n = len(ids)
        # inputs: the last max_len items but the newest; targets: the item after each input
        self.inputs = torch.zeros((n, max_len), dtype=torch.int32)
        self.targets = torch.zeros((n, max_len), dtype=torch.int32)
        self.negs = torch.zeros((n, max_len, num_negatives), dtype=torch.int32)
        with_negs = num_negatives > 0 and "neg" in table.column_names
        # In chunks of rows: the index arrays of the vectorised copies are int64 per item, ~4x the
        # items' own bytes; built for a whole block they were 3 GB at 10^8 log rows.
        # items per window, on the host: packing plans from it without reading the device
        self.lengths = np.zeros(n, dtype=np.int64)
        for lo in range(0, n, BUILD_ROWS):
            part = table.slice(lo, BUILD_ROWS)
            hi = lo + part.num_rows
            vals, offs = _list_column(part, "seq", dtype=None)
            self.lengths[lo:hi] = np.clip(np.diff(offs) - 1, 0, max_len)  # = inputs != 0 per row
            _left_pad(vals, offs, max_len, trim=(0, 1), out=self.inputs.numpy()[lo:hi])
            _left_pad(vals, offs, max_len, trim=(1, 0), out=self.targets.numpy()[lo:hi])
            if with_negs:
                _fill_negatives(self.negs.numpy()[lo:hi], offs, *_list_column(part, "neg", dtype=None))
        self.stratum = torch.from_numpy(table.column("stratum").to_numpy().astype(np.int64))
        self.device = torch.device(device)
        self.nbytes = sum(t.numel() * t.element_size() for t in self._tensors())
        self.resident = self.nbytes <= budget_mb * 2**20
        if self.resident:
            self._place(lambda t: t.to(self.device))
        elif self.device.type == "cuda":
            self._place(lambda t: t.pin_memory())  # page-locked: the copy can run asynchronously

    def _tensors(self) -> list[torch.Tensor]:
        return [self.inputs, self.targets, self.negs, self.stratum, self.sample_id]

    def _place(self, move) -> None:
        self.inputs, self.targets, self.negs, self.stratum, self.sample_id = map(move, self._tensors())

    def __len__(self) -> int:
        return len(self.sample_id)

    def subset(self, strata: list[int]) -> RowSubset:
        """The rows of ``strata`` as a ``RowSubset``. Collective: one SUM all-reduce of W row
        counts (the ranks' blocks are in id order, so a rank's subset index starts after the
        lower ranks' rows), once per run; nothing of size N."""
        rank, world = rank_and_world()
        keep = np.isin(self.stratum.cpu().numpy(), np.asarray(list(strata), dtype=np.int64))
        local = self.sample_id.cpu().numpy()[keep]
        device = self.device if self.device.type == "cuda" else torch.device("cpu")  # nccl: CUDA only
        counts = torch.zeros(world, dtype=torch.int64, device=device)
        counts[rank] = len(local)
        counts = all_reduce_sum_(counts).cpu().numpy()
        return RowSubset(local_ids=local, offset=int(counts[:rank].sum()), total=int(counts.sum()))

    def epoch_batches(self, batch_size: int, seed: int, epoch: int,
                      subset: Optional[RowSubset] = None) -> Iterator[torch.Tensor]:
        """This rank's share of each global batch of epoch ``epoch`` (host global ids, possibly
        empty), ceil(n / B) of them, n = every row or the subset's rows."""
        if subset is None:
            ids = np.arange(self.first, self.first + len(self), dtype=np.int64)
            return local_epoch_batches(ids, ids, self.num_samples, batch_size, seed, epoch)
        index = subset.offset + np.arange(len(subset.local_ids), dtype=np.int64)
        return local_epoch_batches(subset.local_ids, index, subset.total, batch_size, seed, epoch)

    def take(self, global_ids: torch.Tensor, packed: bool = False) -> TrainBatch:
        """This rank's rows of a global batch (host ids), as int64 tensors on ``device``;
        ``packed``: its windows packed into rows without padding (training/packing.py)."""
        mine = global_ids[(global_ids >= self.first) & (global_ids < self.first + len(self))]
        local = mine - self.first
        if packed:
            return self._packed(mine, local)
        if self.resident:
            idx = local.to(self.device, non_blocking=True)
            return TrainBatch(inputs=self.inputs[idx].long(), targets=self.targets[idx].long(),
                              negs=self.negs[idx].long(), stratum=self.stratum[idx],
                              sample_id=mine.to(self.device, non_blocking=True))
        return TrainBatch(*map(self._ship, (self.inputs[local].long(), self.targets[local].long(),
                                            self.negs[local].long(), self.stratum[local], mine)))

    def _ship(self, t: torch.Tensor) -> torch.Tensor:
        """A batch tensor gathered on the host onto ``device``: a gathered tensor is fresh (pageable),
        so it is pinned again on CUDA for the copy to be async."""
        return (t.pin_memory() if self.device.type == "cuda" else t).to(self.device, non_blocking=True)

    def _packed(self, mine: torch.Tensor, local: torch.Tensor) -> TrainBatch:
        lengths = self.lengths[local.numpy()]
        row, offset, num_rows, width = pack_plan(lengths, self.max_len)
        window, src_col, dst = pack_indices(lengths, row, offset, width, self.max_len)
        device = self.device if self.resident else torch.device("cpu")

        def idx(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        src_row, src_col, dst, window = idx(local.numpy()[window]), idx(src_col), idx(dst), idx(window)
        n_neg = self.negs.shape[-1]
        inputs = torch.zeros(num_rows * width, dtype=torch.int64, device=device)
        targets = torch.zeros_like(inputs)
        segments = torch.full_like(inputs, -1)
        negs = torch.zeros((num_rows * width, n_neg), dtype=torch.int64, device=device)
        inputs[dst] = self.inputs[src_row, src_col].long()
        targets[dst] = self.targets[src_row, src_col].long()
        segments[dst] = window
        if n_neg:
            negs[dst] = self.negs[src_row, src_col].long()
        out = TrainBatch(inputs=inputs.view(num_rows, width), targets=targets.view(num_rows, width),
                         negs=negs.view(num_rows, width, n_neg), stratum=self.stratum[local.to(device)],
                         sample_id=mine.to(device), segments=segments.view(num_rows, width))
        if self.resident:
            return out
        return TrainBatch(*map(self._ship, (out.inputs, out.targets, out.negs, out.stratum, out.sample_id,
                                            out.segments)))

    def prefetched(self, id_batches: Iterator[torch.Tensor], packed: bool = False) -> Iterator[TrainBatch]:
        """``take`` of each id batch, issued one batch ahead: batch i+1's gather and copy are
        queued before step i runs (the values are those of ``take``; only the timing moves)."""
        it = iter(id_batches)
        ids = next(it, None)
        pending = None if ids is None else self.take(ids, packed)
        while pending is not None:
            current = pending
            ids = next(it, None)
            pending = None if ids is None else self.take(ids, packed)
            yield current


def local_epoch_batches(global_ids: np.ndarray, index: np.ndarray, n: int, batch_size: int, seed: int,
                        epoch: int) -> Iterator[torch.Tensor]:
    """The share of every global batch of an epoch (module doc) held by one rank: ``global_ids`` its
    rows, ``index`` their dense index among the n rows the epoch visits; yields ceil(n / B) int64
    tensors in position order (empty where the rank holds none of a batch). O(len(index)) per epoch."""
    if n == 0:
        return
    pos = keyed_random.permute(keyed_random.stream_key(seed, PURPOSE_EPOCH_ORDER, epoch), index, n)
    order = np.argsort(pos, kind="stable")
    pos, ids = pos[order], np.asarray(global_ids, dtype=np.int64)[order]
    cuts = np.searchsorted(pos, np.arange(num_steps(n, batch_size) + 1, dtype=np.int64) * batch_size)
    for b in range(len(cuts) - 1):
        yield torch.from_numpy(ids[cuts[b] : cuts[b + 1]])


def epoch_batches(
    num_samples: int, batch_size: int, seed: int, epoch: int, ids: Optional[np.ndarray] = None
) -> Iterator[torch.Tensor]:
    """Every global batch of an epoch, whole (one process's view of ``local_epoch_batches``;
    the two-tower stack and IG use it): O(n) memory. ``ids``: visit only these global sample ids
    (sorted; e.g. one stratum's rows)."""
    ids = np.arange(num_samples, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    return local_epoch_batches(ids, np.arange(len(ids), dtype=np.int64), len(ids), batch_size, seed, epoch)


def num_steps(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


class EvalRows:
    """One rank's evaluation rows (validation or test) as padded tensors."""

    def __init__(self, table: pa.Table, max_len: int):
        table = table.sort_by("sample_id")
        self.sample_id = torch.from_numpy(table.column("sample_id").to_numpy().astype(np.int64))
        vals, offs = _list_column(table, "history")
        self.history = torch.from_numpy(_left_pad(vals, offs, max_len))
        self.target = torch.from_numpy(table.column("target").to_numpy().astype(np.int64))
        self.neg = torch.from_numpy(table.column("neg").to_numpy().astype(np.int64))
        self.stratum = torch.from_numpy(table.column("stratum").to_numpy().astype(np.int64))
        svals, soffs = _list_column(table, "seen")
        self.seen_items = torch.from_numpy(svals)
        self.seen_offsets = torch.from_numpy(soffs)
        self.candidates = None
        if "candidates" in table.column_names:
            cvals, coffs = _list_column(table, "candidates")
            width = int(np.diff(coffs).max()) if len(coffs) > 1 else 0
            self.candidates = torch.from_numpy(cvals.reshape(-1, width)) if width else None

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def batches(self, batch_size: int) -> Iterator[EvalBatch]:
        for start in range(0, len(self), batch_size):
            end = min(start + batch_size, len(self))
            s0, s1 = int(self.seen_offsets[start]), int(self.seen_offsets[end])
            counts = self.seen_offsets[start + 1 : end + 1] - self.seen_offsets[start:end]
            rows = torch.repeat_interleave(torch.arange(end - start), counts)
            yield EvalBatch(
                history=self.history[start:end],
                target=self.target[start:end],
                neg=self.neg[start:end],
                stratum=self.stratum[start:end],
                seen_rows=rows,
                seen_items=self.seen_items[s0:s1],
                candidates=None if self.candidates is None else self.candidates[start:end],
            )
