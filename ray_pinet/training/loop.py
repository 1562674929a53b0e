"""Training epochs of stage 1 (backbone, GA) and stage 2 (per-stratum plugins).

No Ray imports: these functions run identically in one process and on every Ray Train worker; the only
distributed calls are the collectives in ``ga_step``/``collectives`` (no-ops without a process group).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ray_pinet.config import TrainConfig
from ray_pinet.methods.ga import Prior, batch_unit_counts, unit_losses
from ray_pinet.methods.losses import per_position_losses, valid_positions
from ray_pinet.methods.sampled_softmax import Candidates, NegativeSampler
from ray_pinet.training.batches import RowSubset, TrainRows, num_steps
from ray_pinet.training.collectives import all_reduce_sum_, rank_and_world
from ray_pinet.training.device import autocast
from ray_pinet.training.ga_step import GAStepInfo, GradReducer, ga_backward
from ray_pinet.training.sparse_rows import ITEM_TABLE, RowSparseTable

TIME_PARTS = ("data", "forward", "backward", "allreduce", "optimizer")


@dataclass
class EpochStats:
    loss: float = 0.0
    steps: int = 0
    rows: int = 0  # global training rows (user windows) seen
    positions: int = 0  # global target positions seen
    seconds: float = 0.0
    # Where an epoch's time went, summed over steps on this rank (seconds). ``allreduce`` is the GA gradient
    # collective (the count reduce, the flat-buffer reduce, writing p.grad back); transfer puts its whole
    # inner loop under forward+backward and the outer reduce+update under allreduce.
    time_data: float = 0.0  # building the batch tensors (rows.take)
    time_forward: float = 0.0
    time_backward: float = 0.0
    time_allreduce: float = 0.0
    time_optimizer: float = 0.0  # clipping, stage-2 rescaling, optimizer.step
    stratum_units: list[float] = field(default_factory=list)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        s = max(self.seconds, 1e-9)
        return {
            f"{prefix}/loss": self.loss / max(self.steps, 1),
            f"{prefix}/rows_per_s": self.rows / s,
            f"{prefix}/positions_per_s": self.positions / s,
            f"{prefix}/epoch_seconds": self.seconds,
            **{f"{prefix}/time_{part}_s": getattr(self, f"time_{part}") for part in TIME_PARTS},
        }


def item_optimizers(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], cfg: TrainConfig,
                    lr: float) -> list[torch.optim.Optimizer]:
    """Adam over ``params``; with ``optim.item_exchange=rows``, the item table among them is
    stepped by lazy Adam (``SparseAdam``: touched rows only) and Adam takes the rest."""
    table = dict(model.named_parameters()).get(ITEM_TABLE)
    if cfg.optim.item_exchange != "rows" or not any(p is table for p in params):
        return [torch.optim.Adam(params, lr=lr, weight_decay=cfg.optim.weight_decay)]
    rest = [p for p in params if p is not table]
    return [torch.optim.Adam(rest, lr=lr, weight_decay=cfg.optim.weight_decay),
            torch.optim.SparseAdam([table], lr=lr)]


@dataclass
class EpochSetup:
    """What stays the same across the epochs of one stage: ``run_epoch``'s inputs besides the
    epoch number. ``ids``: train on these rows only (None = every row); ``sampler``: the shared
    candidates of each step (exactly for ``loss: sampled_softmax``)."""

    model: torch.nn.Module
    params: Sequence[torch.nn.Parameter]
    optimizers: Sequence[torch.optim.Optimizer]
    rows: TrainRows
    num_samples: int
    cfg: TrainConfig
    num_strata: int
    prior: Prior
    use_plugins: bool = False
    ids: Optional[RowSubset] = None
    sampler: Optional[NegativeSampler] = None


def run_epoch(setup: EpochSetup, epoch: int,
              progress: Optional[Callable[[int, int], None]] = None) -> EpochStats:
    """One pass over the global batches (of ``setup.ids`` only, when given): per step the GA
    gradient of ``setup.prior``, clipping, then every optimizer steps."""
    cfg, params, optimizers = setup.cfg, setup.params, setup.optimizers
    if (cfg.loss == "sampled_softmax") != (setup.sampler is not None):
        raise ValueError(f"loss {cfg.loss!r}: a NegativeSampler is passed exactly for sampled_softmax")
    setup.model.train()
    stats = EpochStats()
    t_epoch = time.perf_counter()
    num_rows = setup.num_samples if setup.ids is None else setup.ids.total
    steps = num_steps(num_rows, cfg.optim.batch_size)
    device = params[0].device if len(params) else torch.device("cpu")
    # Per-step statistics accumulate on the device and are read once, after the epoch: a read
    # per step (.item(), float()) would stall the GPU stream every step. float64 sums of the
    # same float32 terms in the same order give the numbers the host sums gave.
    unit_totals = torch.zeros(setup.num_strata, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    # Dropout masks come from the rank's own generator, re-seeded per (seed, epoch, rank) so a
    # resumed run replays the same masks.
    rank, _ = rank_and_world()
    torch.manual_seed((cfg.run.seed * 1_000_003 + epoch * 1_009 + rank) % (2**31))
    # The item table, when a lazy optimizer steps it (item_optimizers, optim.item_exchange=rows),
    # leaves the dense reducer and crosses workers by touched rows (training/sparse_rows.py).
    lazy = any(isinstance(o, torch.optim.SparseAdam) for o in optimizers)
    table = RowSparseTable(setup.model) if lazy else None
    dense = table.dense_params(params) if table is not None else list(params)
    # One reducer per epoch: its hooks live only as long as this loop.
    reducer = (GradReducer(dense, setup.num_strata, cfg.ga.bucket_cap_mb)
               if cfg.ga.reduce == "loss_weighted" else None)
    try:
        batches = setup.rows.prefetched(
            setup.rows.epoch_batches(cfg.optim.batch_size, cfg.run.seed, epoch, setup.ids), packed=cfg.packed)
        for step in range(steps):
            t_data = time.perf_counter()
            batch = next(batches)
            t0 = time.perf_counter()
            unit_loss, unit_strata, positions = _forward(setup, batch, epoch, step, device, table, reducer)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            t_fwd = time.perf_counter()
            info = _ga_gradient(setup, unit_loss, unit_strata, table, reducer)
            t1 = time.perf_counter()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            for opt in optimizers:
                opt.step()
            t2 = time.perf_counter()
            loss_sum += info.loss
            stats.steps += 1
            unit_totals += info.global_counts
            stats.positions += positions
            stats.time_data += t0 - t_data
            stats.time_forward += t_fwd - t0
            stats.time_backward += info.backward_s
            stats.time_allreduce += (t1 - t_fwd) - info.backward_s
            stats.time_optimizer += t2 - t1
            if progress is not None:
                progress(step + 1, steps)
        if reducer is not None:
            reducer.check()
    finally:
        if reducer is not None:
            reducer.close()
    totals = all_reduce_sum_(torch.tensor([float(stats.positions)], dtype=torch.float64, device=device))
    stats.positions = int(totals[0])
    stats.loss = float(loss_sum)  # the epoch's one read of the device-side sums
    stats.rows = num_rows
    stats.stratum_units = unit_totals.tolist()
    stats.seconds = time.perf_counter() - t_epoch
    return stats


def _forward(setup: EpochSetup, batch, epoch: int, step: int, device: torch.device,
             table: Optional[RowSparseTable], reducer: Optional[GradReducer]):
    """The forward of one step: (unit losses, their strata, this rank's positions). Starts the
    collectives that run alongside it on every rank: in-batch negatives, the reducer's count
    all-reduce, the row exchange's renumbering."""
    cfg, n_local = setup.cfg, len(batch)
    candidates = None
    if setup.sampler is not None:  # every rank, every step: in-batch negatives are a collective
        mine = batch.targets[valid_positions(batch.inputs, batch.targets)] if setup.sampler.in_batch else None
        candidates = setup.sampler.candidates(epoch, step, mine, device)
    if reducer is not None:  # the count all-reduce runs while the model computes
        reducer.start_counts(batch_unit_counts(batch.inputs, batch.targets, batch.stratum, cfg.ga.unit,
                                               setup.num_strata, batch.segments))
    items = (batch.inputs, batch.targets, batch.negs)
    if table is not None:  # every rank, every step: the exchange below is a collective
        override, renumbered = table.begin(list(items) + ([candidates.items] if candidates else []))
        items = tuple(renumbered[:3])
        if candidates is not None:
            candidates = Candidates(renumbered[3], candidates.log_count)
    if n_local:
        with autocast(device, cfg.run.precision):
            args = (*items, batch.stratum if setup.use_plugins else None, cfg.loss)
            kwargs = {"segments": batch.segments, "candidates": candidates}
            if table is None:
                loss_vec, row_index = per_position_losses(setup.model, *args, **kwargs)
            else:
                loss_vec, row_index = table.call(override, per_position_losses, *args, **kwargs)
        loss_vec = loss_vec.float()  # the loss and its GA weights stay fp32 (no-op in fp32)
    else:
        loss_vec = torch.zeros(0, device=device)
        row_index = torch.zeros(0, dtype=torch.int64, device=device)
    unit_loss, unit_row = unit_losses(loss_vec, row_index, n_local, cfg.ga.unit)
    unit_strata = batch.stratum[unit_row] if n_local else torch.zeros(0, dtype=torch.int64, device=device)
    return unit_loss, unit_strata, int(loss_vec.numel())


def _ga_gradient(setup: EpochSetup, unit_loss: torch.Tensor, unit_strata: torch.Tensor,
                 table: Optional[RowSparseTable], reducer: Optional[GradReducer]) -> GAStepInfo:
    """Every parameter's ``.grad`` set to the global GA gradient (collective)."""
    if reducer is None:
        return ga_backward(setup.params, unit_loss, unit_strata, setup.num_strata, setup.prior,
                           setup.cfg.ga.reduce)
    info = reducer.backward(unit_loss, unit_strata, setup.prior,
                            extra_inputs=[table.sub] if table is not None else ())
    if table is not None:
        table.exchange()
    return info
