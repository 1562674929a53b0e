"""Gradient Aggregation (methods.md §1.2, §1.6, §6): backdoor-adjusted per-stratum weighting.

GA gradient over a global batch: g = Σ_s π_s ḡ_s, ḡ_s = mean gradient of the N_s units of stratum s.
It is computed as the gradient of the weighted loss L = Σ_k w_k ℓ_k with w_k = π_{s(k)} / N_{s(k)}.
With N_s the *global* counts (all-reduced SUM), the sum over workers of their local L is exactly the
single-process L on the concatenated batch. A unit k is a target position (``ga_unit=position``) or a
training row, whose loss is the mean of its positions' losses (``ga_unit=user``).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch
from torch import nn

from ray_pinet.methods.losses import valid_positions

PRIORS = ("user_share", "uniform", "interaction_share", "power")
UNITS = ("position", "user")


def stratum_counts(strata_of_units: torch.Tensor, num_strata: int) -> torch.Tensor:
    """Float64[K]: how many units of each stratum (the local part of N_s; all-reduce SUM it)."""
    return torch.bincount(strata_of_units.long(), minlength=num_strata).to(torch.float64)


def stratum_prior(
    kind: Literal["user_share", "uniform", "interaction_share", "power"],
    num_strata: int,
    user_share: Sequence[float],
    batch_counts: torch.Tensor,
    alpha: float = 1.0,
) -> torch.Tensor:
    """π Float64[K] for one global batch: zero where N_s = 0, renormalised over the other strata.

    user_share: π_s ∝ n_s (training-user share); uniform: 1/#present; interaction_share: N_s/ΣN
    (= pooled mean, joint training); power: π_s ∝ c_s^(1−α) · n_s^α with c_s = N_s/ΣN
    (α = 0: interaction_share, α = 1: user_share, α < 0: more weight on head data).
    """
    counts = batch_counts.detach().to(torch.float64).cpu()
    if counts.shape != (num_strata,):
        raise ValueError(f"batch_counts must have shape [{num_strata}], got {tuple(counts.shape)}")
    present = counts > 0
    out = torch.zeros(num_strata, dtype=torch.float64)
    if not bool(present.any()):
        return out
    if kind == "uniform":
        out[present] = 1.0
        return out / out.sum()
    c = counts / counts.sum()
    if kind == "interaction_share":
        return c
    if kind not in ("user_share", "power"):
        raise ValueError(f"unknown prior {kind!r}; one of {list(PRIORS)}")
    n = torch.as_tensor(list(user_share), dtype=torch.float64)
    if n.shape != (num_strata,) or bool((n < 0).any()):
        raise ValueError(f"user_share must be {num_strata} non-negative numbers, got {list(user_share)}")
    if bool((n[present] == 0).any()):
        raise ValueError(f"a stratum present in the batch has user_share 0: {list(user_share)}")
    a = 1.0 if kind == "user_share" else float(alpha)
    out[present] = c[present] ** (1.0 - a) * n[present] ** a
    return out / out.sum()


def ga_weights(
    strata_of_units: torch.Tensor,
    global_counts: torch.Tensor,
    prior: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w_k = π_{s(k)} / N_{s(k)} for this shard's units; N from the *global* batch."""
    s = strata_of_units.long()
    counts = global_counts.to(torch.float64).to(s.device)[s]
    if bool((counts <= 0).any()):
        raise ValueError("global_counts must count this shard's units (N_s = 0 for a present stratum)")
    return (prior.to(torch.float64).to(s.device)[s] / counts).to(dtype)


def batch_unit_counts(
    inputs: torch.Tensor, targets: torch.Tensor, stratum: torch.Tensor, unit: Literal["position", "user"],
    num_strata: int, segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float64[K]: this shard's units per stratum, from the batch alone (before the forward), so
    the count all-reduce can run while the model computes. Equals ``stratum_counts`` of the
    strata that ``unit_losses`` returns for the same batch. ``segments``: packed rows
    (``stratum`` is then per window)."""
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


def unit_losses(
    loss_vec: torch.Tensor, row_index: torch.Tensor, num_rows: int, unit: Literal["position", "user"]
) -> tuple[torch.Tensor, torch.Tensor]:
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


def reference_ga_gradient(
    model: nn.Module,
    per_sample_loss_fn: Callable[[nn.Module, object], torch.Tensor],
    samples: Sequence[object],
    strata: Sequence[int],
    prior: torch.Tensor,
) -> dict[str, torch.Tensor]:
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
