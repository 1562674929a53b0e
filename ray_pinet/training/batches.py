"""Typed batches and the W-independent global batching of training rows.

Training rows carry a dense ``sample_id`` in 0..N-1 (docs/design.md). Rank r of W holds the
rows with ``sample_id % W == r``. Epoch e visits the permutation ``rng(seed, epoch)`` of
0..N-1 in global batches of B ids; each rank takes the ids of the batch that it holds. Hence the
global batches, and so the GA gradient of every step, are the same for any W, every rank runs
exactly ceil(N/B) steps (equal collective counts, no dropped rows), and a run with W workers
can be compared with one process sample for sample (methods.md §6, "Our choice").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import torch

from ray_pinet.training.collectives import all_reduce_sum_
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
        return EvalBatch(*(move(getattr(self, f)) for f in (
            "history", "target", "neg", "stratum", "seen_rows", "seen_items", "candidates")))


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list<int> column."""
    col = table.column(name).combine_chunks()
    if isinstance(col, pa.ChunkedArray):  # empty table
        col = pa.array([], type=table.schema.field(name).type)
    offsets = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    start = offsets[0]
    return values[start : offsets[-1]], offsets - start


def _left_pad(values: np.ndarray, offsets: np.ndarray, width: int) -> np.ndarray:
    """Ragged rows -> [n, width] matrix, right-aligned (keeps the last ``width`` items)."""
    n = len(offsets) - 1
    out = np.zeros((n, width), dtype=np.int64)
    lengths = np.diff(offsets)
    for i in range(n):  # n is one worker's shard of users: cheap next to training
        k = min(int(lengths[i]), width)
        if k:
            out[i, width - k :] = values[offsets[i + 1] - k : offsets[i + 1]]
    return out


class TrainRows:
    """One rank's training rows, held as padded tensors and addressed by global sample id.

    Placement (``device``, ``budget_mb``): the rows live on ``device`` when they take at most
    ``budget_mb`` there (``resident``); a batch is then gathered on the device. Otherwise they stay
    in host memory (pinned when the device is CUDA) and each gathered batch is copied with
    ``non_blocking=True``; ``prefetched`` keeps one batch in flight so the copy overlaps the step.
    The batch sampler (``epoch_batches``, numpy ids) stays on the host either way."""

    def __init__(self, table: pa.Table, max_len: int, rank: int, world: int, num_negatives: int,
                 device: torch.device = torch.device("cpu"), budget_mb: float = float("inf")):
        table = table.sort_by("sample_id")
        self.rank, self.world, self.max_len = rank, world, max_len
        self.sample_id = torch.from_numpy(table.column("sample_id").to_numpy().astype(np.int64))
        expected = torch.arange(rank, rank + world * len(self.sample_id), world)[: len(self.sample_id)]
        if not torch.equal(self.sample_id, expected):
            raise ValueError(
                f"rank {rank}/{world}: training sample ids are not the dense residue class r mod W "
                "(was the training split written by `ray-pinet prepare`?)"
            )
        vals, offs = _list_column(table, "seq")
        seq = torch.from_numpy(_left_pad(vals, offs, max_len + 1))
        self.inputs, self.targets = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
        self.targets[self.inputs == 0] = 0  # a target without any history is not a sample
        # items per window, on the host: packing plans from it without reading the device
        self.lengths = (self.inputs != 0).sum(1).numpy()
        self.stratum = torch.from_numpy(table.column("stratum").to_numpy().astype(np.int64))
        n = len(self.sample_id)
        self.negs = torch.zeros((n, max_len, num_negatives), dtype=torch.int64)
        if num_negatives and "neg" in table.column_names:
            nvals, noffs = _list_column(table, "neg")
            lengths = np.diff(offs) - 1  # targets per row
            for i in range(n):
                t = int(lengths[i])
                if t <= 0:
                    continue
                avail = (noffs[i + 1] - noffs[i]) // t
                k = min(avail, num_negatives)
                block = nvals[noffs[i] : noffs[i] + t * avail].reshape(t, avail)[-max_len:, :k]
                self.negs[i, max_len - block.shape[0] :, :k] = torch.from_numpy(block)
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

    def global_ids_in_strata(self, strata: list[int], num_samples: int) -> np.ndarray:
        """Sorted global sample ids of the rows in ``strata``, the same array on every rank.
        Collective: one SUM all-reduce of an int64[N] indicator (8 bytes per training row,
        once per run)."""
        # on the collective device (nccl reduces CUDA tensors only)
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        stratum, sample_id = self.stratum.to(device), self.sample_id.to(device)
        flags = torch.zeros(num_samples, dtype=torch.int64, device=device)
        keep = torch.isin(stratum, torch.as_tensor(list(strata), dtype=torch.int64, device=device))
        flags[sample_id[keep]] = 1
        all_reduce_sum_(flags)
        return flags.nonzero().squeeze(1).cpu().numpy()

    def take(self, global_ids: torch.Tensor, packed: bool = False) -> TrainBatch:
        """This rank's rows of a global batch (host ids), as tensors on ``device``; ``packed``:
        its windows packed into rows without padding (training/packing.py)."""
        mine = global_ids[global_ids % self.world == self.rank]
        local = mine // self.world
        if packed:
            return self._packed(mine, local)
        if self.resident:
            idx = local.to(self.device, non_blocking=True)
            return TrainBatch(inputs=self.inputs[idx], targets=self.targets[idx], negs=self.negs[idx],
                              stratum=self.stratum[idx], sample_id=mine.to(self.device, non_blocking=True))
        pin = self.device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            # a gathered batch is a fresh (pageable) tensor: pinned again so the copy is async
            return (t.pin_memory() if pin else t).to(self.device, non_blocking=True)

        return TrainBatch(inputs=move(self.inputs[local]), targets=move(self.targets[local]),
                          negs=move(self.negs[local]), stratum=move(self.stratum[local]), sample_id=move(mine))

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
        inputs[dst] = self.inputs[src_row, src_col]
        targets[dst] = self.targets[src_row, src_col]
        segments[dst] = window
        if n_neg:
            negs[dst] = self.negs[src_row, src_col]
        out = TrainBatch(inputs=inputs.view(num_rows, width), targets=targets.view(num_rows, width),
                         negs=negs.view(num_rows, width, n_neg), stratum=self.stratum[local.to(device)],
                         sample_id=mine.to(device), segments=segments.view(num_rows, width))
        if self.resident:
            return out
        pin = self.device.type == "cuda"
        return TrainBatch(*((t.pin_memory() if pin else t).to(self.device, non_blocking=True)
                            for t in (out.inputs, out.targets, out.negs, out.stratum, out.sample_id,
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


def epoch_batches(
    num_samples: int, batch_size: int, seed: int, epoch: int, ids: Optional[np.ndarray] = None
) -> Iterator[torch.Tensor]:
    """Global batches of sample ids for one epoch; identical on every rank and for every W.
    ``ids``: visit only these global sample ids (sorted; e.g. one stratum's rows)."""
    order = np.random.default_rng([seed, PURPOSE_EPOCH_ORDER, epoch]).permutation(
        num_samples if ids is None else len(ids))
    if ids is not None:
        order = np.asarray(ids)[order]
    for start in range(0, len(order), batch_size):
        yield torch.from_numpy(order[start : start + batch_size].astype(np.int64))


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
