"""The two-tower methods (``model.method``), each one named object registered once in ``METHODS``:
what ``training/twotower_loop.TwoTowerRun`` asks (the interface is ``TwoTowerMethod``) instead of
comparing method names.

The loss functions read the run's rows, sampler and model, so they keep the loop's exactness rules
(module doc there): every sum is over this rank's rows of the global batch and divided by the global
batch size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ray_pinet.methods.denoising import bce_rows, drop_rate_at, idl_rows, reweighted_rows, truncation_keep
from ray_pinet.methods.needs import TWOTOWER_NEEDS
from ray_pinet.methods.onebp import ema_update_, infonce_losses
from ray_pinet.models.mf import MF
from ray_pinet.models.ncf import NCF
from ray_pinet.training.collectives import all_gather_rows, all_reduce_sum_, is_distributed
from ray_pinet.training.inverse_gradient import ig_epoch
from ray_pinet.twotower_config import TWOTOWER_METHODS, TwoTowerModel

Rows = list[tuple[torch.Tensor, torch.Tensor]]  # (users, positives) of the epoch's batches so far


def zero_loss(run) -> torch.Tensor:
    """0, with a graph to every trainable parameter: a rank without rows of a batch still takes
    part in the backward and sends its (zero) gradient to the all-reduce."""
    return sum(p.sum() * 0.0 for p in run.params)


class TwoTowerMethod:
    """The interface, with TwoBP's answers: MF on implicit positives, ``model.num_negatives``
    sampled negatives per positive, InfoNCE, both towers trained by backprop and replicated on
    every rank. The other methods override what differs."""

    name: str
    # What it trains on and samples: its entry of the needs table, which the config checks too.
    labeled = property(lambda self: TWOTOWER_NEEDS[self.name].labeled)
    negatives = property(lambda self: TWOTOWER_NEEDS[self.name].negatives)
    second_metric = "p@10"  # printed beside NDCG@10 on each evaluated epoch

    def model(self, num_users: int, num_items: int, m: TwoTowerModel) -> torch.nn.Module:
        return MF(num_users, num_items, m.dim)

    def row_losses(self, s_pos: torch.Tensor, s_neg: torch.Tensor, m: TwoTowerModel) -> torch.Tensor:
        """Float[B] from the positive Float[B] and negative Float[B, N] scores."""
        return infonce_losses(s_pos, s_neg, m.temperature)

    def batch_loss(self, run, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Σ of this rank's row losses of the global batch ``ids`` / its length, this rank's
        users, their positive items)."""
        mine, users, pos = run.rows["train"].take(ids)
        if len(users) == 0:
            return zero_loss(run) / len(ids), users, pos
        neg = run.sampler(run.model, users, mine, run.epoch)
        with run.autocast():
            u = run.model.user(users)
            s_pos = (u * run.model.item(pos)).sum(-1)
            s_neg = (u.unsqueeze(1) * run.model.item(neg)).sum(-1)
        return self.row_losses(s_pos.float(), s_neg.float(), run.cfg.model).sum() / len(ids), users, pos

    def after_step(self, run, users: torch.Tensor, pos: torch.Tensor, seen: Rows) -> None:
        """After each optimizer step, with the batch's rows of this rank."""

    def after_epoch(self, run, seen: Rows) -> None:
        """After the epoch's last step, with what ``after_step`` kept in ``seen``."""

    def epoch(self, run) -> dict[str, float]:
        """One training epoch: the loop's ``sgd_epoch`` over ``batch_loss``."""
        return run.sgd_epoch()

    def tables(self, run) -> dict[str, Any]:
        """The trained tables of a checkpoint as one process holds them (replicated: this rank's)."""
        return {k: getattr(run.model, k).weight.detach().clone() for k in ("user", "item")}


class TwoBP(TwoTowerMethod):
    name = "twobp"


class OneBP(TwoTowerMethod):
    """TwoBP's item tower and loss; the user tower is a buffer that the moving aggregation
    u ← β·u + (1−β)·v⁺ writes after each step (``model.ema_granularity=batch``, as coded) or once
    per epoch (``epoch``). A user's rows all live on its rank, so its row is current only there."""

    name = "onebp"

    def model(self, num_users: int, num_items: int, m: TwoTowerModel) -> torch.nn.Module:
        model = MF(num_users, num_items, m.dim)
        model.user.weight.requires_grad_(False)
        return model

    def after_step(self, run, users: torch.Tensor, pos: torch.Tensor, seen: Rows) -> None:
        m = run.cfg.model
        if m.ema_granularity == "batch":
            ema_update_(run.model.user.weight, users, run.model.item.weight[pos], m.beta, m.duplicate_rule)
        else:
            seen.append((users, pos))

    def after_epoch(self, run, seen: Rows) -> None:
        if seen:  # one step per user per epoch, from the end-of-epoch item table, rows in epoch order
            m = run.cfg.model
            users, pos = torch.cat([u for u, _ in seen]), torch.cat([p for _, p in seen])
            ema_update_(run.model.user.weight, users, run.model.item.weight[pos], m.beta, m.duplicate_rule)

    def tables(self, run) -> dict[str, Any]:
        """Each rank's user rows are current only for its own users: the owned rows summed across
        ranks (a collective)."""
        tables = super().tables(run)
        if is_distributed():
            tables["user"][torch.arange(run.num_users, device=run.device) % run.world != run.rank] = 0.0
            all_reduce_sum_(tables["user"])
        return tables


class BPR(TwoTowerMethod):
    """MF-BPR: one negative per positive (``uniform`` RNS or ``auc_ns``), softplus(s⁻ − s⁺)."""

    name = "bpr"

    def row_losses(self, s_pos: torch.Tensor, s_neg: torch.Tensor, m: TwoTowerModel) -> torch.Tensor:
        return F.softplus(s_neg - s_pos.unsqueeze(1)).mean(1)


class NCFMethod(TwoTowerMethod):
    """GMF / NeuMF on labeled rows plus one sampled unlabeled item per row (2·B rows a batch),
    trained with ``model.loss``; ``ig`` replaces the SGD epoch by Inverse Gradient's meta-step.
    Every parameter is all-reduce trained, so the whole model is the state."""

    name = "ncf"
    second_metric = "auc"

    def model(self, num_users: int, num_items: int, m: TwoTowerModel) -> torch.nn.Module:
        return NCF(num_users, num_items, m.dim, m.backbone, m.num_layers, m.dropout)

    def batch_loss(self, run, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        held, mine, users, items, labels = run.rows["train"].take_labeled(ids)
        return _ncf_loss_sum(run, ids, held, mine, users, items, labels) / (2 * len(ids)), users, items

    def epoch(self, run) -> dict[str, float]:
        return ig_epoch(run) if run.cfg.model.loss == "ig" else run.sgd_epoch()

    def tables(self, run) -> dict[str, Any]:
        return {"model": {k: v.detach().clone() for k, v in run.model.state_dict().items()}}


def _ncf_loss_sum(run, ids, held, mine, users, items, labels) -> torch.Tensor:
    """Σ over this rank's labeled rows of the global batch ``ids`` and one sampled unlabeled item
    per row of the ``model.loss`` terms (the caller divides by 2·B)."""
    m = run.cfg.model
    if m.loss != "tce" and len(users) == 0:
        return zero_loss(run)
    unlabeled = run.sampler(run.model, users, mine, run.epoch)[:, 0] if len(users) else users
    with run.autocast():
        s_l, s_u = run.model(users, items), run.model(users, unlabeled)
    s_l, s_u = s_l.float(), s_u.float()  # losses in fp32 under bf16
    zeros = torch.zeros_like(labels)
    if m.loss == "idl":
        return bce_rows(s_l, labels).sum() + idl_rows(s_u).sum()
    if m.loss == "rce":
        return reweighted_rows(s_l, labels, m.rce_alpha).sum() + reweighted_rows(s_u, zeros, m.rce_alpha).sum()
    rows_l, rows_u = bce_rows(s_l, labels), bce_rows(s_u, zeros)
    if m.loss == "bce":
        return rows_l.sum() + rows_u.sum()
    # tce: one truncation over the 2B rows of the *global* batch (gathered loss·y); ties by the
    # row's place in the batch (labeled rows first, then their sampled items)
    place = torch.nonzero(held).squeeze(1)
    keys = torch.cat([place, place + len(ids)]).to(torch.float64)
    losses = torch.cat([rows_l, rows_u])
    both = torch.cat([labels, zeros]).to(torch.float64)
    gathered = all_gather_rows(torch.stack([keys, losses.detach().to(torch.float64) * both], 1))
    gathered = gathered[gathered[:, 0].argsort()]
    keep = truncation_keep(gathered[:, 1], torch.ones(len(gathered), device=gathered.device),
                           drop_rate_at(run.step, m.tce_drop_rate, m.tce_num_gradual))
    kept = losses[torch.isin(keys, gathered[keep, 0])]
    # as coded, the mean over the kept rows: the caller's 1/(2B) times 2B / #kept
    return kept.sum() * (len(gathered) / max(int(keep.sum()), 1)) + zero_loss(run)


METHODS: dict[str, TwoTowerMethod] = {m.name: m for m in (OneBP(), TwoBP(), BPR(), NCFMethod())}
assert tuple(METHODS) == TWOTOWER_METHODS == tuple(TWOTOWER_NEEDS), \
    "the registry, the needs table and the config's Literal name the same methods"
