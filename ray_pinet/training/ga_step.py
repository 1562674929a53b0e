"""The GA gradient on W ranks: the custom all-reduce at the heart of ray-pinet.

Given each rank's per-unit losses and strata for its part of the global batch, every rank ends
with the same gradient g = Σ_s π_s ḡ_s over the whole global batch (methods.md §1.2, §6):

* ``loss_weighted`` (default): one K-float SUM all-reduce gives the global counts N_s, hence π
  and the weights w_k = π_s(k) / N_s(k); the local loss Σ_k w_k ℓ_k is backpropagated once and
  one flat gradient buffer is SUM-all-reduced. Σ over ranks of the local weighted sums is
  exactly Σ_s π_s ḡ_s.
* ``stratum_sums``: each rank backpropagates the K local stratum loss sums separately and one
  flat buffer [g_sum_0 | ... | g_sum_{K-1} | counts] is SUM-all-reduced; every rank then forms
  Σ_s π_s g_sum_s / N_s. Same result with K× the traffic; kept as the literal formulation and
  as a cross-check.

Strata absent from the global batch (N_s = 0) are dropped and π renormalised (methods.md §1.2).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ray_pinet.methods.ga import ga_weights, stratum_prior as _ga_prior
from ray_pinet.training.collectives import all_reduce_sum_, assign_flat_grads_, flatten_grads


@dataclass
class GAStepInfo:
    global_counts: torch.Tensor  # float64[K]: units of each stratum in the global batch
    prior: torch.Tensor  # float64[K]: π used for this step
    loss: float  # Σ_s π_s · (mean loss of stratum s) over the global batch
    backward_s: float = 0.0  # of ga_backward's time, the local autograd pass(es); the rest is the collectives


def stratum_prior(kind: str, num_strata: int, user_share, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """GA priors plus ``reweight`` (π_s ∝ N_s r_s: every unit of stratum s weighs r_s in a
    weighted mean over the global batch) and ``stratum_mean`` (π_s = 1 for every present stratum): with it each
    stratum's units are averaged on their own, which is what per-stratum plugins train on."""
    if kind == "stratum_mean":
        return (counts > 0).to(torch.float64)
    if kind == "reweight":  # ``user_share`` holds the static weights r_s here (loop.prior_settings)
        out = counts.to(torch.float64) * torch.as_tensor(list(user_share), dtype=torch.float64)
        return out / out.sum() if float(out.sum()) > 0 else out
    return _ga_prior(kind, num_strata, user_share, counts, alpha)


def _grads(loss: torch.Tensor, params: Sequence[torch.nn.Parameter], retain_graph: bool) -> list:
    if not loss.requires_grad:  # no local units: this rank contributes zeros
        return [None] * len(params)
    return list(torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True))


def ga_backward(
    params: Sequence[torch.nn.Parameter],
    unit_loss: torch.Tensor,
    unit_strata: torch.Tensor,
    num_strata: int,
    prior_kind: str,
    user_share: Sequence[float],
    alpha: float = 0.0,
    reduce: str = "loss_weighted",
) -> GAStepInfo:
    """Set ``p.grad`` of every param to the global GA gradient. Collective: call on every rank."""
    params = list(params)
    local_counts = torch.bincount(unit_strata, minlength=num_strata).to(torch.float64)
    if reduce == "loss_weighted":
        counts = all_reduce_sum_(local_counts.clone())
        prior = stratum_prior(prior_kind, num_strata, user_share, counts, alpha).to(torch.float64)
        w = ga_weights(unit_strata, counts, prior).to(unit_loss.dtype)
        local = (w * unit_loss).sum()
        t0 = time.perf_counter()
        grads = _grads(local, params, retain_graph=False)
        backward_s = time.perf_counter() - t0
        flat = flatten_grads(params, grads)
        # Loss value for logging rides on the same buffer: no extra collective.
        buf = torch.cat([flat, local.detach().reshape(1).to(torch.float32)])
        all_reduce_sum_(buf)
        assign_flat_grads_(params, buf[:-1])
        return GAStepInfo(counts, prior, float(buf[-1]), backward_s)
    if reduce == "stratum_sums":
        parts, loss_sums = [], []
        backward_s = 0.0
        for s in range(num_strata):
            mask = unit_strata == s
            ls = unit_loss[mask].sum() if bool(mask.any()) else unit_loss.new_zeros(())
            loss_sums.append(ls.detach())
            t0 = time.perf_counter()
            grads = _grads(ls, params, retain_graph=s < num_strata - 1)
            backward_s += time.perf_counter() - t0
            parts.append(flatten_grads(params, grads))
        buf = torch.cat(parts + [torch.stack(loss_sums).to(torch.float32), local_counts.to(torch.float32)])
        all_reduce_sum_(buf)
        n_params = parts[0].numel()
        counts = buf[-num_strata:].to(torch.float64)
        sums = buf[num_strata * n_params : num_strata * n_params + num_strata].to(torch.float64)
        prior = stratum_prior(prior_kind, num_strata, user_share, counts, alpha).to(torch.float64)
        coef = torch.where(counts > 0, prior / counts.clamp(min=1), torch.zeros_like(prior))
        g = torch.zeros(n_params, dtype=torch.float64)
        for s in range(num_strata):
            if coef[s] != 0:
                g += coef[s] * buf[s * n_params : (s + 1) * n_params].to(torch.float64)
        assign_flat_grads_(params, g.to(torch.float32))
        return GAStepInfo(counts, prior, float((coef * sums).sum()), backward_s)
    raise ValueError(f"unknown GA reduce mode {reduce!r}")
