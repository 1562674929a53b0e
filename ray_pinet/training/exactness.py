"""Self-check: W Ray Train workers compute exactly what one process computes.

``check(num_workers)`` runs, on a real ``TorchTrainer`` with gloo, (1) the GA gradient of a fixed model on a
fixed global batch for every prior and both reduce modes, and (2) one full training epoch; every rank reads
only its block of sample ids from Parquet files through the production reader (``shards.read_shard``: several
files, small row groups). The same quantities are then computed in this process, without any process group,
and compared. Used by the test suite and available to users on their own cluster (``ray-pinet check``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import torch

from ray_pinet.checkpoint_io import load_weights, save_weights
from ray_pinet.config import TrainConfig
from ray_pinet.config_base import set_dotted
from ray_pinet.methods.ga import Prior, unit_losses
from ray_pinet.methods.losses import per_position_losses
from ray_pinet.methods.sampled_softmax import NegativeSampler
from ray_pinet.methods.transfer import Discriminator
from ray_pinet.models.registry import build_model
from ray_pinet.training.batches import TrainRows
from ray_pinet.training.collectives import all_reduce_sum_, flatten_grads, rank_and_world
from ray_pinet.training.ga_step import ga_backward
from ray_pinet.training.loop import EpochSetup, run_epoch
from ray_pinet.training.shards import read_shard, shard_range
from ray_pinet.training.transfer_epoch import transfer_epoch

VARIANTS = [
    (prior, alpha, reduce, unit)
    for prior, alpha in (("user_share", 0.0), ("uniform", 0.0), ("interaction_share", 0.0), ("power", 0.5),
                         ("power", -1.0), ("reweight", 0.0))
    for reduce in ("loss_weighted", "stratum_sums")
    for unit in ("position", "user")
]


@dataclass
class Problem:
    num_rows: int = 96
    num_items: int = 60
    max_len: int = 8
    num_strata: int = 2
    seed: int = 3
    loss: str = "ce"
    backbone: str = "sasrec"


def synthetic_eval_table(p: Problem, seed: int) -> pa.Table:
    """Random validation/test rows (history, target, one negative, seen items) for ``p``."""
    rng = np.random.default_rng(seed)
    hist, tgt, neg, seen, strata = [], [], [], [], []
    for u in range(p.num_rows):
        h = rng.integers(1, p.num_items + 1, size=int(rng.integers(1, p.max_len + 1))).tolist()
        hist.append(h)
        seen.append(sorted(set(h)))
        tgt.append(int(rng.integers(1, p.num_items + 1)))
        neg.append(int(rng.integers(1, p.num_items + 1)))
        strata.append(int(len(h) > p.max_len // 2))
    return pa.table({
        "sample_id": pa.array(np.arange(p.num_rows), pa.int64()),
        "user_idx": pa.array(np.arange(p.num_rows), pa.int64()),
        "stratum": pa.array(strata, pa.int8()),
        "history": pa.array(hist, pa.list_(pa.int32())),
        "target": pa.array(tgt, pa.int32()),
        "neg": pa.array(neg, pa.int32()),
        "seen": pa.array(seen, pa.list_(pa.int32())),
    })


def synthetic_train_table(p: Problem, num_negatives: int = 2) -> pa.Table:
    """Random training windows with long-tailed lengths and a head/tail stratum column."""
    rng = np.random.default_rng(p.seed)
    seqs, negs, strata = [], [], []
    for i in range(p.num_rows):
        head = rng.random() < 0.3
        n = int(rng.integers(p.max_len // 2, p.max_len + 2)) if head else int(rng.integers(2, 5))
        n = min(n, p.max_len + 1)
        seq = rng.integers(1, p.num_items + 1, size=n).astype(np.int32)
        seqs.append(seq.tolist())
        negs.append(rng.integers(1, p.num_items + 1, size=(n - 1) * num_negatives).astype(np.int32).tolist())
        strata.append(int(head) if p.num_strata == 2 else int(rng.integers(0, p.num_strata)))
    return pa.table({
        "sample_id": pa.array(np.arange(p.num_rows), pa.int64()),
        "user_idx": pa.array(np.arange(p.num_rows), pa.int64()),
        "stratum": pa.array(strata, pa.int8()),
        "seq": pa.array(seqs, pa.list_(pa.int32())),
        "neg": pa.array(negs, pa.list_(pa.int32())),
    })


def _cfg(p: Problem, overrides: Optional[dict] = None) -> TrainConfig:
    """A small model config; ``overrides`` are dotted keys ("optim.lr") or top-level ("method")."""
    d: dict[str, Any] = {
        "loss": p.loss,
        "model": {"backbone": p.backbone, "dim": 16, "num_blocks": 1, "dropout": 0.0, "max_len": p.max_len},
        "optim": {"batch_size": 32, "lr": 1e-2},
        "run": {"seed": p.seed},
    }
    if p.backbone == "din":
        d["eval"] = {"candidates": 5}
    for k, v in (overrides or {}).items():
        set_dotted(d, k, v)
    return TrainConfig.from_dict(d)


def _model(p: Problem, cfg: TrainConfig):
    torch.manual_seed(p.seed)
    model = build_model(cfg.model, p.num_items, p.num_strata, None)
    model.use_plugins = False
    return model


def write_train_split(p: Problem, root: str | os.PathLike, files: int = 3, row_group_rows: int = 7) -> str:
    """The problem's training table as ``root/train/part-*.parquet`` (``files`` files in id order,
    row groups of ``row_group_rows``), the layout ``shards.read_shard`` reads; returns ``root``."""
    import pyarrow.parquet as pq

    table = synthetic_train_table(p)
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    cuts = np.linspace(0, table.num_rows, files + 1).astype(int)
    for k in range(files):
        pq.write_table(table.slice(cuts[k], cuts[k + 1] - cuts[k]),
                       os.path.join(root, "train", f"part-{k:05d}.parquet"), row_group_size=row_group_rows)
    return str(root)


def shard(table: pa.Table, rank: int, world: int) -> pa.Table:
    """Rank's block of an in-memory table (``shards.shard_range``), for tests without files."""
    lo, hi = shard_range(table.num_rows, rank, world)
    return table.sort_by("sample_id").slice(lo, hi - lo)


def variant_prior(p: Problem, kind: str, alpha: float) -> Prior:
    """A VARIANTS prior; ``reweight`` takes the user shares as its static stratum weights."""
    share = (1.0 / p.num_strata,) * p.num_strata if p.num_strata != 2 else (0.8, 0.2)
    return Prior(kind, alpha, share, share if kind == "reweight" else ())


def epoch_setup(p: Problem, model, params, optimizers, rows: TrainRows, cfg: TrainConfig, prior: Prior,
                **kwargs) -> EpochSetup:
    """A stage-1 ``run_epoch`` setup over every row of ``p``."""
    return EpochSetup(model, params, optimizers, rows, p.num_rows, cfg, p.num_strata, prior, **kwargs)


def _flat(params) -> torch.Tensor:
    return torch.cat([q.detach().reshape(-1) for q in params]).clone()


def _rows_exchange_opts(model, params, cfg: TrainConfig) -> list:
    """optim.item_exchange=rows: the item table crosses ranks by touched rows (sparse_rows.py) and
    lazy Adam steps those rows; SGD for the rest."""
    table = model.backbone.item_emb.weight
    return [torch.optim.SGD([q for q in params if q is not table], lr=0.5),
            torch.optim.SparseAdam([table], lr=cfg.optim.lr)]


def _epoch_params(p: Problem, rows: TrainRows, cfg: TrainConfig, prior: Prior, make_opts=None,
                  **kwargs) -> torch.Tensor:
    """The backbone's parameters, flat, after one stage-1 epoch from ``_model``'s init, stepped by
    ``make_opts(model, params, cfg)`` (default: SGD, lr 0.5)."""
    model = _model(p, cfg)
    params = list(model.backbone_parameters())
    opts = make_opts(model, params, cfg) if make_opts else [torch.optim.SGD(params, lr=0.5)]
    if cfg.loss == "sampled_softmax":
        kwargs["sampler"] = NegativeSampler.from_config(rows, p.num_items, cfg)
    run_epoch(epoch_setup(p, model, params, opts, rows, cfg, prior, **kwargs), 0)
    return _flat(params)


def _ga_gradients(p: Problem, rows: TrainRows) -> dict[str, torch.Tensor]:
    """The GA gradient of one global batch (every row) for every VARIANTS entry ("grad/..."), and
    from packed batches (training/packing.py) for the backbone that supports them ("grad_packed/...")."""
    out: dict[str, torch.Tensor] = {}
    cfg = _cfg(p)
    global_ids = torch.arange(p.num_rows)
    layouts = [("grad", False)] + ([("grad_packed", True)] if p.backbone == "sasrec" else [])
    for key, packed in layouts:
        batch = rows.take(global_ids, packed=packed)
        for prior, alpha, reduce, unit in VARIANTS:
            model = _model(p, cfg)
            params = list(model.backbone_parameters())
            loss_vec, row_index = per_position_losses(model, batch.inputs, batch.targets, batch.negs, None,
                                                      p.loss, segments=batch.segments)
            ul, ur = unit_losses(loss_vec, row_index, len(batch), unit)
            ga_backward(params, ul, batch.stratum[ur], p.num_strata, variant_prior(p, prior, alpha), reduce)
            out[f"{key}/{prior}/{alpha}/{reduce}/{unit}"] = flatten_grads(params).clone()
    return out


def compute(p: Problem, root: str) -> dict[str, torch.Tensor]:
    """Every checked quantity for this rank (or for one process when there is no group), the
    training rows read from ``root`` (``write_train_split``) as production reads them."""
    rank, world = rank_and_world()
    local, num_rows = read_shard(Path(root), "train", rank, world)
    assert num_rows == p.num_rows
    rows = TrainRows(local, p.max_len, p.num_rows, 2 if p.loss == "bce" else 0)
    out = _ga_gradients(p, rows)
    # One full epoch (several global batches) from the same init, GA power prior, with SGD and
    # with Adam; with optim.batching auto (packed for sasrec) and, for sasrec, padded as well.
    # Tiny buckets: the reducer all-reduces several buckets while the backward runs.
    ga = {"ga.prior": "power", "ga.alpha": 0.5, "ga.bucket_cap_mb": 0.002}
    cfg = _cfg(p, ga)
    power, pooled = variant_prior(p, "power", 0.5), Prior("interaction_share")
    adam = lambda model, params, cfg: [torch.optim.Adam(params, lr=cfg.optim.lr)]
    out["epoch_params/sgd"] = _epoch_params(p, rows, cfg, power)
    out["epoch_params/adam"] = _epoch_params(p, rows, cfg, power, adam)
    if p.backbone == "sasrec":
        out["epoch_params/adam_padded"] = _epoch_params(p, rows, _cfg(p, {**ga, "optim.batching": "padded"}),
                                                        power, adam)
    # loss sampled_softmax: keyed shared negatives (the proposal's counts all-reduced) and, with
    # in_batch, the global batch's targets gathered from every rank; packed rows (auto) and padded.
    # SGD: the negatives leave many item rows with exactly zero gradient (Adam: see the test).
    if p.backbone != "din":
        for name, extra in (("sampled_softmax", {"sampled.in_batch": True}),
                            ("sampled_softmax_uniform_padded", {"sampled.proposal": "uniform",
                                                                "optim.batching": "padded"})):
            cfg = _cfg(p, {"loss": "sampled_softmax", "sampled.num_negatives": 16, "ga.prior": "power",
                           "ga.alpha": 0.5, **extra})
            out[f"epoch_params/{name}"] = _epoch_params(p, rows, cfg, power)
        cfg = _cfg(p, {"loss": "sampled_softmax", "sampled.num_negatives": 16, "sampled.in_batch": True,
                       "optim.item_exchange": "rows"})
        out["epoch_params/sampled_softmax_rows"] = _epoch_params(p, rows, cfg, pooled, _rows_exchange_opts)
    # `separate` / `finetune`: an epoch over one stratum's rows only (ids shared by all-reduce).
    ids = rows.subset([p.num_strata - 1])
    # the whole subset, gathered for the check (every rank's ids, in rank order)
    gathered = torch.zeros(p.num_rows, dtype=torch.int64)
    gathered[torch.from_numpy(ids.local_ids)] = 1
    out["stratum_ids"] = all_reduce_sum_(gathered).nonzero().squeeze(1)
    out["stratum_offset_total"] = torch.tensor([ids.total], dtype=torch.int64)
    out["epoch_params/one_stratum"] = _epoch_params(p, rows, _cfg(p), pooled, ids=ids)
    # `transfer`: one epoch of Reptile + adversarial discriminator (inner Adam per trajectory).
    cfg = _cfg(p, {"method": "transfer", "transfer.trajectories": 2, "transfer.inner_steps": 3,
                   "transfer.users_per_task": 2})
    model = _model(p, cfg)
    torch.manual_seed(p.seed + 1)
    disc = Discriminator(cfg.model.dim, p.num_strata)
    transfer_epoch(model, disc, rows, p.num_rows, cfg, 0)
    out["epoch_params/transfer"] = _flat(list(model.backbone_parameters()) + list(disc.parameters()))
    return out


def _worker(config: dict) -> None:
    import ray.train

    torch.set_num_threads(1)
    p = Problem(**config["problem"])
    # Each worker writes the (seeded, identical) files itself: a driver's temp folder is not on
    # the other nodes of a user's cluster (``ray-pinet check``).
    root = tempfile.mkdtemp(prefix="ray-pinet-exact-data-")
    try:
        out = compute(p, write_train_split(p, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ctx = ray.train.get_context()
    if ctx.get_world_rank() == 0:
        d = tempfile.mkdtemp(prefix="ray-pinet-exact-")
        try:
            save_weights(out, os.path.join(d, "out.pt"))
            ray.train.report({"done": 1.0}, checkpoint=ray.train.Checkpoint.from_directory(d))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        ray.train.report({"done": 1.0})


def run_distributed(p: Problem, num_workers: int, storage_path: str, name: str = "exactness") -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"problem": p.__dict__},
        torch_config=TorchConfig(backend="gloo", timeout_s=120),
        scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": 0.5}),
        run_config=RunConfig(name=name, storage_path=storage_path),
    )

    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        return load_weights(os.path.join(d, "out.pt"))


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))
