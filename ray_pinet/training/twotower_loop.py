"""The two-tower training loop of one rank (pure torch + ``collectives``; no Ray), so the same
code runs in one process and on W Ray Train workers (methods.md §6, "OneBP", "AUC-NS").

Sharding **by user**: rank r of W holds every row (train, valid, test) of the users with
``user % W == r``. Epoch e visits the training pairs in the global batches of ``epoch_batches``
(identical on every rank and for every W); each rank takes the rows of the batch that it holds,
in batch order. Hence:

* the loss of a global batch is Σ_local ℓ_k / B_global (B_global = the batch's length, known to
  every rank without communication); one SUM all-reduce of the flat gradient of the trainable
  tables gives every rank the single-process gradient, so the replicated item table (and, for
  ``twobp``/``bpr``, the user table) stays identical on every rank;
* a user's rows of a batch all live on one rank, so OneBP's per-user aggregation (and its
  duplicate rule) is computed where the user lives, from the replicated post-step item table,
  with no user-table traffic; the user rows a rank does not own are never read there;
* negatives are keyed draws of (seed, epoch, global sample id): the same for any W;
* metrics are per-user sums (``TopKStats``) of each rank's own users, SUM all-reduced.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ray_pinet.data.pairs import SPLITS, load_meta
from ray_pinet.evaluation.protocol import stratum_name
from ray_pinet.evaluation.topk import TopKStats, hot_items
from ray_pinet.methods.negative_sampling import AucNsConfig, NegativeSampler, UserItemSets, popularity_prior
from ray_pinet.methods.onebp import ema_update_, infonce_losses
from ray_pinet.models.mf import MF
from ray_pinet.training.batches import epoch_batches
from ray_pinet.training.collectives import (
    all_reduce_max_,
    all_reduce_sum_,
    assign_flat_grads_,
    flatten_grads,
    is_distributed,
)
from ray_pinet.twotower_config import TwoTowerConfig


@dataclass
class PairRows:
    """One split's rows of this rank's users, ordered by global sample id."""

    sample_id: torch.Tensor  # Long[n]
    user: torch.Tensor  # Long[n]
    item: torch.Tensor  # Long[n]

    def take(self, global_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample ids, users, items) of the rows of ``global_ids`` held here, in batch order."""
        pos = torch.searchsorted(self.sample_id, global_ids).clamp(max=max(len(self.sample_id) - 1, 0))
        held = self.sample_id[pos] == global_ids if len(self.sample_id) else torch.zeros_like(global_ids, dtype=torch.bool)
        pos = pos[held]
        return global_ids[held], self.user[pos], self.item[pos]


def read_pair_shard(path: str | Path, rank: int, world: int) -> dict[str, PairRows]:
    """Every split's rows of the users ``user % world == rank``."""
    out = {}
    for name in SPLITS:
        t = pq.read_table(Path(path) / f"{name}.parquet", columns=["sample_id", "user", "item"])
        users = t.column("user").to_numpy()
        keep = users % world == rank
        sid = torch.from_numpy(t.column("sample_id").to_numpy()[keep].astype(np.int64))
        order = torch.argsort(sid)
        out[name] = PairRows(sid[order], torch.from_numpy(users[keep].astype(np.int64))[order],
                             torch.from_numpy(t.column("item").to_numpy()[keep].astype(np.int64))[order])
    return out


def user_strata(path: str | Path) -> torch.Tensor:
    return torch.from_numpy(pq.read_table(Path(path) / "users.parquet", columns=["stratum"])
                            .column("stratum").to_numpy().astype(np.int64))


class TwoTowerRun:
    """Model, optimizer, sampler and the rank's data of one two-tower run (see module doc)."""

    def __init__(self, cfg: TwoTowerConfig, path: str | Path, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        meta = load_meta(path)
        self.num_users, self.num_items = int(meta["num_users"]), int(meta["num_items"])
        self.num_strata = int(meta["num_strata"])
        self.num_train = int(meta["rows"]["train"])
        self.rows = read_pair_shard(path, rank, world)
        self.stratum = user_strata(path)
        items = pq.read_table(Path(path) / "items.parquet", columns=["popularity", "train_count"])
        self.hot = hot_items(items.column("popularity").to_numpy().copy(), float(meta["hot_share"]))
        train_count = torch.from_numpy(items.column("train_count").to_numpy().astype(np.int64))
        tr = self.rows["train"]
        self.sets = UserItemSets.from_pairs(tr.user, tr.item, self.num_users, self.num_items)
        # The sampler's slot count depends on the smallest |I_u⁻| of *all* users: the same on
        # every rank only after a MAX all-reduce of the largest local |I_u⁺|.
        most = all_reduce_max_(torch.tensor([int(self.sets.pos_count(torch.arange(self.num_users)).max())]))
        self.sets.min_neg_count = self.num_items - int(most[0])
        m = cfg.model
        auc = AucNsConfig(m.auc_ns.num_extra, m.auc_ns.num_candidates, m.auc_ns.alpha, m.auc_ns.beta,
                          m.auc_ns.gamma, m.auc_ns.cdf_mode, m.auc_ns.cdf_samples)
        num = 1 if m.method == "bpr" else m.num_negatives
        self.sampler = NegativeSampler(m.sampler, self.sets, cfg.run.seed, num=num,
                                       prior_beta=popularity_prior(train_count, auc.beta), cfg=auc)
        torch.manual_seed(cfg.run.seed)  # same initial tables on every rank
        self.model = MF(self.num_users, self.num_items, m.dim)
        if m.method == "onebp":
            self.model.user.weight.requires_grad_(False)  # a buffer that the aggregation writes
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.l2)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=list(cfg.optim.lr_milestones),
                                                          gamma=cfg.optim.lr_gamma)
        self.owned = torch.arange(self.num_users) % world == rank
        self.epoch = 0

    # -- training ------------------------------------------------------------------------------
    def _batch_loss(self, ids: torch.Tensor, users: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Σ of this rank's per-row losses of the batch (a 0-d tensor, possibly of no rows)."""
        m = self.cfg.model
        if len(users) == 0:
            return sum(p.sum() * 0.0 for p in self.params)  # keeps every rank's backward alike
        neg = self.sampler(self.model, users, ids, self.epoch)
        u = self.model.user(users)
        s_pos = (u * self.model.item(pos)).sum(-1)
        s_neg = (u.unsqueeze(1) * self.model.item(neg)).sum(-1)
        if m.method == "bpr":
            return F.softplus(s_neg - s_pos.unsqueeze(1)).mean(1).sum()
        return infonce_losses(s_pos, s_neg, m.temperature).sum()

    def train_epoch(self) -> dict[str, float]:
        m = self.cfg.model
        train = self.rows["train"]
        loss_sum = torch.zeros(1, dtype=torch.float64)
        epoch_users, epoch_pos = [], []
        t0 = time.perf_counter()
        for ids in epoch_batches(self.num_train, self.cfg.optim.batch_size, self.cfg.run.seed, self.epoch):
            mine, users, pos = train.take(ids)
            loss = self._batch_loss(mine, users, pos) / len(ids)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if is_distributed():
                flat = all_reduce_sum_(flatten_grads(self.params))
                assign_flat_grads_(self.params, flat)
            self.opt.step()
            loss_sum += float(loss.detach()) * len(ids)
            if m.method == "onebp":
                if m.ema_granularity == "batch":
                    ema_update_(self.model.user.weight, users, self.model.item.weight[pos], m.beta, m.duplicate_rule)
                else:
                    epoch_users.append(users)
                    epoch_pos.append(pos)
        if m.method == "onebp" and m.ema_granularity == "epoch" and epoch_users:
            # One step per user per epoch, from the end-of-epoch item table, rows in epoch order.
            users, pos = torch.cat(epoch_users), torch.cat(epoch_pos)
            ema_update_(self.model.user.weight, users, self.model.item.weight[pos], m.beta, m.duplicate_rule)
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        seconds = time.perf_counter() - t0
        all_reduce_sum_(loss_sum)
        self.epoch += 1
        return {"train/loss": float(loss_sum[0]) / self.num_train, "train/seconds": seconds, "train/lr": lr}

    # -- evaluation ----------------------------------------------------------------------------
    def _masks(self, split: str, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target Bool[B, I], exclude Bool[B, I]) for scoring ``split``: training items are
        excluded, and when scoring test the validation items too."""
        lookup = torch.full((self.num_users,), -1, dtype=torch.long)
        lookup[users] = torch.arange(len(users))

        def dense(rows) -> torch.Tensor:
            mask = torch.zeros(len(users), self.num_items, dtype=torch.bool)
            sel = lookup[rows.user] >= 0
            mask[lookup[rows.user[sel]], rows.item[sel]] = True
            return mask

        target = dense(self.rows[split])
        exclude = dense(self.rows["train"])
        if split == "test":
            exclude |= dense(self.rows["valid"])
        return target, exclude

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """``{split}/{slice}/{metric}@{k}`` for every stratum and "all", over users with items in
        ``split`` (methods.md §3.2 protocol: full ranking, earlier items masked)."""
        ks = list(self.cfg.eval.ks)
        users = torch.unique(self.rows[split].user)
        stats = [TopKStats(ks) for _ in range(self.num_strata + 1)]
        for start in range(0, len(users), self.cfg.eval.batch_size):
            batch = users[start:start + self.cfg.eval.batch_size]
            target, exclude = self._masks(split, batch)
            scores = self.model.full_scores(batch)
            strata = self.stratum[batch]
            stats[-1].add(scores, target, self.hot, exclude)
            for s in range(self.num_strata):
                sel = strata == s
                if bool(sel.any()):
                    stats[s].add(scores[sel], target[sel], self.hot, exclude[sel])
        flat = all_reduce_sum_(torch.cat([st.tensor for st in stats]))
        out: dict[str, float] = {}
        width = stats[0].tensor.numel()
        for s in range(self.num_strata + 1):
            name = "all" if s == self.num_strata else stratum_name(s, self.num_strata)
            final = TopKStats(ks, flat[s * width:(s + 1) * width].clone()).finalize()
            out.update({f"{split}/{name}/{k}": v for k, v in final.items()})
        return out

    # -- state ---------------------------------------------------------------------------------
    def full_user_table(self) -> torch.Tensor:
        """The user table as one process would hold it. OneBP: each rank's rows are current only
        for its own users, so the owned rows are summed across ranks; otherwise it is replicated."""
        table = self.model.user.weight.detach().clone()
        if self.cfg.model.method == "onebp" and is_distributed():
            table[~self.owned] = 0.0
            all_reduce_sum_(table)
        return table

    def state(self) -> dict:
        return {"user": self.full_user_table(), "item": self.model.item.weight.detach().clone(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(), "epoch": self.epoch}

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            self.model.user.weight.copy_(state["user"])
            self.model.item.weight.copy_(state["item"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.epoch = int(state["epoch"])


def select(history: list[dict], cfg: TwoTowerConfig) -> dict[str, float]:
    """Final metrics from the per-epoch ``history`` (only rows with test metrics count).

    ``test_best/...``: each test metric at its own best test epoch (the published report; the
    four popularity-bias rates at the best-P@k epoch, as AUC-NS reports them); ``valid_best/...``:
    every test metric at the epoch of best validation ``select_metric``, when validation ran.
    ``final/...`` repeats the one that ``eval.select_on`` names."""
    rows = [h for h in history if any(k.startswith("test/") for k in h)]
    if not rows:
        return {}
    out: dict[str, float] = {}
    for key in [k for k in rows[-1] if k.startswith("test/")]:
        _, slice_, metric = key.split("/")
        name, _, k = metric.partition("@")
        if name in ("ohr", "ocr", "uhr", "ucr"):
            by = f"test/{slice_}/p@{k}"
            best = max(rows, key=lambda h: _num(h.get(by)))
        else:
            best = max(rows, key=lambda h: _num(h.get(key)))
        out[f"test_best/{slice_}/{metric}"] = best[key]
    sel = f"valid/all/{cfg.eval.select_metric}"
    if all(sel in h for h in rows):
        best = max(rows, key=lambda h: _num(h[sel]))
        out.update({"valid_best/epoch": float(best["epoch"])})
        out.update({k.replace("test/", "valid_best/", 1): v for k, v in best.items() if k.startswith("test/")})
    chosen = "test_best" if cfg.eval.select_on == "test_best_epoch" else "valid_best"
    out.update({k.replace(chosen + "/", "final/", 1): v for k, v in list(out.items()) if k.startswith(chosen + "/")})
    return out


def _stalled(scores: list[float], patience: int) -> bool:
    """True when the last ``patience`` evaluations did not beat the best before them."""
    if not patience or len(scores) <= patience:
        return False
    return max(scores[-patience:]) <= max(scores[:-patience])


def _num(v: Optional[float]) -> float:
    return -math.inf if v is None or math.isnan(v) else float(v)


def run_epochs(run: TwoTowerRun, report: Callable[[dict, TwoTowerRun], None],
               history: Optional[list[dict]] = None, say: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Train ``run`` to ``optim.epochs``, evaluating every ``eval.every`` epochs and after the last;
    ``report(row, run)`` after each epoch (the Ray worker checkpoints there); ``say``: one line per
    evaluated epoch on rank 0."""
    history = list(history or [])
    cfg = run.cfg
    local_valid = float(len(run.rows["valid"].sample_id) > 0)
    has_valid = bool(all_reduce_sum_(torch.tensor([local_valid]))[0] > 0)
    sel = f"valid/all/{cfg.eval.select_metric}"
    scores = [h[sel] for h in history if sel in h]
    while run.epoch < cfg.optim.epochs and not _stalled(scores, cfg.eval.patience):
        row = {"epoch": run.epoch, **run.train_epoch()}
        if run.epoch % cfg.eval.every == 0 or run.epoch == cfg.optim.epochs:
            t0 = time.perf_counter()
            row.update(run.evaluate("test"))
            if has_valid:
                row.update(run.evaluate("valid"))
            row["eval/seconds"] = time.perf_counter() - t0
        history.append(row)
        if sel in row:
            scores.append(row[sel])  # all-reduced: every rank stops at the same epoch
        if say and run.rank == 0 and "test/all/ndcg@10" in row:
            say(f"epoch {row['epoch']:4d} loss {row['train/loss']:.4f} {row['train/seconds']:.2f}s | test "
                  f"NDCG@10 {row['test/all/ndcg@10']:.4f} P@10 {row['test/all/p@10']:.4f}"
                + (f" | valid NDCG@10 {row['valid/all/ndcg@10']:.4f}" if has_valid else ""))
        report(row, run)
    return history
