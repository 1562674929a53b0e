"""Training epochs of stage 1 (backbone, GA) and stage 2 (per-stratum plugins).

No Ray imports: these functions run identically in one process and on every Ray Train worker;
the only distributed calls are the collectives in ``ga_step``/``collectives`` (no-ops without a
process group).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ray_pinet.config import TrainConfig
from ray_pinet.methods.ga import batch_unit_counts, unit_losses
from ray_pinet.methods.losses import per_position_losses, valid_positions
from ray_pinet.methods.sampled_softmax import Candidates, NegativeSampler
from ray_pinet.training.batches import RowSubset, TrainRows, num_steps
from ray_pinet.training.collectives import all_reduce_sum_, rank_and_world
from ray_pinet.training.device import autocast
from ray_pinet.training.ga_step import GradReducer, ga_backward
from ray_pinet.training.sparse_rows import ITEM_TABLE, RowSparseTable


TIME_PARTS = ("data", "forward", "backward", "allreduce", "optimizer")


@dataclass
class EpochStats:
    loss: float = 0.0
    steps: int = 0
    rows: int = 0  # global training rows (user windows) seen
    positions: int = 0  # global target positions seen
    seconds: float = 0.0
    # Where an epoch's time went, summed over steps on this rank (seconds). ``allreduce`` is the
    # GA gradient collective (the count reduce, the flat-buffer reduce, writing p.grad back);
    # transfer puts its whole inner loop under forward+backward and the outer reduce+update
    # under allreduce.
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


def prior_settings(
    cfg: TrainConfig, method: str, user_share: Sequence[float], interaction_share: Sequence[float]
) -> tuple[str, float, list[float]]:
    """(prior kind, alpha, per-stratum shares) of ``ga_backward`` for a method's stage 1.

    ``joint`` (and the per-stratum baselines, which are joint runs on one stratum's rows) is GA
    with the interaction_share prior: the pooled mean over units. ``reweight`` is the pooled
    mean with static per-stratum weights r_s = (n_s / C_s)^power: π_s ∝ N_s · r_s (ga_step).
    """
    if method == "reweight":
        r = [(n / c) ** cfg.reweight.power if c > 0 else 0.0 for n, c in zip(user_share, interaction_share)]
        return "reweight", 0.0, r
    if method == "pinet":
        return cfg.ga.prior, cfg.ga.alpha, list(user_share)
    return "interaction_share", 0.0, list(user_share)


def _item_table(model: torch.nn.Module) -> torch.nn.Parameter | None:
    return dict(model.named_parameters()).get(ITEM_TABLE)


def item_optimizers(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], cfg: TrainConfig,
                    lr: float) -> list[torch.optim.Optimizer]:
    """Adam over ``params``; with ``optim.item_exchange=rows``, the item table among them is
    stepped by lazy Adam (``SparseAdam``: touched rows only) and Adam takes the rest."""
    table = _item_table(model)
    if cfg.optim.item_exchange != "rows" or not any(p is table for p in params):
        return [torch.optim.Adam(params, lr=lr, weight_decay=cfg.optim.weight_decay)]
    rest = [p for p in params if p is not table]
    return [torch.optim.Adam(rest, lr=lr, weight_decay=cfg.optim.weight_decay),
            torch.optim.SparseAdam([table], lr=lr)]


def run_epoch(
    model: torch.nn.Module,
    params: Sequence[torch.nn.Parameter],
    optimizers: Sequence[torch.optim.Optimizer],
    rows: TrainRows,
    num_samples: int,
    cfg: TrainConfig,
    epoch: int,
    num_strata: int,
    user_share: Sequence[float],
    prior_kind: str,
    alpha: float,
    use_plugins: bool,
    after_backward: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    ids: Optional[RowSubset] = None,
    sampler: Optional[NegativeSampler] = None,
) -> EpochStats:
    """One pass over the global batches (of ``ids`` only, when given). ``after_backward(counts, prior)`` may rescale or
    zero gradients (stage 2 per-plugin normalisation) before the optimizer steps. ``sampler``: the
    shared candidates of each step (needed by ``loss: sampled_softmax``)."""
    if (cfg.loss == "sampled_softmax") != (sampler is not None):
        raise ValueError(f"loss {cfg.loss!r}: a NegativeSampler is passed exactly for sampled_softmax")
    model.train()
    stats = EpochStats()
    t_epoch = time.perf_counter()
    steps = num_steps(num_samples if ids is None else ids.total, cfg.optim.batch_size)
    device = params[0].device if len(params) else torch.device("cpu")
    # Per-step statistics accumulate on the device and are read once, after the epoch: a read
    # per step (.item(), float()) would stall the GPU stream every step. float64 sums of the
    # same float32 terms in the same order give the numbers the host sums gave.
    unit_totals = torch.zeros(num_strata, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    # Dropout masks come from the rank's own generator, re-seeded per (seed, epoch, rank) so a
    # resumed run replays the same masks.
    rank, _ = rank_and_world()
    torch.manual_seed((cfg.run.seed * 1_000_003 + epoch * 1_009 + rank) % (2**31))
    # The item table, when a lazy optimizer steps it (item_optimizers, optim.item_exchange=rows),
    # leaves the dense reducer and crosses workers by touched rows (training/sparse_rows.py).
    table = RowSparseTable(model) if any(isinstance(o, torch.optim.SparseAdam) for o in optimizers) else None
    dense = table.dense_params(params) if table is not None else list(params)
    # One reducer per epoch: its hooks live only as long as this loop.
    reducer = GradReducer(dense, num_strata, cfg.ga.bucket_cap_mb) if cfg.ga.reduce == "loss_weighted" else None
    try:
        # (the loop variable must not be ``ids``: stats.rows below reads the argument)
        batches = rows.prefetched(rows.epoch_batches(cfg.optim.batch_size, cfg.run.seed, epoch, ids),
                                  packed=cfg.packed)
        for step in range(steps):
            t_data = time.perf_counter()
            batch = next(batches)
            t0 = time.perf_counter()
            n_local = len(batch)
            candidates = None
            if sampler is not None:  # every rank, every step: in-batch negatives are a collective
                mine = batch.targets[valid_positions(batch.inputs, batch.targets)] if sampler.in_batch else None
                candidates = sampler.candidates(epoch, step, mine, device)
            if reducer is not None:  # the count all-reduce runs while the model computes
                reducer.start_counts(
                    batch_unit_counts(batch.inputs, batch.targets, batch.stratum, cfg.ga.unit, num_strata,
                                      batch.segments))
            items = (batch.inputs, batch.targets, batch.negs)
            if table is not None:  # every rank, every step: the exchange below is a collective
                override, renumbered = table.begin(list(items) + ([candidates.items] if candidates else []))
                items = tuple(renumbered[:3])
                if candidates is not None:
                    candidates = Candidates(renumbered[3], candidates.log_count)
            if n_local:
                with autocast(device, cfg.run.precision):
                    args = (*items, batch.stratum if use_plugins else None, cfg.loss)
                    kwargs = {"segments": batch.segments, "candidates": candidates}
                    if table is None:
                        loss_vec, row_index = per_position_losses(model, *args, **kwargs)
                    else:
                        loss_vec, row_index = table.call(override, per_position_losses, *args, **kwargs)
                loss_vec = loss_vec.float()  # the loss and its GA weights stay fp32 (no-op in fp32)
            else:
                loss_vec = torch.zeros(0, device=device)
                row_index = torch.zeros(0, dtype=torch.int64, device=device)
            unit_loss, unit_row = unit_losses(loss_vec, row_index, n_local, cfg.ga.unit)
            unit_strata = batch.stratum[unit_row] if n_local else torch.zeros(0, dtype=torch.int64, device=device)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            t_fwd = time.perf_counter()
            if reducer is not None:
                info = reducer.backward(unit_loss, unit_strata, prior_kind, user_share, alpha,
                                        extra_inputs=[table.sub] if table is not None else ())
                if table is not None:
                    table.exchange()
            else:
                info = ga_backward(params, unit_loss, unit_strata, num_strata, prior_kind, user_share, alpha,
                                   cfg.ga.reduce)
            t1 = time.perf_counter()
            if after_backward is not None:
                after_backward(info.global_counts, info.prior)
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            for opt in optimizers:
                opt.step()
            t2 = time.perf_counter()
            loss_sum += info.loss
            stats.steps += 1
            unit_totals += info.global_counts
            stats.positions += int(loss_vec.numel())
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
    stats.rows = num_samples if ids is None else ids.total
    stats.stratum_units = unit_totals.tolist()
    stats.seconds = time.perf_counter() - t_epoch
    return stats
