"""Plain single-process SASRec on Amazon Beauty: the quality and speed reference for ray-pinet.

No Ray, no framework: reads Beauty.txt (one line per user: ``user item item ...``, oldest first),
leave-one-out (last item -> test, second-last -> validation), one training window per user per
epoch (its last L+1 training items, all-position next-item full-softmax CE), Adam, early stop on
validation NDCG@10 with full ranking (the user's history items masked). Uses ray_pinet's RecModel,
losses and metrics, so it checks them against methods.md §1.6 (test NDCG@10 ≈ .056, HR@10 ≈ .093).

    python benchmarks/plain_sasrec.py --max-minutes 12
    python benchmarks/plain_sasrec.py --smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from ray_pinet.evaluation.metrics import StratumStats, target_rank  # noqa: E402
from ray_pinet.methods.losses import per_position_losses  # noqa: E402
from ray_pinet.models.config import ModelConfig  # noqa: E402
from ray_pinet.models.recmodel import RecModel  # noqa: E402
from ray_pinet.models.registry import build_model  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon-iclrec" / "Beauty.txt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--max-minutes", type=float, default=12.0, help="training time budget (eval excluded)")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--head-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny run (first 400 users, 2 epochs)")
    p.add_argument("--json", type=Path, help="write the final numbers here")
    return p.parse_args(argv)


def load_sequences(path: Path, limit: int | None = None) -> tuple[list[list[int]], int]:
    seqs = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4:  # user id + at least one train, one valid, one test item
                seqs.append([int(x) for x in parts[1:]])
            if limit is not None and len(seqs) >= limit:
                break
    return seqs, max(max(s) for s in seqs)


def left_pad(rows: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        r = r[-length:]
        if r:
            out[i, length - len(r):] = torch.tensor(r)
    return out


def head_tail_strata(train_lengths: np.ndarray, head_fraction: float) -> torch.Tensor:
    """Stratum 1 (head) for the top ⌈q·U⌉ users by training length, ties broken by user index."""
    order = np.lexsort((np.arange(train_lengths.size), -train_lengths))
    strata = np.zeros(train_lengths.size, dtype=np.int64)
    strata[order[: int(np.ceil(head_fraction * train_lengths.size))]] = 1
    return torch.from_numpy(strata)


@torch.no_grad()
def evaluate(
    model: RecModel, seqs: list[list[int]], strata: torch.Tensor, split: str, max_len: int, batch: int = 512
) -> dict[str, float]:
    """Full ranking; every item the user saw before the target is masked. split: valid | test."""
    model.eval()
    drop = 2 if split == "valid" else 1
    stats = StratumStats(2, k=10)
    for start in range(0, len(seqs), batch):
        chunk = seqs[start : start + batch]
        history = [s[:-drop] for s in chunk]
        target = torch.tensor([s[-drop] for s in chunk])
        scores = model.predict(left_pad(history, max_len), None, None)
        stats.add_ranks(strata[start : start + len(chunk)], target_rank(scores, target, history))
    model.train()
    return stats.finalize()


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.smoke:
        args.epochs, args.eval_every = 2, 1
    seqs, num_items = load_sequences(args.data, limit=400 if args.smoke else None)
    train = [s[:-2] for s in seqs]
    strata = head_tail_strata(np.array([len(t) for t in train]), args.head_fraction)
    cfg = ModelConfig(dim=args.dim, dropout=args.dropout, max_len=args.max_len)
    model = build_model(cfg, num_items)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.98))
    print(f"users {len(seqs)} items {num_items} train events {sum(map(len, train))}", flush=True)

    best, best_state, best_epoch, bad, positions, train_s = -1.0, None, 0, 0, 0, 0.0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        total, n_pos = 0.0, 0
        for idx in np.array_split(rng.permutation(len(train)), max(1, len(train) // args.batch_size)):
            window = left_pad([train[i][-(args.max_len + 1):] for i in idx], args.max_len + 1)
            loss_vec, _ = per_position_losses(model, window[:, :-1], window[:, 1:], None, None, "ce")
            loss = loss_vec.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * loss_vec.numel()
            n_pos += loss_vec.numel()
        epoch_s = time.perf_counter() - t0
        train_s += epoch_s
        positions += n_pos
        line = f"epoch {epoch} loss {total / n_pos:.4f} {epoch_s:.1f}s {n_pos / epoch_s:.0f} pos/s"
        out_of_time = train_s / 60 >= args.max_minutes
        if epoch % args.eval_every == 0 or out_of_time or epoch == args.epochs:
            val = evaluate(model, seqs, strata, "valid", args.max_len)
            line += f" | valid ndcg@10 {val['all/ndcg@10']:.4f} hr@10 {val['all/hr@10']:.4f}"
            if val["all/ndcg@10"] > best:
                best, best_epoch, bad = val["all/ndcg@10"], epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
        print(line, flush=True)
        if bad >= args.patience or out_of_time:
            break

    model.load_state_dict(best_state)
    test = evaluate(model, seqs, strata, "test", args.max_len)
    result = {
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        "train_minutes": train_s / 60,
        "positions_per_s": positions / train_s,
        "valid_ndcg@10": best,
        **{f"test_{k}": v for k, v in test.items() if not k.endswith("gauc")},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
