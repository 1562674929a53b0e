"""Inverse Gradient (IG, Lin et al. WSDM 2024; methods.md §5.3-5.4, §6 "Inverse Learning"): one
epoch of the meta-step, data-parallel and W-independent. Pure torch + ``collectives``.

Labeled training rows are split by file order (global sample id): the first ``ig_train_ratio``
are D_tr, the rest D_te. Per epoch:

* **Phase A** over D_tr: BCE on the labeled rows, optimizer step. ``as_coded`` never zeroes the
  gradients, so each step uses the sum of all the epoch's batch gradients so far (an accumulator
  of all-reduced gradients); ``clean`` zeroes them.
* **Phase B** over D_te batches (B labeled rows X_l and one keyed unlabeled item per row X_u):
  g = ∇ IDL(X_u) at θ, all-reduced *before* any sign (the sign of a mean is not the mean of
  signs); candidates θ⁺ = θ − η_s·d(g), θ⁻ = θ + η_s·d(g) (``as_coded``: d = a fresh Adam's first
  step, g / (|g| + ε) ≈ sign g; ``clean``: d = g, plain SGD); L⁺, L⁻, L⁰ = BCE(X_l) at θ⁺, θ⁻, θ
  as all-reduced sums, so every rank takes the same branch:
    forward (L⁺ < L⁻ and L⁺ < L⁰), inverse (L⁻ < L⁰), or stay.
  ``as_coded``: the public code does not zero gradients between a branch's two backward calls,
  so the update is θ_c − lr·d(±g + ∇BCE(θ_c)) with a fresh Adam (stay: ∇BCE(θ) with θ's Adam),
  and θ's Adam is re-created after every Phase-B step. ``clean``: θ_c, then one step of the
  persistent Adam on ∇BCE(θ_c).

Every sum is divided by the global batch size, never a local one. The step runs on the run's
device in fp32 whatever ``run.precision`` says (the branch compares three losses; bf16 rounding
would decide it); the loss sum stays on the device (no host wait per Phase-A step).
"""

from __future__ import annotations

import time

import torch
from torch.func import functional_call

from ray_pinet.methods.denoising import bce_rows, idl_rows
from ray_pinet.training.batches import epoch_batches
from ray_pinet.training.collectives import all_reduce_sum_, assign_flat_grads_, flatten_grads, split_flat

ADAM_EPS = 1e-8
BRANCHES = ("forward", "inverse", "stay")


def _first_adam_step(g: torch.Tensor) -> torch.Tensor:
    """A fresh Adam's first update direction (bias-corrected m̂ / (√v̂ + ε) = g / (|g| + ε))."""
    return g / (g.abs() + ADAM_EPS)


def _flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The flat gradient of ``loss`` (zeros where a parameter has none: a rank without rows of
    the batch still sends its share, zeros, to the all-reduce)."""
    loss = loss + sum(p.sum() * 0.0 for p in params)  # a graph to every parameter, rows or none
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return flatten_grads(params, grads)


def ig_epoch(run) -> dict[str, float]:
    """One IG epoch of ``run`` (a ``TwoTowerRun`` with ``model.method=ncf``, ``model.loss=ig``)."""
    cfg, m = run.cfg, run.cfg.model
    as_coded = m.ig_mode == "as_coded"
    model, params = run.model, run.params
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    train = run.rows["train"]
    n_tr = int(run.num_train * m.ig_train_ratio)
    ids_tr = torch.arange(n_tr).numpy()
    ids_te = torch.arange(n_tr, run.num_train).numpy()
    batch = cfg.optim.batch_size
    t0 = time.perf_counter()
    dev = run.device
    loss_sum = torch.zeros(1, dtype=torch.float64, device=dev)
    branches = torch.zeros(len(BRANCHES), dtype=torch.float64)  # Phase-B steps per branch (host counts)

    # -- Phase A: BCE on D_tr ------------------------------------------------------------------
    acc = torch.zeros(sum(p.numel() for p in params), device=dev) if as_coded else None
    for ids in epoch_batches(run.num_train, batch, cfg.run.seed, run.epoch, ids=ids_tr):
        _, _, users, items, labels = train.take_labeled(ids)
        loss = bce_rows(model(users, items), labels).sum() / len(ids)
        g = all_reduce_sum_(_flat_grad(loss, params))
        if as_coded:
            acc += g
            g = acc
        assign_flat_grads_(params, g)
        run.opt.step()
        run.step += 1
        loss_sum += all_reduce_sum_(loss.detach().double().reshape(1)) * len(ids)

    # -- Phase B: the three-way step on D_te ---------------------------------------------------
    for ids in epoch_batches(run.num_train, batch, cfg.run.seed, run.epoch, ids=ids_te):
        _, mine, users, items, labels = train.take_labeled(ids)
        unlabeled = run.sampler(model, users, mine, run.epoch)[:, 0] if len(users) else users
        theta = [p.detach().clone() for p in params]
        g_idl = all_reduce_sum_(_flat_grad(idl_rows(model(users, unlabeled)).sum() / len(ids), params))
        d = _first_adam_step(g_idl) if as_coded else g_idl
        step_s = split_flat(m.ig_sample_lr * d, params)
        cand = {"forward": [t - s for t, s in zip(theta, step_s)], "inverse": [t + s for t, s in zip(theta, step_s)],
                "stay": theta}

        def bce_at(state: list[torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                out = functional_call(model, dict(zip(names, state)), (users, items))
                return bce_rows(out, labels).sum().double().reshape(1)

        losses = all_reduce_sum_(torch.cat([bce_at(cand[k]) for k in BRANCHES]))
        lp, lm, l0 = losses.tolist()
        branch = "forward" if (lp < lm and lp < l0) else ("inverse" if lm < l0 else "stay")
        branches[BRANCHES.index(branch)] += 1
        with torch.no_grad():
            for p, v in zip(params, cand[branch]):
                p.copy_(v)
        g_bce = all_reduce_sum_(_flat_grad(bce_rows(model(users, items), labels).sum() / len(ids), params))
        if as_coded and branch != "stay":
            direction = g_bce + (g_idl if branch == "forward" else -g_idl)
            with torch.no_grad():
                for p, s in zip(params, split_flat(cfg.optim.lr * _first_adam_step(direction), params)):
                    p.sub_(s)
        else:
            assign_flat_grads_(params, g_bce)
            run.opt.step()
        if as_coded:  # θ's Adam is re-created after every Phase-B step
            run.opt = torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        run.step += 1
        loss_sum += l0  # the batch's summed BCE at θ (all-reduced)
    seconds = time.perf_counter() - t0
    run.epoch += 1
    total = branches.sum().clamp(min=1)
    shares = {f"train/ig_{b}_share": float(branches[i] / total) for i, b in enumerate(BRANCHES)}
    return {"train/loss": float(loss_sum[0]) / run.num_train, "train/seconds": seconds,
            "train/lr": cfg.optim.lr, **shares}
