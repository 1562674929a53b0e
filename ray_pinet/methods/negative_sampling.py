"""Negative samplers for pairwise (BPR) training of two-tower models (pure torch, no Ray).

* ``uniform`` (RNS): negatives uniform without replacement from I_u⁻ = I \\ I_u⁺.
* ``auc_ns``: AUC-optimal negative sampling, the rule of ``studentcej/AUC_NS`` (``negative_sampling.py``) as
  written down in methods.md §4.2: per (u, i⁺), P_u = N positives from I_u⁺ (with replacement), Q_u = N
  negatives and C_u = M candidates, each uniform without replacement from I_u⁻; the candidate with the largest
  AUC gain is the negative (top-``num`` for several).

Determinism (methods.md §6, "Our choice"): every random draw is a counter-based hash of (seed, purpose, epoch,
global example index, slot), so a training example gets the same draws whatever batch it lands in and however
many workers share the epoch. The scores the sampler reads are computed under ``no_grad``; the sampler is
never differentiated.

I_u⁺ is the user's set of *training-split* positives (``UserItemSets``); items are dense 0-based indices
0..I-1 with no padding row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ray_pinet.keyed_random import stream_key, uniform_matrix
from ray_pinet.methods.auc_ns_config import AucNsConfig

# Purpose tags separate the random streams drawn from one (seed, epoch, example) key.
PURPOSE_UNIFORM = 31
PURPOSE_EXTRA_POS = 32
PURPOSE_EXTRA_NEG = 33
PURPOSE_CANDIDATES = 34
PURPOSE_CDF = 35

def keyed_uniform(seed: int, purpose: int, epoch: int, example_ids: torch.Tensor, num: int) -> torch.Tensor:
    """Float64[B, num] in [0, 1): slot s of example e is a pure function of
    (seed, purpose, epoch, e, s), so it does not depend on the batch or worker count. Negative
    keys or ids raise ValueError (checked by keyed_random)."""
    ids = example_ids.detach().cpu().numpy().astype(np.int64)
    # drawn on the host (numpy), returned where the ids live
    return torch.from_numpy(uniform_matrix(stream_key(seed, purpose, epoch), ids, num)).to(example_ids.device)


def _index_below(u: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Long: floor(u · n), clamped into 0..n-1 (u in [0, 1), n >= 1)."""
    return torch.minimum((u * n.to(torch.float64)).long(), n - 1)


class UserItemSets:
    """Each user's training positives I_u⁺ as sorted unique CSR rows over items 0..I-1."""

    def __init__(self, indptr: torch.Tensor, items: torch.Tensor, num_items: int) -> None:
        self.indptr = indptr.long()
        self.items = items.long()
        self.num_items = num_items
        self.num_users = int(indptr.numel()) - 1
        counts = self.indptr[1:] - self.indptr[:-1]
        within = torch.arange(self.items.numel()) - torch.repeat_interleave(self.indptr[:-1], counts)
        # gap_t = p_t − t: how many non-positives come before the t-th positive (non-decreasing
        # within a user). Keyed by user (u·(I+2) + gap_t) they are sorted across users too, so
        # one searchsorted over all users answers "how many of u's gaps are <= r".
        self._gaps = self.items - within
        owner = torch.repeat_interleave(torch.arange(self.num_users), counts)
        self._gap_keys = owner * (num_items + 2) + self._gaps
        # The smallest |I_u⁻| that ``neg_slots`` plans for. None: over this object's own users.
        # A rank holding a shard of the users sets the global value, so every rank draws
        # through the same number of slots (the draws then do not depend on W).
        self.min_neg_count: int | None = None

    def to(self, device: torch.device) -> "UserItemSets":
        out = UserItemSets.__new__(UserItemSets)
        out.__dict__.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})
        return out

    @classmethod
    def from_pairs(cls, users: torch.Tensor, items: torch.Tensor, num_users: int, num_items: int) -> "UserItemSets":
        """From (user, item) rows; duplicate pairs count once."""
        if users.numel() and (int(users.max()) >= num_users or int(items.max()) >= num_items):
            raise ValueError("user or item index out of range")
        key = torch.unique(users.long() * num_items + items.long())  # sorted: by user, then item
        u, i = key // num_items, key % num_items
        indptr = torch.zeros(num_users + 1, dtype=torch.long)
        indptr[1:] = torch.bincount(u, minlength=num_users).cumsum(0)
        return cls(indptr, i, num_items)

    def pos_count(self, users: torch.Tensor) -> torch.Tensor:
        """Long[B]: |I_u⁺|."""
        return self.indptr[users + 1] - self.indptr[users]

    def neg_count(self, users: torch.Tensor) -> torch.Tensor:
        """Long[B]: |I_u⁻| = I − |I_u⁺|."""
        return self.num_items - self.pos_count(users)

    def positives_at(self, users: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Long[B, k]: the r[b, j]-th (0-based, ascending) positive of users[b]."""
        return self.items[self.indptr[users].unsqueeze(1) + r]

    def negatives_at(self, users: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Long[B, k]: the r[b, j]-th (0-based, ascending) non-interacted item of users[b].
        The r-th negative is r + #{t : gap_t <= r}: one searchsorted over the user-keyed gaps
        (O(B·k·log nnz); padding each user's gaps to the longest row cost B × max |I_u⁺|)."""
        base = users.unsqueeze(1) * (self.num_items + 2)
        below = torch.searchsorted(self._gap_keys, (base + r).contiguous(), right=True)
        return r + below - self.indptr[users].unsqueeze(1)

    def mask(self, users: torch.Tensor) -> torch.Tensor:
        """Bool[B, I]: True at each user's training positives."""
        dev = users.device
        out = torch.zeros(len(users), self.num_items, dtype=torch.bool, device=dev)
        count = self.pos_count(users)
        rows = torch.repeat_interleave(torch.arange(len(users), device=dev), count)
        starts = torch.repeat_interleave(self.indptr[users], count)
        within = torch.arange(int(count.sum()), device=dev) - torch.repeat_interleave(count.cumsum(0) - count, count)
        out[rows, self.items[starts + within]] = True
        return out

    def sample_positives(self, users: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Long[B, k]: k positives with replacement, from uniforms u Float64[B, k]."""
        n = self.pos_count(users).unsqueeze(1)
        if bool((n == 0).any()):
            raise ValueError("a user without training positives cannot draw positives")
        return self.positives_at(users, _index_below(u, n))

    def negative_ranks(self, users: torch.Tensor, u: torch.Tensor, k: int) -> torch.Tensor:
        """Long[B, k]: k distinct ranks in 0..|I_u⁻|-1, uniform without replacement, in draw order.

        Ranks are drawn with replacement from the uniforms u Float64[B, K] (K >= k slots, see
        ``neg_slots``) and the first k distinct ones kept, which is exactly sampling without
        replacement. A row whose K slots hold fewer than k distinct ranks (probability < 1e-9 with
        ``neg_slots``) takes the sequential draw on its first k uniforms instead."""
        n = self.neg_count(users).unsqueeze(1)
        if bool((n < k).any()):
            raise ValueError(f"a user has fewer than {k} non-interacted items")
        r = _index_below(u, n)
        slots = r.shape[1]
        earlier = torch.ones(slots, slots, dtype=torch.bool, device=r.device).tril(-1)  # [j, i]: slot i before j
        fresh = ~((r.unsqueeze(2) == r.unsqueeze(1)) & earlier).any(2)
        slot = torch.arange(slots, device=r.device)
        order = torch.where(fresh, slot, slots + slot).argsort(dim=1)[:, :k]
        out = r.gather(1, order)
        short = ~fresh.gather(1, order).all(1)
        if bool(short.any()):
            out[short] = _sequential_ranks(u[short, :k], n[short])
        return out

    def sample_negatives(self, users: torch.Tensor, u: torch.Tensor, k: int) -> torch.Tensor:
        """Long[B, k]: k distinct negatives uniform without replacement from I_u⁻ (see
        ``negative_ranks``; u Float64[B, ``neg_slots(k)``])."""
        return self.negatives_at(users, self.negative_ranks(users, u, k))

    def neg_slots(self, k: int) -> int:
        """Slots for ``negative_ranks``: the fewest (at most k + 32) that give k distinct ranks with
        probability > 1 − 1e-9 for the smallest I_u⁻ of any user."""
        n = self.min_neg_count
        if n is None:
            n = int((self.num_items - (self.indptr[1:] - self.indptr[:-1])).min())
        slots = k
        while slots < k + 32 and _p_fewer_distinct(n, k, slots) > 1e-9:
            slots += 1
        return slots


def _p_fewer_distinct(n: int, k: int, slots: int) -> float:
    """Upper bound on P(fewer than k distinct values among ``slots`` uniform draws from n):
    C(slots, d) · ((k − 1) / n)^d with d = slots − k + 1 (at least d draws must each repeat one of
    at most k − 1 earlier distinct values)."""
    d = slots - k + 1
    return math.comb(slots, d) * ((k - 1) / max(n, 1)) ** d if k > 1 else 0.0


def _sequential_ranks(u: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Long[B, k]: draw j is the r-th of the n − j ranks not chosen yet, r = floor(u_j · (n − j))."""
    chosen = torch.empty(len(u), 0, dtype=torch.long, device=u.device)
    for j in range(u.shape[1]):
        r = _index_below(u[:, j : j + 1], n - j)
        for s in chosen.sort(dim=1).values.unbind(1):  # ascending: step past each chosen rank
            r = r + (r >= s.unsqueeze(1)).long()
        chosen = torch.cat([chosen, r], dim=1)
    return chosen


class TwoTower(Protocol):
    num_items: int

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor: ...

    def full_scores(self, users: torch.Tensor) -> torch.Tensor: ...


def popularity_prior(item_counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Float64[I]: (pop_j / Σ pop)^β from training-split counts (0 for unseen items, β > 0)."""
    p = item_counts.to(torch.float64)
    return (p / p.sum()).pow(beta)


def auc_ns_gain(x_pos: torch.Tensor, x_neg: torch.Tensor, x_cand: torch.Tensor, cdf: torch.Tensor,
                prior: torch.Tensor, n_pos: torch.Tensor, n_neg: torch.Tensor, alpha: float,
                gamma: float) -> torch.Tensor:
    """Float64[B, M]: gain(j) of methods.md §4.2 for each candidate.

    x_pos Float[B, N] (P_u), x_neg Float[B, N] (Q_u), x_cand Float[B, M] (C_u) scores; cdf = F(j)
    and prior = prior(j)^β, Float[B, M]; n_pos, n_neg = |I_u⁺|, |I_u⁻|, [B]."""
    xp, xq, xc = (t.to(torch.float64) for t in (x_pos, x_neg, x_cand))
    # g(a, b) = 1 − σ(a − b)
    info_pos = (1 - torch.sigmoid(xp.unsqueeze(1) - xc.unsqueeze(2))).mean(2) * n_pos.unsqueeze(1)
    info_neg = gamma * (1 - torch.sigmoid(xc.unsqueeze(2) - xq.unsqueeze(1))).mean(2) * n_neg.unsqueeze(1)
    f, p = cdf.to(torch.float64), prior.to(torch.float64)
    negdist = (2 * (1 - f) * alpha + 2 * f * (1 - alpha)) * p
    posdist = (2 * (1 - f) * (1 - alpha) + 2 * f * alpha) * (1 - p)
    p_tn = negdist / (negdist + posdist)
    return p_tn * info_pos - (1 - p_tn) * info_neg


@dataclass
class AucNsDraws:
    """The keyed draws of one batch (for inspection and tests): P_u, Q_u, C_u item indices."""

    extra_pos: torch.Tensor  # Long[B, N]
    extra_neg: torch.Tensor  # Long[B, N]
    candidates: torch.Tensor  # Long[B, M]


def auc_ns_draws(sets: UserItemSets, users: torch.Tensor, example_ids: torch.Tensor, cfg: AucNsConfig,
                 seed: int, epoch: int) -> AucNsDraws:
    n, m = cfg.num_extra, cfg.num_candidates
    q = sets.negative_ranks(users, keyed_uniform(seed, PURPOSE_EXTRA_NEG, epoch, example_ids, sets.neg_slots(n)), n)
    c = sets.negative_ranks(users, keyed_uniform(seed, PURPOSE_CANDIDATES, epoch, example_ids, sets.neg_slots(m)), m)
    negatives = sets.negatives_at(users, torch.cat([q, c], dim=1))  # one searchsorted for Q_u and C_u
    return AucNsDraws(
        extra_pos=sets.sample_positives(users, keyed_uniform(seed, PURPOSE_EXTRA_POS, epoch, example_ids, n)),
        extra_neg=negatives[:, :n],
        candidates=negatives[:, n:],
    )


@torch.no_grad()
def rank_cdf(model: TwoTower, users: torch.Tensor, x_cand: torch.Tensor, cfg: AucNsConfig,
             example_ids: torch.Tensor, seed: int, epoch: int,
             full: torch.Tensor | None = None) -> torch.Tensor:
    """Float64[B, M]: F(j) = #{k ∈ I : x_uk <= x_uj} / (I + 1).

    exact: counted over all items (``full`` = the users' full score rows, computed if absent).
    sampled: the share of ``cdf_samples`` keyed uniform items (with replacement) scoring <= x_uj,
    times I / (I + 1): an unbiased estimate of the exact value, needing only sampled scores."""
    num_items = model.num_items
    if cfg.cdf_mode == "exact":
        if full is None:
            full = model.full_scores(users)
        # B·M·I comparisons: cheaper than sorting each row while M is a handful of candidates.
        below = (full.unsqueeze(1) <= x_cand.unsqueeze(2)).sum(2, dtype=torch.int32)
        return below.to(torch.float64) / (num_items + 1)
    u = keyed_uniform(seed, PURPOSE_CDF, epoch, example_ids, cfg.cdf_samples)
    sample = (u * num_items).long().clamp(max=num_items - 1)
    xs = model.score(users, sample)
    share = (xs.unsqueeze(1) <= x_cand.unsqueeze(2)).to(torch.float64).mean(2)
    return share * num_items / (num_items + 1)


@torch.no_grad()
def auc_ns_negatives(model: TwoTower, sets: UserItemSets, users: torch.Tensor, example_ids: torch.Tensor,
                     prior_beta: torch.Tensor, cfg: AucNsConfig, seed: int, epoch: int,
                     num: int = 1) -> torch.Tensor:
    """Long[B, num]: the ``num`` candidates of C_u with the largest AUC gain (methods.md §4.2).
    prior_beta = ``popularity_prior(train item counts, cfg.beta)``."""
    d = auc_ns_draws(sets, users, example_ids, cfg, seed, epoch)
    if cfg.cdf_mode == "exact":
        full = model.full_scores(users)
        xp, xq, xc = full.gather(1, d.extra_pos), full.gather(1, d.extra_neg), full.gather(1, d.candidates)
    else:
        full = None
        xp, xq, xc = model.score(users, d.extra_pos), model.score(users, d.extra_neg), model.score(users, d.candidates)
    cdf = rank_cdf(model, users, xc, cfg, example_ids, seed, epoch, full)
    gain = auc_ns_gain(xp, xq, xc, cdf, prior_beta[d.candidates], sets.pos_count(users), sets.neg_count(users),
                       cfg.alpha, cfg.gamma)
    return d.candidates.gather(1, gain.topk(num, dim=1).indices)


def uniform_negatives(sets: UserItemSets, users: torch.Tensor, example_ids: torch.Tensor, seed: int,
                      epoch: int, num: int = 1) -> torch.Tensor:
    """Long[B, num]: RNS, ``num`` distinct negatives uniform from I_u⁻."""
    return sets.sample_negatives(users, keyed_uniform(seed, PURPOSE_UNIFORM, epoch, example_ids, sets.neg_slots(num)), num)


@dataclass
class NegativeSampler:
    """``sampler(model, users, example_ids, epoch)`` -> Long[B, num] for ``name`` ∈ SAMPLERS.
    Holds the read-only globals: the user positive sets and (auc_ns) the popularity prior^β."""

    name: Literal["uniform", "auc_ns"]
    sets: UserItemSets
    seed: int
    num: int = 1
    prior_beta: torch.Tensor | None = None
    cfg: AucNsConfig = AucNsConfig()

    def __post_init__(self) -> None:
        if self.name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.name!r}")
        if self.name == "auc_ns":
            self.cfg.validate()
            if self.prior_beta is None or self.prior_beta.shape != (self.sets.num_items,):
                raise ValueError("auc_ns needs prior_beta Float[I] (popularity_prior of the training split)")

    def __call__(self, model: TwoTower, users: torch.Tensor, example_ids: torch.Tensor, epoch: int) -> torch.Tensor:
        if self.name == "uniform":
            return uniform_negatives(self.sets, users, example_ids, self.seed, epoch, self.num)
        assert self.prior_beta is not None
        return auc_ns_negatives(model, self.sets, users, example_ids, self.prior_beta, self.cfg, self.seed, epoch,
                                self.num)


SAMPLERS = ("uniform", "auc_ns")


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Mean softplus(x_uj − x_ui): pos Float[B], neg Float[B] or Float[B, n] (each pair once)."""
    if neg_scores.dim() == pos_scores.dim() + 1:
        pos_scores = pos_scores.unsqueeze(-1)
    return F.softplus(neg_scores - pos_scores).mean()
