"""The GA gradient on W ranks: the custom all-reduce at the heart of ray-pinet.

Given each rank's per-unit losses and strata for its part of the global batch, every rank ends with the same
gradient g = Σ_s π_s ḡ_s over the whole global batch (methods.md §1.2, §6):

* ``loss_weighted`` (default, ``GradReducer``): one K-float SUM all-reduce gives the global counts N_s, hence
  π and the weights w_k = π_s(k) / N_s(k); the local loss Σ_k w_k ℓ_k is backpropagated once and the gradient
  is SUM-all-reduced. Σ over ranks of the local weighted sums is exactly Σ_s π_s ḡ_s. How it is fast
  (benchmarks/allreduce.py; the first version, which flattened, concatenated and copied back P floats after
  the backward, was 1.2-1.9x DDP's step): the count all-reduce is started from the batch before the forward
  and waited for after it; the parameters' ``.grad`` are views into one persistent flat buffer
  (no allocation, no copy), cut into ~``bucket_cap_mb`` buckets that are all-reduced asynchronously while the
  backward still runs, each as soon as its gradients are final (DDP's scheme, done here because DDP averages
  the ranks' means, which is not the pooled mean when shards differ in size).
* ``stratum_sums``: each rank backpropagates the K local stratum loss sums separately and one flat buffer
  [g_sum_0 | ... | g_sum_{K-1} | counts] is SUM-all-reduced; every rank then forms Σ_s π_s g_sum_s / N_s. Same
  result with K× the traffic; kept as the literal formulation and as a cross-check.

Strata absent from the global batch (N_s = 0) are dropped and π renormalised (methods.md §1.2).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ray_pinet.methods.ga import Prior, ga_weights, stratum_counts, stratum_prior, stratum_prior_on_device
from ray_pinet.training.collectives import all_reduce_sum_, assign_flat_grads_, flatten_grads, is_distributed


@dataclass
class GAStepInfo:
    global_counts: torch.Tensor  # float64[K]: units of each stratum in the global batch
    prior: torch.Tensor  # float64[K]: π used for this step
    # Σ_s π_s · (mean loss of stratum s) over the global batch: a 0-dim float32 tensor on the
    # parameters' device from GradReducer (read once per epoch, not per step), a float otherwise
    loss: "torch.Tensor | float"
    backward_s: float = 0.0  # of ga_backward's time, the local autograd pass(es); the rest is the collectives


class GradReducer:
    """``loss_weighted`` GA for one parameter list, reused across the steps of an epoch.

    Per step: ``start_counts(batch_unit_counts(...))`` before the forward (async K-float count all-reduce),
    then ``backward(unit_loss, unit_strata, ...)``. The flat float32 buffer holds [loss slot | gradients in
    reverse parameter order], reverse because the backward produces the last layers' gradients first. Buckets
    are launched strictly in index order (gloo pairs collectives by their order, so every rank must issue the
    same sequence); a bucket whose parameters got no gradient on this rank (unused, or no local units at all)
    is launched after the backward with its zeros. ``close()`` removes the hooks; until then they act only
    inside ``backward`` (another backward through these parameters is left alone)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], num_strata: int, bucket_cap_mb: float = 25.0):
        self.params = [p for p in params if p.requires_grad]
        self.num_strata = num_strata
        dtypes = {p.dtype for p in self.params}
        if dtypes - {torch.float32, torch.bfloat16}:
            raise ValueError(f"GradReducer needs float32 or bfloat16 parameters, got {sorted(map(str, dtypes))}")
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"GradReducer needs its parameters on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")
        # On the host every check reads its value at once (free there); on a GPU reading back a
        # value stalls the stream, so the checks accumulate on the device and ``check()`` reads
        # them once (run_epoch calls it at the end of the epoch).
        self.on_host = self.device.type == "cpu"
        self._bad_counts = torch.zeros((), dtype=torch.bool, device=self.device)
        self._bad_prior = torch.zeros((), dtype=torch.bool, device=self.device)
        # bf16 parameters get bf16 gradients: those are copied into the fp32 buffer by their
        # hook and handed back in their dtype after the reduce, so the sum itself is fp32.
        self._cast = [p.dtype != torch.float32 for p in self.params]
        cap = max(1, int(bucket_cap_mb * 2**20 / 4))  # floats per bucket
        total = 1 + sum(p.numel() for p in self.params)
        self.flat = torch.zeros(total, dtype=torch.float32, device=self.device)
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
        def on_grad(param: torch.Tensor) -> None:
            if self._armed:
                if self._cast[i]:
                    self.views[i].copy_(param.grad)
                    param.grad = None
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
        self._local_counts = local_counts.to(device=self.device, dtype=torch.float64)
        self._counts = self._local_counts.clone()
        self._counts_work = (dist.all_reduce(self._counts, op=dist.ReduceOp.SUM, async_op=True)
                             if is_distributed() else None)

    def backward(self, unit_loss: torch.Tensor, unit_strata: torch.Tensor, prior: Prior,
                 extra_inputs: Sequence[torch.Tensor] = ()) -> GAStepInfo:
        """Set every param's ``.grad`` to the global GA gradient. Collective: call on every rank.
        ``extra_inputs``: leaf tensors that also get this rank's GA-weighted gradient in ``.grad``,
        not reduced here (the touched item rows of training/sparse_rows.py, exchanged by row)."""
        local_counts = stratum_counts(unit_strata, self.num_strata)
        if self._counts is None:
            self.start_counts(local_counts)
        elif self.on_host and not torch.equal(local_counts, self._local_counts):
            raise RuntimeError(self._counts_message(local_counts.tolist(), self._local_counts.tolist()))
        elif not self.on_host:
            self._bad_counts |= (local_counts != self._local_counts).any()
        if self._counts_work is not None:
            self._counts_work.wait()
        counts, self._counts, self._counts_work = self._counts, None, None
        # The loss and its GA weights stay fp32 under bf16 autocast (fp32 losses are a no-op here).
        unit_loss = unit_loss.float()
        if self.on_host:
            pi = stratum_prior(prior, counts)
            w = ga_weights(unit_strata, counts, pi).to(unit_loss.dtype)
        else:
            pi, bad = stratum_prior_on_device(prior, counts)
            n_unit = counts[unit_strata.long()]
            self._bad_prior |= bad | (n_unit <= 0).any()
            w = (pi[unit_strata.long()] / n_unit).to(unit_loss.dtype)
        local = (w * unit_loss).sum()
        self.flat.zero_()
        for p, v, cast in zip(self.params, self.views, self._cast):
            # accumulates in place into the flat buffer (zero_grad may have unset it); a bf16
            # parameter accumulates in its own dtype and its hook copies the result in
            p.grad = None if cast else v
        self.flat[0:1].copy_(local.detach().reshape(1))  # the loss rides in bucket 0: no extra collective
        self._pending, self._next, self._works = list(self.bucket_size), 0, []
        t0 = time.perf_counter()
        self._armed = True
        try:
            self._launch_ready()  # buckets without parameters
            if local.requires_grad:  # else no local units: this rank contributes zeros
                torch.autograd.backward(local, inputs=self.params + list(extra_inputs))
        finally:
            self._armed = False
        backward_s = time.perf_counter() - t0
        self._launch_ready(force=True)
        for work in self._works:
            work.wait()
        self._works = []
        for p, v, cast in zip(self.params, self.views, self._cast):
            if cast:
                p.grad = v.to(p.dtype)
        return GAStepInfo(counts, pi, self.flat[0].clone(), backward_s)

    @staticmethod
    def _counts_message(loss_counts, batch_counts) -> str:
        return (f"the loss has units per stratum {loss_counts} but the batch counted {batch_counts} "
                "before the forward (batch_unit_counts and the loss disagree on which positions are samples)")

    def check(self) -> None:
        """Raise what the device-side checks of the steps so far found (one read of two flags)."""
        if self.on_host:
            return
        bad_counts, bad_prior = torch.stack([self._bad_counts, self._bad_prior]).tolist()
        if bad_counts:
            raise RuntimeError(self._counts_message("(differing on a GPU step)", "(another count)"))
        if bad_prior:
            raise ValueError("a stratum present in a global batch had user_share 0 or no counted units "
                             "(global_counts must count this shard's units)")

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _grads(loss: torch.Tensor, params: Sequence[torch.nn.Parameter], retain_graph: bool) -> list:
    if not loss.requires_grad:  # no local units: this rank contributes zeros
        return [None] * len(params)
    return list(torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True))


def ga_backward(params: Sequence[torch.nn.Parameter], unit_loss: torch.Tensor, unit_strata: torch.Tensor,
                num_strata: int, prior: Prior, reduce: str = "loss_weighted") -> GAStepInfo:
    """Set ``p.grad`` of every param to the global GA gradient. Collective: call on every rank.
    One-off form (tests, checks); a training loop keeps one ``GradReducer`` for its steps."""
    params = list(params)
    if reduce == "loss_weighted":
        reducer = GradReducer(params, num_strata)
        try:
            return reducer.backward(unit_loss, unit_strata, prior)
        finally:
            reducer.close()
    local_counts = stratum_counts(unit_strata, num_strata)
    if reduce == "stratum_sums":
        parts, loss_sums = [], []
        backward_s = 0.0
        for s in range(num_strata):
            mask = unit_strata == s
            # the literal cross-check formulation: its per-stratum host reads are accepted
            ls = unit_loss[mask].float().sum() if bool(mask.any()) else unit_loss.new_zeros((), dtype=torch.float32)
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
        pi = stratum_prior(prior, counts).to(counts.device)
        coef = torch.where(counts > 0, pi / counts.clamp(min=1), torch.zeros_like(pi))
        g = torch.zeros(n_params, dtype=torch.float64, device=buf.device)
        for s in range(num_strata):
            if coef[s] != 0:
                g += coef[s] * buf[s * n_params : (s + 1) * n_params].to(torch.float64)
        assign_flat_grads_(params, g.to(torch.float32))
        return GAStepInfo(counts, pi, float((coef * sums).sum()), backward_s)
    raise ValueError(f"unknown GA reduce mode {reduce!r}")
