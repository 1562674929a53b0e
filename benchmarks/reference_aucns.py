"""Plain single-process MF-BPR on MovieLens-100K with uniform (RNS) or AUC-NS negatives, against
the published AUC-NS numbers (methods.md §4, §7). No Ray; reuses ray_pinet's MF, samplers and
top-k metrics, so it checks them.

Data: ``u.data`` (user, item, rating, ts; tab separated), every rating a positive, ids made dense
0-based. Split (ours, seeded, per row): each row gets a keyed uniform key from (seed, row's
(user, item) pair); the 20 % of rows with the smallest keys are test, and with ``--valid-share v``
the next v of the remaining rows are validation (carved out of train). The published code used a
random 80/20 row split with no validation; ``--valid-share 0`` is that protocol.

Training as coded (studentcej/AUC_NS, ML-100K MF row): batch 128, Adam lr 0.1, weight_decay 1e-4,
MultiStepLR ×0.1 after epochs 20/60/80, d 32, one negative per (u, i⁺), BPR loss, N 10, M 5,
α .60, β .025, γ .006, seed 2022, 500 epochs. Epoch e visits the training rows in the permutation
rng(seed, e) (ray_pinet's ``epoch_batches``, as the distributed trainer does).

Evaluation after every epoch: full ranking, training items masked (validation items too when
scoring test), P/R/F1/NDCG@{5,10,20} and OHR/OCR/UHR/UCR (``ray_pinet.evaluation.topk``).
Selections reported: ``test_best`` (as coded: each accuracy metric at its own best test epoch,
the four rates at the best-P@k epoch), ``last`` (the final epoch; note the code re-initialises its
running best every epoch, so what it prints at the end is in fact the last epoch) and, when
``--valid-share > 0``, ``valid`` (all test metrics at the epoch of best validation NDCG@10).

    python benchmarks/reference_aucns.py --sampler auc_ns --max-epochs 100 --json out.json
    python benchmarks/reference_aucns.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from ray_pinet.evaluation.topk import RATES, TopKStats, hot_items  # noqa: E402
from ray_pinet.methods.negative_sampling import (  # noqa: E402
    AucNsConfig,
    NegativeSampler,
    UserItemSets,
    bpr_loss,
    keyed_uniform,
    popularity_prior,
)
from ray_pinet.models.mf import MF  # noqa: E402
from ray_pinet.training.batches import epoch_batches  # noqa: E402  (pure numpy/torch, no Ray)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-100k" / "u.data"
PURPOSE_SPLIT = 41
KS = (5, 10, 20)
ACCURACY = ("p", "r", "f1", "ndcg")

# methods.md §7 (read from the repository's Supplementary_experiments.png): ML-100K, MF.
PUBLISHED = {
    "rns": {"p@10": .3074, "r@10": .1992, "f1@10": .2003, "ndcg@10": .3698, "ohr@10": .6924,
            "ocr@10": .0101, "ucr@10": .9286, "uhr@10": .6895,
            "p@20": .2478, "r@20": .3006, "f1@20": .2236, "ndcg@20": .3673},
    "auc_ns": {"p@10": .3600, "r@10": .2310, "f1@10": .2359, "ndcg@10": .4295, "ohr@10": .6361,
               "ocr@10": .0460, "ucr@10": .9243, "uhr@10": .6398,
               "p@20": .2844, "r@20": .3450, "f1@20": .2594, "ndcg@20": .4224},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--sampler", choices=("rns", "auc_ns"), default="auc_ns")
    p.add_argument("--seed", type=int, default=2022)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves the other core free)")
    # the two-tower config's names (optim.max_epochs, optim.weight_decay); the old flags still work
    p.add_argument("--max-epochs", "--epochs", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", "--l2", type=float, default=1e-4, help="Adam weight_decay (the paper's l2)")
    p.add_argument("--lr-milestones", type=int, nargs="*", default=[20, 60, 80])
    p.add_argument("--lr-gamma", type=float, default=0.1)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--num-extra", type=int, default=10, help="N: |P_u| = |Q_u|")
    p.add_argument("--num-candidates", type=int, default=5, help="M: |C_u|")
    p.add_argument("--alpha", type=float, default=0.60)
    p.add_argument("--beta", type=float, default=0.025)
    p.add_argument("--gamma", type=float, default=0.006)
    p.add_argument("--cdf-mode", choices=("exact", "sampled"), default="exact")
    p.add_argument("--test-share", type=float, default=0.2)
    p.add_argument("--valid-share", type=float, default=0.0, help="share of the non-test rows held out")
    p.add_argument("--hot-share", type=float, default=0.15)
    p.add_argument("--smoke", action="store_true", help="tiny run (first 60 users, 2 epochs)")
    p.add_argument("--json", type=Path, help="write config, per-epoch history and the final table here")
    return p.parse_args(argv)


@dataclass
class Split:
    num_users: int
    num_items: int
    popularity: np.ndarray  # Int[I] ratings per item on the full data (hot/cold)
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "train"/"valid"/"test" -> (users, items)


def load_split(path: Path, test_share: float, valid_share: float, seed: int, max_user: int | None) -> Split:
    raw = np.loadtxt(path, dtype=np.int64, usecols=(0, 1))
    if max_user is not None:
        raw = raw[raw[:, 0] <= max_user]
    _, users = np.unique(raw[:, 0], return_inverse=True)
    _, items = np.unique(raw[:, 1], return_inverse=True)
    num_users, num_items = int(users.max()) + 1, int(items.max()) + 1
    pair_key = torch.from_numpy(raw[:, 0] * (1 << 24) + raw[:, 1])  # the row's raw (user, item)
    order = np.argsort(keyed_uniform(seed, PURPOSE_SPLIT, 0, pair_key, 1)[:, 0].numpy(), kind="stable")
    n_test = int(round(test_share * len(order)))
    n_valid = int(round(valid_share * (len(order) - n_test)))
    part = np.zeros(len(order), dtype=np.int64)  # 0 train, 1 valid, 2 test
    part[order[:n_test]] = 2
    part[order[n_test : n_test + n_valid]] = 1
    parts = {name: (torch.from_numpy(users[part == code]), torch.from_numpy(items[part == code]))
             for code, name in enumerate(("train", "valid", "test"))}
    return Split(num_users, num_items, np.bincount(items, minlength=num_items), parts)


def dense_mask(users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int) -> torch.Tensor:
    mask = torch.zeros(num_users, num_items, dtype=torch.bool)
    mask[users, items] = True
    return mask


@torch.no_grad()
def evaluate(model: MF, target: torch.Tensor, exclude: torch.Tensor, hot: torch.Tensor) -> dict[str, float]:
    stats = TopKStats(KS)
    stats.add(model.full_scores(torch.arange(model.num_users)), target, hot, exclude)
    return stats.finalize()


def select(history: list[dict], has_valid: bool) -> dict[str, dict[str, float]]:
    """The three selections of the module docstring, each {metric@k: value} (+ epoch keys)."""
    tests = [h["test"] for h in history]
    best: dict[str, float] = {}
    for k in KS:
        for m in ACCURACY:
            e = int(np.argmax([t[f"{m}@{k}"] for t in tests]))
            best[f"{m}@{k}"], best[f"epoch:{m}@{k}"] = tests[e][f"{m}@{k}"], history[e]["epoch"]
        e_p = int(np.argmax([t[f"p@{k}"] for t in tests]))
        for m in RATES:
            best[f"{m}@{k}"] = tests[e_p][f"{m}@{k}"]
    out = {"test_best": best, "last": {**tests[-1], "epoch": history[-1]["epoch"]}}
    if has_valid:
        e = int(np.argmax([h["valid"]["ndcg@10"] for h in history]))
        out["valid"] = {**tests[e], "epoch": history[e]["epoch"]}
    return out


def table(selections: dict[str, dict[str, float]], published: dict[str, float]) -> str:
    cols = list(selections)
    lines = ["| metric | published | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for m in (*ACCURACY, *RATES):
        for k in KS:
            key = f"{m}@{k}"
            pub = f"{published[key]:.4f}" if key in published else "–"
            lines.append(f"| {m.upper()}@{k} | {pub} | " + " | ".join(f"{selections[c][key]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.max_epochs = 2
    split = load_split(args.data, args.test_share, args.valid_share, args.seed, 60 if args.smoke else None)
    U, I = split.num_users, split.num_items
    train_u, train_i = split.parts["train"]
    sets = UserItemSets.from_pairs(train_u, train_i, U, I)
    train_mask = sets.mask(torch.arange(U))
    masks = {name: dense_mask(*split.parts[name], U, I) for name in ("valid", "test")}
    hot = hot_items(split.popularity, args.hot_share)
    has_valid = args.valid_share > 0
    cfg = AucNsConfig(args.num_extra, args.num_candidates, args.alpha, args.beta, args.gamma, args.cdf_mode)
    prior = popularity_prior(torch.bincount(train_i, minlength=I), args.beta)
    sampler = NegativeSampler("uniform" if args.sampler == "rns" else "auc_ns", sets, args.seed,
                              prior_beta=prior, cfg=cfg)
    torch.manual_seed(args.seed)
    model = MF(U, I, args.dim)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=args.lr_milestones, gamma=args.lr_gamma)
    n_train = len(train_u)
    print(f"users {U} items {I} hot {int(hot.sum())} | rows train {n_train} valid {len(split.parts['valid'][0])} "
          f"test {len(split.parts['test'][0])} | users with test items {int(masks['test'].any(1).sum())} | "
          f"sampler {args.sampler}", flush=True)

    history: list[dict] = []
    train_s = eval_s = 0.0
    for epoch in range(args.max_epochs):
        t0 = time.perf_counter()
        total, lr = 0.0, opt.param_groups[0]["lr"]
        for ids in epoch_batches(n_train, args.batch_size, args.seed, epoch):
            users, pos = train_u[ids], train_i[ids]
            neg = sampler(model, users, ids, epoch)
            loss = bpr_loss(model.score(users, pos), model.score(users, neg))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(ids)
        sched.step()
        t1 = time.perf_counter()
        row = {"epoch": epoch, "loss": total / n_train, "lr": lr,
               "test": evaluate(model, masks["test"], train_mask | masks["valid"], hot)}
        if has_valid:
            row["valid"] = evaluate(model, masks["valid"], train_mask, hot)
        t2 = time.perf_counter()
        train_s, eval_s = train_s + t1 - t0, eval_s + t2 - t1
        history.append(row)
        t = row["test"]
        line = (f"epoch {epoch:3d} loss {row['loss']:.4f} lr {lr:.0e} {t1 - t0:.1f}s+{t2 - t1:.1f}s | test "
                f"P@10 {t['p@10']:.4f} R@10 {t['r@10']:.4f} NDCG@10 {t['ndcg@10']:.4f} OHR@10 {t['ohr@10']:.4f} "
                f"UHR@10 {t['uhr@10']:.4f}")
        if has_valid:
            line += f" | valid NDCG@10 {row['valid']['ndcg@10']:.4f}"
        print(line, flush=True)

    selections = select(history, has_valid)
    published = PUBLISHED[args.sampler]
    print(f"\n{args.sampler} after {args.max_epochs} epochs (published: methods.md §7, ML-100K MF)")
    print(table(selections, published))
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "auc_ns_config": asdict(cfg),
        "data": {"users": U, "items": I, "hot_items": int(hot.sum()),
                 "rows": {k: len(v[0]) for k, v in split.parts.items()},
                 "users_with_test_items": int(masks["test"].any(1).sum())},
        "seconds_per_epoch": {"train": train_s / args.max_epochs, "eval": eval_s / args.max_epochs},
        "loadavg": os.getloadavg(),
        "published": published,
        "selections": selections,
        "history": history,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
