"""Gradient Aggregation (methods.md §1.2, §1.6, §6): backdoor-adjusted per-stratum weighting.

GA gradient over a global batch: g = Σ_s π_s ḡ_s, ḡ_s = mean gradient of the N_s units of stratum s.
It is computed as the gradient of the weighted loss L = Σ_k w_k ℓ_k with w_k = π_{s(k)} / N_{s(k)}.
With N_s the *global* counts (all-reduced SUM), the sum over workers of their local L is exactly the
single-process L on the concatenated batch. A unit k is a target position (``ga_unit=position``) or a
training row, whose loss is the mean of its positions' losses (``ga_unit=user``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import nn

from ray_pinet.config import TrainConfig
from ray_pinet.methods.losses import valid_positions

PRIORS = ("user_share", "uniform", "interaction_share", "power")  # ga.prior
KINDS = PRIORS + ("reweight", "stratum_mean")
UNITS = ("position", "user")


def stratum_counts(strata_of_units: torch.Tensor, num_strata: int) -> torch.Tensor:
    """Float64[K]: how many units of each stratum (the local part of N_s; all-reduce SUM it)."""
    return torch.bincount(strata_of_units.long(), minlength=num_strata).to(torch.float64)


@dataclass(frozen=True)
class Prior:
    """How π is formed from each global batch's unit counts N_s (``stratum_prior``).

    ``kind``: a GA prior (``PRIORS``; ``user_share`` holds n_s for ``user_share``/``power``, ``alpha`` is
    power's α), ``reweight`` (π_s ∝ N_s·r_s with the static per-stratum ``stratum_weights`` r_s: every unit of
    stratum s weighs r_s in a weighted mean over the global batch) or ``stratum_mean`` (π_s = 1 for every
    present stratum: each stratum's units averaged on their own, what per-stratum plugins train on)."""

    kind: str
    alpha: float = 0.0
    user_share: Sequence[float] = ()
    stratum_weights: Sequence[float] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown prior {self.kind!r}; one of {list(KINDS)}")


def method_prior(cfg: TrainConfig, user_share: Sequence[float], interaction_share: Sequence[float]) -> Prior:
    """The prior of ``cfg.method``'s stage-1 loss.

    ``joint`` (and the per-stratum baselines, which are joint runs on one stratum's rows) is GA with the
    interaction_share prior: the pooled mean over units. ``reweight`` is the pooled mean with static
    per-stratum weights r_s = (n_s / C_s)^power: π_s ∝ N_s · r_s."""
    if cfg.needs.prior == "reweight":
        r = [(n / c) ** cfg.reweight.power if c > 0 else 0.0 for n, c in zip(user_share, interaction_share)]
        return Prior("reweight", stratum_weights=tuple(r))
    if cfg.needs.prior == "ga":
        return Prior(cfg.ga.prior, cfg.ga.alpha, tuple(user_share))
    return Prior("interaction_share", user_share=tuple(user_share))


def stratum_prior(prior: Prior, batch_counts: torch.Tensor) -> torch.Tensor:
    """π Float64[K] on the host for one global batch: zero where N_s = 0, renormalised over the other strata.

    user_share: π_s ∝ n_s (training-user share); uniform: 1/#present; interaction_share: N_s/ΣN (= pooled
    mean, joint training); power: π_s ∝ c_s^(1−α) · n_s^α with c_s = N_s/ΣN (α = 0: interaction_share, α = 1:
    user_share, α < 0: more weight on head data); reweight and stratum_mean: see ``Prior``."""
    counts = batch_counts.detach().to(torch.float64).cpu()
    if counts.dim() != 1:
        raise ValueError(f"batch_counts must have shape [K], got {tuple(counts.shape)}")
    present = counts > 0
    if prior.kind == "stratum_mean":
        return present.to(torch.float64)
    if prior.kind == "reweight":
        out = counts * torch.as_tensor(list(prior.stratum_weights), dtype=torch.float64)
        return out / out.sum() if float(out.sum()) > 0 else out
    out = torch.zeros_like(counts)
    if not bool(present.any()):
        return out
    if prior.kind == "uniform":
        out[present] = 1.0
        return out / out.sum()
    c = counts / counts.sum()
    if prior.kind == "interaction_share":
        return c
    n = torch.as_tensor(list(prior.user_share), dtype=torch.float64)
    if n.shape != counts.shape or bool((n < 0).any()):
        raise ValueError(f"user_share must be {counts.shape[0]} non-negative numbers, "
                         f"got {list(prior.user_share)}")
    if bool((n[present] == 0).any()):
        raise ValueError(f"a stratum present in the batch has user_share 0: {list(prior.user_share)}")
    a = 1.0 if prior.kind == "user_share" else float(prior.alpha)
    out[present] = c[present] ** (1.0 - a) * n[present] ** a
    return out / out.sum()


def stratum_prior_on_device(prior: Prior, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``stratum_prior`` without leaving ``counts``' device: (π float64[K], bad), ``bad`` a 0-dim
    bool that is true where the host version would raise (a present stratum with user share 0).
    Branches become masks so no value is read back per step; the arithmetic is the host
    version's, element for element (tests compare them bit for bit)."""
    counts = counts.to(torch.float64)
    present = counts > 0
    bad = torch.zeros((), dtype=torch.bool, device=counts.device)
    zero = torch.zeros((), dtype=torch.float64, device=counts.device)
    if prior.kind == "stratum_mean":
        return present.to(torch.float64), bad
    if prior.kind == "reweight":
        out = counts * torch.as_tensor(list(prior.stratum_weights), dtype=torch.float64, device=counts.device)
        total = out.sum()
        return torch.where(total > 0, out / total, out), bad
    if prior.kind == "uniform":
        out = present.to(torch.float64)
        return torch.where(out.sum() > 0, out / out.sum(), out), bad
    c = counts / counts.sum()
    if prior.kind == "interaction_share":
        return torch.where(present, c, zero), bad
    share = torch.as_tensor(list(prior.user_share), dtype=torch.float64, device=counts.device)
    a = 1.0 if prior.kind == "user_share" else float(prior.alpha)
    bad = (present & (share == 0)).any()
    out = torch.where(present, c ** (1.0 - a) * share ** a, zero)
    total = out.sum()
    return torch.where(total > 0, out / total, out), bad


def ga_weights(strata_of_units: torch.Tensor, global_counts: torch.Tensor, prior: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_k = π_{s(k)} / N_{s(k)} for this shard's units; N from the *global* batch."""
    s = strata_of_units.long()
    counts = global_counts.to(torch.float64).to(s.device)[s]
    if bool((counts <= 0).any()):
        raise ValueError("global_counts must count this shard's units (N_s = 0 for a present stratum)")
    return (prior.to(torch.float64).to(s.device)[s] / counts).to(dtype)


def batch_unit_counts(inputs: torch.Tensor, targets: torch.Tensor, stratum: torch.Tensor,
                      unit: Literal["position", "user"], num_strata: int,
                      segments: torch.Tensor | None = None) -> torch.Tensor:
    """Float64[K]: this shard's units per stratum, from the batch alone (before the forward), so the count
    all-reduce can run while the model computes. Equals ``stratum_counts`` of the strata that ``unit_losses``
    returns for the same batch. ``segments``: packed rows (``stratum`` is then per window)."""
    if unit not in UNITS:
        raise ValueError(f"unknown ga_unit {unit!r}; one of {list(UNITS)}")
    valid = valid_positions(inputs, targets)
    if segments is None:
        per_row = valid.sum(1)
    else:
        per_row = torch.bincount(segments[valid], minlength=stratum.shape[0])
    if unit == "user":
        per_row = (per_row > 0).to(per_row.dtype)
    return torch.bincount(stratum.long(), weights=per_row.to(torch.float64), minlength=num_strata)


def unit_losses(loss_vec: torch.Tensor, row_index: torch.Tensor, num_rows: int,
                unit: Literal["position", "user"]) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit_loss Float[n_units], unit_row Long[n_units]). ``position``: unchanged; ``user``: one
    unit per row with at least one position, its loss the mean over that row's positions."""
    if unit == "position":
        return loss_vec, row_index
    if unit != "user":
        raise ValueError(f"unknown ga_unit {unit!r}; one of {list(UNITS)}")
    sums = loss_vec.new_zeros(num_rows).index_add(0, row_index, loss_vec)
    counts = torch.bincount(row_index, minlength=num_rows)
    rows = (counts > 0).nonzero(as_tuple=True)[0]
    return sums[rows] / counts[rows].to(loss_vec.dtype), rows


def reference_ga_gradient(model: nn.Module, per_sample_loss_fn: Callable[[nn.Module, object], torch.Tensor],
                          samples: Sequence[object], strata: Sequence[int],
                          prior: torch.Tensor) -> dict[str, torch.Tensor]:
    """Test oracle, literally §1.2: one backward per sample, ḡ_s = mean of stratum s's per-sample
    gradients, g = Σ_s π_s ḡ_s with π renormalised over the strata present. Returns name -> grad
    (zeros for parameters a sample does not touch). Put the model in eval mode first (dropout)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    num_strata = prior.shape[0]
    sums = [{n: torch.zeros_like(p) for n, p in params} for _ in range(num_strata)]
    counts = [0] * num_strata
    for sample, s in zip(samples, strata, strict=True):
        grads = torch.autograd.grad(per_sample_loss_fn(model, sample), [p for _, p in params], allow_unused=True)
        for (n, _), g in zip(params, grads):
            if g is not None:
                sums[s][n] += g
        counts[s] += 1
    pi = torch.tensor([float(prior[s]) if counts[s] else 0.0 for s in range(num_strata)], dtype=torch.float64)
    pi = pi / pi.sum()
    return {
        n: sum((float(pi[s]) / counts[s]) * sums[s][n] for s in range(num_strata) if counts[s])
        for n, _ in params
    }
