"""The two-tower training loop of one rank (pure torch + ``collectives``; no Ray), so the same code runs in
one process and on W Ray Train workers (methods.md §6, "OneBP", "AUC-NS").

Sharding **by user**: rank r of W holds every row (train, valid, test) of the users with ``user % W == r``.
Epoch e visits the training pairs in the global batches of ``epoch_batches`` (identical on every rank and for
every W); each rank takes the rows of the batch that it holds, in batch order. Hence:

* the loss of a global batch is Σ_local ℓ_k / B_global (B_global = the batch's length, known to every rank
  without communication); one SUM all-reduce of the flat gradient of the trainable tables gives every rank the
  single-process gradient, so the replicated item table (and, for ``twobp``/``bpr``, the user table) stays
  identical on every rank;
* a user's rows of a batch all live on one rank, so OneBP's per-user aggregation (and its duplicate rule) is
  computed where the user lives, from the replicated post-step item table, with no user-table traffic; the
  user rows a rank does not own are never read there;
* negatives are keyed draws of (seed, epoch, global sample id): the same for any W;
* metrics are per-user sums (``TopKStats``) of each rank's own users, SUM all-reduced.

What differs between methods (data, model, batch loss, user-tower update, state) is asked of the method's
object in ``methods/twotower_methods.METHODS``; this loop compares no method names.
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

from ray_pinet.data.pairs import SPLITS, load_meta
from ray_pinet.evaluation.pointwise import finalize, global_auc, user_sums
from ray_pinet.evaluation.protocol import slice_names
from ray_pinet.evaluation.topk import TopKStats, hot_items
from ray_pinet.methods.negative_sampling import NegativeSampler, UserItemSets, popularity_prior
from ray_pinet.methods.twotower_methods import METHODS, Rows
from ray_pinet.training.batches import epoch_batches
from ray_pinet.training.collectives import (
    all_gather_rows,
    all_reduce_max_,
    all_reduce_sum_,
    assign_flat_grads_,
    flatten_grads,
    is_distributed,
)
from ray_pinet.training.device import autocast
from ray_pinet.training.early_stopping import EarlyStopping
from ray_pinet.twotower_config import TwoTowerConfig


@dataclass
class PairRows:
    """One split's rows of this rank's users, ordered by global sample id."""

    sample_id: torch.Tensor  # Long[n]
    user: torch.Tensor  # Long[n]
    item: torch.Tensor  # Long[n]
    label: Optional[torch.Tensor] = None  # Long[n], labeled data only

    def to(self, device: torch.device) -> "PairRows":
        return PairRows(*(None if t is None else t.to(device)
                          for t in (self.sample_id, self.user, self.item, self.label)))

    def locate(self, global_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Bool[B] which of ``global_ids`` are held here, their local row indices in batch order)."""
        global_ids = global_ids.to(self.sample_id.device)  # batches are drawn on the host
        if not len(self.sample_id):
            return (torch.zeros_like(global_ids, dtype=torch.bool),
                    torch.zeros(0, dtype=torch.long, device=global_ids.device))
        pos = torch.searchsorted(self.sample_id, global_ids).clamp(max=len(self.sample_id) - 1)
        held = self.sample_id[pos] == global_ids
        return held, pos[held]

    def take(self, global_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample ids, users, items) of the rows of ``global_ids`` held here, in batch order."""
        held, pos = self.locate(global_ids)
        return global_ids[held], self.user[pos], self.item[pos]

    def take_labeled(self, global_ids: torch.Tensor):
        """(Bool[B] held here, sample ids, users, items, labels) of the labeled rows of
        ``global_ids`` held here, in batch order."""
        held, pos = self.locate(global_ids)
        return held, global_ids[held], self.user[pos], self.item[pos], self.label[pos]


def read_pair_shard(path: str | Path, rank: int, world: int) -> dict[str, PairRows]:
    """Every split's rows of the users ``user % world == rank``."""
    out = {}
    for name in SPLITS:
        t = pq.read_table(Path(path) / f"{name}.parquet")
        users = t.column("user").to_numpy()
        keep = users % world == rank
        sid = torch.from_numpy(t.column("sample_id").to_numpy()[keep].astype(np.int64))
        order = torch.argsort(sid)

        def col(c: str) -> torch.Tensor:
            return torch.from_numpy(t.column(c).to_numpy()[keep].astype(np.int64))[order]

        out[name] = PairRows(sid[order], col("user"), col("item"),
                             col("label") if "label" in t.column_names else None)
    return out


class TwoTowerRun:
    """Model, optimizer, sampler and the rank's data of one two-tower run (see module doc).

    ``device``: where the model, the rank's rows, the samplers' tables and every per-step tensor
    live (the worker resolves ``run.device``). Everything is built on the CPU first, with the same
    seeded draws, then moved: the initial tables do not depend on the device. With
    ``run.precision=bf16`` the scores are computed under autocast (matmuls of NCF's MLP and of
    full-catalogue scoring; MF's elementwise products stay fp32) and every loss, the all-reduced
    sums and IG's meta-step (which ignores bf16: its branch is a comparison of three losses) are fp32."""

    def __init__(self, cfg: TwoTowerConfig, path: str | Path, rank: int = 0, world: int = 1,
                 device: torch.device | str | None = None) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.device = torch.device(device if device is not None else "cpu")
        self.precision = cfg.run.precision
        meta = load_meta(path)
        self.num_users, self.num_items = int(meta["num_users"]), int(meta["num_items"])
        self.num_strata = int(meta["num_strata"])
        self.num_train = int(meta["rows"]["train"])
        self.rows = read_pair_shard(path, rank, world)
        users = pq.read_table(Path(path) / "users.parquet", columns=["stratum"])
        self.stratum = torch.from_numpy(users.column("stratum").to_numpy().astype(np.int64))
        items = pq.read_table(Path(path) / "items.parquet", columns=["popularity", "train_count"])
        self.hot = hot_items(items.column("popularity").to_numpy().copy(), float(meta["hot_share"]))
        train_count = torch.from_numpy(items.column("train_count").to_numpy().astype(np.int64))
        # Each split's items per user of this rank, built once: training items for the sampler and
        # the masks, validation/test items as ranking targets (and validation as a test mask).
        self.split_sets = {name: UserItemSets.from_pairs(r.user, r.item, self.num_users, self.num_items)
                           for name, r in self.rows.items()}
        self.sets = self.split_sets["train"]
        # The sampler's slot count depends on the smallest |I_u⁻| of *all* users: the same on
        # every rank only after a MAX all-reduce of the largest local |I_u⁺|.
        most = all_reduce_max_(torch.tensor([int(self.sets.pos_count(torch.arange(self.num_users)).max())],
                                            device=self.device))
        self.sets.min_neg_count = self.num_items - int(most[0])
        m = cfg.model
        self.method = METHODS[m.method]
        self.sampler = NegativeSampler(m.sampler, self.sets, cfg.run.seed,
                                       self.method.negatives or m.num_negatives,
                                       popularity_prior(train_count, m.auc_ns.beta), m.auc_ns)
        if self.method.labeled != bool(meta.get("labeled")):
            raise ValueError(f"model.method={m.method} needs {'' if self.method.labeled else 'un'}labeled "
                             f"pair data; {path} was prepared with data.label_threshold "
                             f"{'set' if meta.get('labeled') else 'unset'}")
        torch.manual_seed(cfg.run.seed)  # same initial tables on every rank
        self.model = self.method.model(self.num_users, self.num_items, m)
        self._to_device()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=list(cfg.optim.lr_milestones),
                                                          gamma=cfg.optim.lr_gamma)
        self.epoch = 0
        self.step = 0  # optimizer steps so far (T-CE's drop-rate schedule)

    def _to_device(self) -> None:
        """Model, rows, strata, hot items and the samplers' tables onto ``self.device`` (a no-op
        on the CPU: the same tensors, so a CPU run computes what it did before devices)."""
        if self.device.type == "cpu":
            return
        d = self.device
        self.rows = {name: r.to(d) for name, r in self.rows.items()}
        self.stratum, self.hot = self.stratum.to(d), self.hot.to(d)
        self.split_sets = {name: s.to(d) for name, s in self.split_sets.items()}
        self.sets = self.split_sets["train"]
        self.sampler.sets = self.sets
        if self.sampler.prior_beta is not None:
            self.sampler.prior_beta = self.sampler.prior_beta.to(d)
        self.model.to(d)

    def autocast(self):
        """The scoring context of ``run.precision`` (fp32: a disabled context)."""
        return autocast(self.device, self.precision)

    def train_epoch(self) -> dict[str, float]:
        """One epoch of the method (``sgd_epoch``, or what replaces it: IG's meta-step)."""
        return self.method.epoch(self)

    def sgd_epoch(self) -> dict[str, float]:
        """One optimizer step per global batch on the method's batch loss, the gradient SUM
        all-reduced; the method's user-tower update after each step and after the epoch."""
        # Summed on the device: a float() per step would wait for the step to finish.
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        seen: Rows = []
        t0 = time.perf_counter()
        for ids in epoch_batches(self.num_train, self.cfg.optim.batch_size, self.cfg.run.seed, self.epoch):
            loss, users, pos = self.method.batch_loss(self, ids)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if is_distributed():
                flat = all_reduce_sum_(flatten_grads(self.params))
                assign_flat_grads_(self.params, flat)
            self.opt.step()
            self.step += 1
            loss_sum += loss.detach().double() * len(ids)
            self.method.after_step(self, users, pos, seen)
        self.method.after_epoch(self, seen)
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        seconds = time.perf_counter() - t0
        all_reduce_sum_(loss_sum)
        self.epoch += 1
        return {"train/loss": float(loss_sum[0]) / self.num_train, "train/seconds": seconds, "train/lr": lr}

    def _masks(self, split: str, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target Bool[B, I], exclude Bool[B, I]) for scoring ``split``: training items are
        excluded, and when scoring test the validation items too."""
        target = self.split_sets[split].mask(users)
        exclude = self.sets.mask(users)
        if split == "test":
            exclude |= self.split_sets["valid"].mask(users)
        return target, exclude

    @torch.no_grad()
    def _evaluate_pointwise(self, split: str) -> dict[str, float]:
        """Labeled rows (``method.labeled``): ``{split}/{slice}/{auc, wauc, ndcg@k, bce, users, rows}``;
        per-user sums all-reduced (users are sharded), AUC on the gathered (score, label, stratum) rows."""
        ks = list(self.cfg.eval.ks)
        rows = self.rows[split]
        self.model.eval()
        with self.autocast():
            scores = torch.cat([self.model(rows.user[i:i + 8192], rows.item[i:i + 8192]).float()
                                for i in range(0, len(rows.user), 8192)] or [torch.zeros(0, device=self.device)])
        self.model.train()
        strata = self.stratum[rows.user]
        # user_sums works in numpy: the per-row sums on the host (a no-op on the CPU)
        user, label, scores, strata = rows.user.cpu(), rows.label.cpu(), scores.cpu(), strata.cpu()
        sums = []
        for s in range(self.num_strata + 1):
            sel = torch.ones_like(strata, dtype=torch.bool) if s == self.num_strata else strata == s
            sums.append(user_sums(user[sel], scores[sel], label[sel], ks))
        flat = all_reduce_sum_(torch.cat(sums).to(self.device)).cpu()
        width = sums[0].numel()
        local = torch.stack([scores.double(), label.double(), strata.double()], 1).to(self.device)
        pooled = all_gather_rows(local).cpu().numpy()
        out: dict[str, float] = {}
        for s, name in enumerate(slice_names(self.num_strata)):
            sel = np.ones(len(pooled), dtype=bool) if s == self.num_strata else pooled[:, 2] == s
            out.update({f"{split}/{name}/{k}": v for k, v in finalize(flat[s * width:(s + 1) * width], ks).items()})
            out[f"{split}/{name}/auc"] = global_auc(pooled[sel, 0], pooled[sel, 1])
        return out

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        """``{split}/{slice}/{metric}@{k}`` for every stratum and "all", over users with items in
        ``split`` (methods.md §3.2 protocol: full ranking, earlier items masked)."""
        if self.method.labeled:
            return self._evaluate_pointwise(split)
        ks = list(self.cfg.eval.ks)
        users = torch.unique(self.rows[split].user)
        stats = [TopKStats(ks) for _ in range(self.num_strata + 1)]
        for start in range(0, len(users), self.cfg.eval.batch_size):
            batch = users[start:start + self.cfg.eval.batch_size]
            target, exclude = self._masks(split, batch)
            with self.autocast():
                scores = self.model.full_scores(batch).float()
            if self.device.type != "cpu":
                # evaluation/topk builds its discount tables on the CPU: rank there.
                scores, target, exclude, batch = scores.cpu(), target.cpu(), exclude.cpu(), batch.cpu()
            strata = self.stratum[batch.to(self.stratum.device)].cpu()
            hot = self.hot.cpu()
            stats[-1].add(scores, target, hot, exclude)
            for s in range(self.num_strata):
                sel = strata == s
                if bool(sel.any()):
                    stats[s].add(scores[sel], target[sel], hot, exclude[sel])
        flat = all_reduce_sum_(torch.cat([st.tensor for st in stats]).to(self.device)).cpu()
        out: dict[str, float] = {}
        width = stats[0].tensor.numel()
        for s, name in enumerate(slice_names(self.num_strata)):
            final = TopKStats(ks, flat[s * width:(s + 1) * width].clone()).finalize()
            out.update({f"{split}/{name}/{k}": v for k, v in final.items()})
        return out

    def state(self) -> dict:
        """The method's tables (as one process holds them; a collective), optimizer and counters."""
        tables = self.method.tables(self)
        # Checkpoints hold CPU tensors: one written on a GPU loads on a CPU (and load_state moves
        # them back: load_state_dict copies, Adam's state follows its parameters' device).
        return _on_cpu({**tables, "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                        "epoch": self.epoch, "step": self.step})

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            if "model" in state:
                self.model.load_state_dict(state["model"])
            else:
                self.model.user.weight.copy_(state["user"])
                self.model.item.weight.copy_(state["item"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.epoch = int(state["epoch"])
        self.step = int(state.get("step", 0))


def _on_cpu(obj):
    """``obj`` with every tensor moved to the CPU (CPU tensors are returned as they are)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


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
            best = max(rows, key=lambda h: _num(h.get(key), lower_is_better=name == "bce"))
        out[f"test_best/{slice_}/{metric}"] = best[key]
    sel = f"valid/all/{cfg.eval.select_metric}"
    if all(sel in h for h in rows):
        best = max(rows, key=lambda h: _num(h[sel], lower_is_better=cfg.eval.select_metric == "bce"))
        out.update({"valid_best/epoch": float(best["epoch"])})
        out.update({k.replace("test/", "valid_best/", 1): v for k, v in best.items() if k.startswith("test/")})
    chosen = "test_best" if cfg.eval.select_on == "test_best_epoch" else "valid_best"
    out.update({k.replace(chosen + "/", "final/", 1): v for k, v in list(out.items()) if k.startswith(chosen + "/")})
    return out


def _num(v: Optional[float], lower_is_better: bool = False) -> float:
    """A sort key where larger is better (NaN and missing last)."""
    if v is None or math.isnan(v):
        return -math.inf
    return -float(v) if lower_is_better else float(v)


def run_epochs(run: TwoTowerRun, report: Callable[[dict, TwoTowerRun], None],
               history: Optional[list[dict]] = None, say: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Train ``run`` to ``optim.max_epochs`` (or the ``eval.patience`` early stop), evaluating every
    ``eval.every`` epochs and after the last; ``report(row, run)`` after each epoch (the Ray worker
    checkpoints there); ``say``: one line per evaluated epoch on rank 0."""
    history = list(history or [])
    cfg = run.cfg
    local_valid = float(len(run.rows["valid"].sample_id) > 0)
    has_valid = bool(all_reduce_sum_(torch.tensor([local_valid], device=run.device))[0] > 0)
    sel = f"valid/all/{cfg.eval.select_metric}"
    lower = cfg.eval.select_metric == "bce"  # scores are kept larger-is-better
    stop = EarlyStopping(cfg.eval.patience)
    for h in history:  # a resumed run: the state from the evaluations so far
        if sel in h:
            stop.update(_num(h[sel], lower))
    while run.epoch < cfg.optim.max_epochs and not stop.stopped:
        row = {"epoch": run.epoch, **run.train_epoch()}
        if run.epoch % cfg.eval.every == 0 or run.epoch == cfg.optim.max_epochs:
            t0 = time.perf_counter()
            row.update(run.evaluate("test"))
            if has_valid:
                row.update(run.evaluate("valid"))
            row["eval/seconds"] = time.perf_counter() - t0
        history.append(row)
        if sel in row:
            stop.update(_num(row[sel], lower))  # all-reduced: every rank stops at the same epoch
        if say and run.rank == 0 and "test/all/ndcg@10" in row:
            second = run.method.second_metric
            say(f"epoch {row['epoch']:4d} loss {row['train/loss']:.4f} {row['train/seconds']:.2f}s | test "
                f"NDCG@10 {row['test/all/ndcg@10']:.4f} {second.upper()} {row[f'test/all/{second}']:.4f}"
                + (f" | valid {sel.split('/')[-1]} {row[sel]:.4f}" if sel in row else ""))
        report(row, run)
    return history
