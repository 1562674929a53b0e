"""The GA gradient on W ranks: the custom all-reduce at the heart of ray-pinet.

Given each rank's per-unit losses and strata for its part of the global batch, every rank ends
with the same gradient g = Σ_s π_s ḡ_s over the whole global batch (methods.md §1.2, §6):

* ``loss_weighted`` (default, ``GradReducer``): one K-float SUM all-reduce gives the global counts
  N_s, hence π and the weights w_k = π_s(k) / N_s(k); the local loss Σ_k w_k ℓ_k is
  backpropagated once and the gradient is SUM-all-reduced. Σ over ranks of the local weighted
  sums is exactly Σ_s π_s ḡ_s. How it is fast (benchmarks/allreduce.py; the first version, which
  flattened, concatenated and copied back P floats after the backward, was 1.2-1.9x DDP's step):
  the count all-reduce is started from the batch before the forward and waited for after it; the
  parameters' ``.grad`` are views into one persistent flat buffer (no allocation, no copy), cut
  into ~``bucket_cap_mb`` buckets that are all-reduced asynchronously while the backward still
  runs, each as soon as its gradients are final (DDP's scheme, done here because DDP averages the
  ranks' means, which is not the pooled mean when shards differ in size).
* ``stratum_sums``: each rank backpropagates the K local stratum loss sums separately and one
  flat buffer [g_sum_0 | ... | g_sum_{K-1} | counts] is SUM-all-reduced; every rank then forms
  Σ_s π_s g_sum_s / N_s. Same result with K× the traffic; kept as the literal formulation and
  as a cross-check.

Strata absent from the global batch (N_s = 0) are dropped and π renormalised (methods.md §1.2).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ray_pinet.methods.ga import ga_weights, stratum_counts, stratum_prior as _ga_prior
from ray_pinet.training.collectives import all_reduce_sum_, assign_flat_grads_, flatten_grads, is_distributed


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


class GradReducer:
    """``loss_weighted`` GA for one parameter list, reused across the steps of an epoch.

    Per step: ``start_counts(batch_unit_counts(...))`` before the forward (async K-float count
    all-reduce), then ``backward(unit_loss, unit_strata, ...)``. The flat float32 buffer holds
    [loss slot | gradients in reverse parameter order], reverse because the backward produces
    the last layers' gradients first. Buckets are launched strictly in index order (gloo pairs
    collectives by their order, so every rank must issue the same sequence); a bucket whose
    parameters got no gradient on this rank (unused, or no local units at all) is launched after
    the backward with its zeros. ``close()`` removes the hooks; until then they act only inside
    ``backward`` (another backward through these parameters is left alone).
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], num_strata: int, bucket_cap_mb: float = 25.0):
        self.params = [p for p in params if p.requires_grad]
        self.num_strata = num_strata
        dtypes = {p.dtype for p in self.params}
        if dtypes - {torch.float32}:
            raise ValueError(f"GradReducer needs float32 parameters, got {sorted(map(str, dtypes))}")
        cap = max(1, int(bucket_cap_mb * 2**20 / 4))  # floats per bucket
        total = 1 + sum(p.numel() for p in self.params)
        self.flat = torch.zeros(total, dtype=torch.float32)
        self.views: list[torch.Tensor] = [torch.empty(0)] * len(self.params)
        # bucket b = flat[bounds[b]:bounds[b + 1]]; bucket 0 also holds the loss slot flat[0]
        self.bounds, self.bucket_of, size = [0], [0] * len(self.params), 1
        offset = 1
        for i in reversed(range(len(self.params))):
            p = self.params[i]
            if size >= cap:
                self.bounds.append(offset)
                size = 0
            self.views[i] = self.flat[offset : offset + p.numel()].view_as(p)
            self.bucket_of[i] = len(self.bounds) - 1
            offset += p.numel()
            size += p.numel()
        self.bounds.append(total)
        self.num_buckets = len(self.bounds) - 1
        self.bucket_size = [0] * self.num_buckets
        for b in self.bucket_of:
            self.bucket_size[b] += 1
        self._armed = False
        self._pending: list[int] = []
        self._next = 0
        self._works: list = []
        self._counts: Optional[torch.Tensor] = None
        self._local_counts: Optional[torch.Tensor] = None
        self._counts_work = None
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i: int):
        def on_grad(_param: torch.Tensor) -> None:
            if self._armed:
                self._pending[self.bucket_of[i]] -= 1
                self._launch_ready()
        return on_grad

    def _launch_ready(self, force: bool = False) -> None:
        while self._next < self.num_buckets and (force or self._pending[self._next] == 0):
            b = self._next
            if is_distributed():
                chunk = self.flat[self.bounds[b] : self.bounds[b + 1]]
                self._works.append(dist.all_reduce(chunk, op=dist.ReduceOp.SUM, async_op=True))
            self._next += 1

    def start_counts(self, local_counts: torch.Tensor) -> None:
        """Start the all-reduce of this rank's units per stratum (``methods.ga.batch_unit_counts``)."""
        self._local_counts = local_counts.to(torch.float64)
        self._counts = self._local_counts.clone()
        self._counts_work = (dist.all_reduce(self._counts, op=dist.ReduceOp.SUM, async_op=True)
                             if is_distributed() else None)

    def backward(
        self, unit_loss: torch.Tensor, unit_strata: torch.Tensor, prior_kind: str, user_share: Sequence[float],
        alpha: float = 0.0,
    ) -> GAStepInfo:
        """Set every param's ``.grad`` to the global GA gradient. Collective: call on every rank."""
        local_counts = stratum_counts(unit_strata, self.num_strata)
        if self._counts is None:
            self.start_counts(local_counts)
        elif not torch.equal(local_counts, self._local_counts):
            raise RuntimeError(
                f"the loss has units per stratum {local_counts.tolist()} but the batch counted "
                f"{self._local_counts.tolist()} before the forward (batch_unit_counts and the loss "
                "disagree on which positions are samples)"
            )
        if self._counts_work is not None:
            self._counts_work.wait()
        counts, self._counts, self._counts_work = self._counts, None, None
        prior = stratum_prior(prior_kind, self.num_strata, user_share, counts, alpha).to(torch.float64)
        w = ga_weights(unit_strata, counts, prior).to(unit_loss.dtype)
        local = (w * unit_loss).sum()
        self.flat.zero_()
        for p, v in zip(self.params, self.views):
            p.grad = v  # accumulates in place into the flat buffer (zero_grad may have unset it)
        self.flat[0] = float(local.detach())  # the loss rides in bucket 0: no extra collective
        self._pending, self._next, self._works = list(self.bucket_size), 0, []
        t0 = time.perf_counter()
        self._armed = True
        try:
            self._launch_ready()  # buckets without parameters
            if local.requires_grad:  # else no local units: this rank contributes zeros
                torch.autograd.backward(local, inputs=self.params)
        finally:
            self._armed = False
        backward_s = time.perf_counter() - t0
        self._launch_ready(force=True)
        for work in self._works:
            work.wait()
        self._works = []
        return GAStepInfo(counts, prior, float(self.flat[0]), backward_s)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


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
    """Set ``p.grad`` of every param to the global GA gradient. Collective: call on every rank.
    One-off form (tests, checks); a training loop keeps one ``GradReducer`` for its steps."""
    params = list(params)
    if reduce == "loss_weighted":
        reducer = GradReducer(params, num_strata)
        try:
            return reducer.backward(unit_loss, unit_strata, prior_kind, user_share, alpha)
        finally:
            reducer.close()
    local_counts = stratum_counts(unit_strata, num_strata)
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
