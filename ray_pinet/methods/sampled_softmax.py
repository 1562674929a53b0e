"""Sampled softmax (``loss: sampled_softmax``): each position's softmax over its target and one
candidate set shared by the global batch, instead of all M items (docs/design.md, "Sampled softmax").

Candidates of a step: ``num_negatives`` items drawn with replacement from the proposal Q
(``unigram``: Q(j) ∝ (c_j + 1)^beta, c_j = item j's count among the training targets, the + 1 so
an item never seen as a target can still be drawn and Q(j) > 0 everywhere; ``uniform``: 1/M),
plus, with ``in_batch``, the global batch's distinct targets. The draw of step s of epoch e is a
pure function of (run.seed, PURPOSE_SAMPLED_SOFTMAX, e, s) (keyed_random), made on the host by
inverting Q's CDF (searchsorted, O(n log M)): every rank, for any W, on CPU or GPU, draws the same
ids, so W workers compute the one-process loss.

logQ correction. Loss at a position with target t and logits s:
    -s_t + log(e^{s_t} + Σ_{c ∈ S, c ≠ t} e^{s_c - log E[N_c]})
with N_c the number of times item c is in the candidate multiset S (E[N_c] = n·Q(c), plus, with
in-batch negatives, the probability that c is among the batch's T targets, 1 - (1 - f_c)^T with
f_c = c_c / Σ c, as if the targets were T independent draws of the training target frequencies:
an approximation). Since E[Σ_{c∈S, c≠t} e^{s_c}/E[N_c]] = Σ_{j≠t} e^{s_j}, the sum inside the
log is an unbiased estimate of the full softmax's denominator, and the loss tends to full
cross-entropy as n grows. The target itself is in the set exactly once (count 1, log 1 = 0), so
its logit is not corrected; TensorFlow's sampled_softmax_loss subtracts log(n·Q(t)) from it as
well, which makes the loss tend to cross-entropy with the target's logit shifted by
-log(n·Q(t)) rather than to the full softmax (tests/methods/test_sampled_softmax.py checks the
unbiased form by exact enumeration). Accidental hits (a candidate equal to the position's
target, which in-batch candidates always contain) get logit -inf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ray_pinet.keyed_random import stream_key, uniform_matrix
from ray_pinet.training.collectives import all_gather_rows, all_reduce_sum_

PURPOSE_SAMPLED_SOFTMAX = 51


@dataclass
class Candidates:
    """One step's shared candidates: items Long[C] (1..M, repeats possible) and, with logQ on,
    log_count Float[C] = log E[N_c] (subtracted from the candidates' logits)."""

    items: torch.Tensor
    log_count: torch.Tensor | None


class NegativeSampler:
    """The shared candidates of every (epoch, step), from the training target counts.

    ``counts`` Int[M]: item 1..M's count among the training targets (``from_rows``)."""

    def __init__(self, counts: np.ndarray, num_negatives: int, proposal: str = "unigram", beta: float = 0.75,
                 in_batch: bool = False, logq: bool = True, seed: int = 0):
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 1 or counts.size == 0 or (counts < 0).any():
            raise ValueError("counts must be a non-empty vector of item counts >= 0")
        if proposal not in ("uniform", "unigram"):
            raise ValueError(f"unknown proposal {proposal!r}; one of ['uniform', 'unigram']")
        self.num_items, self.num_negatives = len(counts), int(num_negatives)
        self.proposal, self.in_batch, self.logq, self.seed = proposal, in_batch, logq, int(seed)
        weights = np.ones_like(counts) if proposal == "uniform" else (counts + 1.0) ** beta
        self.q = weights / weights.sum()  # float64[M]: Q(item i + 1)
        self.cdf = np.cumsum(self.q)
        total = counts.sum()
        self.freq = counts / total if total > 0 else np.zeros_like(counts)

    @classmethod
    def from_rows(cls, rows, num_items: int, num_negatives: int, proposal: str = "unigram", beta: float = 0.75,
                  in_batch: bool = False, logq: bool = True, seed: int = 0) -> NegativeSampler:
        """From a rank's ``TrainRows``: the target counts of all ranks' rows (collective: one
        int64[M+1] SUM all-reduce, once per run), hence the same sampler for any W. The counts
        are those of the positions the loss trains on, which in-batch negatives are drawn from."""
        device = rows.device if rows.device.type == "cuda" else torch.device("cpu")  # nccl: CUDA only
        counts = torch.bincount(rows.targets.reshape(-1).to(device), minlength=num_items + 1)
        if counts.numel() != num_items + 1:
            raise ValueError(f"training targets hold item {counts.numel() - 1} > num_items={num_items}")
        all_reduce_sum_(counts)
        return cls(counts[1:].cpu().numpy(), num_negatives, proposal, beta, in_batch, logq, seed)

    @classmethod
    def from_config(cls, rows, num_items: int, cfg) -> NegativeSampler:
        """``from_rows`` with ``cfg.sampled`` and ``cfg.run.seed`` of a TrainConfig."""
        s = cfg.sampled
        return cls.from_rows(rows, num_items, s.num_negatives, s.proposal, s.beta, s.in_batch, s.logq,
                             cfg.run.seed)

    def draw(self, epoch: int, step: int) -> np.ndarray:
        """Int64[num_negatives]: item ids 1..M of (epoch, step), with replacement from Q."""
        u = uniform_matrix(stream_key(self.seed, PURPOSE_SAMPLED_SOFTMAX, epoch), np.array([step]),
                           self.num_negatives)[0]
        if self.proposal == "uniform":
            idx = (u * self.num_items).astype(np.int64)
        else:
            idx = np.searchsorted(self.cdf, u, side="right")
        return np.minimum(idx, self.num_items - 1) + 1  # (cdf[-1] may round below 1)

    def candidates(self, epoch: int, step: int, local_targets: torch.Tensor | None,
                   device: torch.device) -> Candidates:
        """The candidates of (epoch, step) on ``device``. With ``in_batch``: collective (every rank
        calls it every step, also with no positions of its own); ``local_targets`` Long[P_r] are
        this rank's valid targets; the global batch's distinct targets follow the drawn ids, sorted,
        so the set does not depend on how the batch was split over ranks."""
        items = self.draw(epoch, step)
        expected = self.num_negatives * self.q[items - 1]
        if self.in_batch:
            if local_targets is None:
                raise ValueError("in-batch negatives need this rank's targets")
            gathered = all_gather_rows(local_targets.reshape(-1).to(torch.int64))
            batch = torch.unique(gathered).cpu().numpy()  # sorted: the canonical order
            items = np.concatenate([items, batch])
            t = gathered.numel()
            with np.errstate(divide="ignore"):  # log1p(-1) = -inf: an item that is every target
                in_batch = -np.expm1(t * np.log1p(-self.freq[items - 1])) if t else 0.0
            expected = self.num_negatives * self.q[items - 1] + in_batch
        log_count = torch.from_numpy(np.log(expected)).to(device, torch.float32) if self.logq else None
        return Candidates(torch.from_numpy(items).to(device), log_count)


def sampled_softmax_loss(pos_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor,
                         cands: Candidates) -> torch.Tensor:
    """Float[P]: pos_logits Float[P] of the targets Long[P], cand_logits Float[P, C] of ``cands``."""
    logits = cand_logits if cands.log_count is None else cand_logits - cands.log_count
    logits = logits.masked_fill(cands.items.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logits.unsqueeze(1).to(logits.dtype), logits], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets), reduction="none")
