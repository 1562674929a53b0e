"""The heart of the product: W Ray Train workers compute exactly what one process computes.

* GA gradient (every prior, both reduce modes, both units) from 2 real gloo workers == the
  single-process value to 1e-6 relative, and == the literal per-sample oracle of methods.md §1.2.
* prior interaction_share == the plain pooled-mean gradient.
* a full epoch (several global batches, Adam) on 2 workers ends with the parameters of 1 process.
"""

from __future__ import annotations

import pytest
import torch

from ray_pinet.methods.ga import Prior, reference_ga_gradient, stratum_prior, unit_losses
from ray_pinet.methods.losses import per_position_losses
from ray_pinet.training import exactness as ex
from ray_pinet.training.batches import TrainRows

P = ex.Problem()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return ex.compute(P, ex.write_train_split(P, tmp_path_factory.mktemp("exact-data")))


@pytest.fixture(scope="module")
def distributed(ray_cluster, tmp_path_factory):
    return ex.run_distributed(P, 2, str(tmp_path_factory.mktemp("exact")))


def _oracle(prior_kind: str, alpha: float, unit: str) -> torch.Tensor:
    """Literal §1.2: one backward per sample, per-stratum means, Σ π_s ḡ_s."""
    table = ex.synthetic_train_table(P)
    cfg = ex._cfg(P)
    rows = TrainRows(table, P.max_len, P.num_rows, 0)
    batch = rows.take(torch.arange(P.num_rows))
    model = ex._model(P, cfg)
    model.eval()
    loss_vec, row_index = per_position_losses(model, batch.inputs, batch.targets, batch.negs, None, "ce")
    ul, ur = unit_losses(loss_vec, row_index, len(batch), unit)
    n_units = ul.numel()
    strata = batch.stratum[ur]
    counts = torch.bincount(strata, minlength=P.num_strata).to(torch.float64)
    prior = stratum_prior(ex.variant_prior(P, prior_kind, alpha), counts)

    # unit k lives in row ur[k]; its index among that row's units is its rank within the row
    first = {}
    samples = []
    for k, r in enumerate(ur.tolist()):
        samples.append((r, k - first.setdefault(r, k)))

    def loss_of(m, sample):
        r, j = sample
        sl = slice(r, r + 1)
        lv, ri = per_position_losses(m, batch.inputs[sl], batch.targets[sl], batch.negs[sl], None, "ce")
        return unit_losses(lv, ri, 1, unit)[0][j]

    assert len(samples) == n_units
    grads = reference_ga_gradient(model, loss_of, samples, strata.tolist(), prior)
    return torch.cat([grads[n].reshape(-1) for n, _ in model.named_parameters() if n.startswith("backbone.")])


@pytest.mark.parametrize("prior,alpha", [("user_share", 0.0), ("power", 0.5), ("interaction_share", 0.0)])
@pytest.mark.parametrize("unit", ["position", "user"])
def test_single_process_equals_literal_oracle(single, prior, alpha, unit):
    oracle = _oracle(prior, alpha, unit)
    for reduce in ("loss_weighted", "stratum_sums"):
        got = single[f"grad/{prior}/{alpha}/{reduce}/{unit}"]
        assert ex.max_rel_error(got, oracle) < 1e-5, (prior, reduce, unit)


def test_interaction_share_is_pooled_mean(single):
    table = ex.synthetic_train_table(P)
    model = ex._model(P, ex._cfg(P))
    rows = TrainRows(table, P.max_len, P.num_rows, 0)
    b = rows.take(torch.arange(P.num_rows))
    loss_vec, _ = per_position_losses(model, b.inputs, b.targets, b.negs, None, "ce")
    params = list(model.backbone_parameters())
    pooled = torch.autograd.grad(loss_vec.mean(), params, allow_unused=True)
    pooled = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(pooled, params)])
    got = single["grad/interaction_share/0.0/loss_weighted/position"]
    assert ex.max_rel_error(got, pooled) < 1e-6
    # and the GA priors really differ from it on this long-tailed batch (the test can fail)
    assert ex.max_rel_error(single["grad/user_share/0.0/loss_weighted/position"], pooled) > 1e-3


def test_two_workers_equal_one_process(single, distributed):
    for prior, alpha, reduce, unit in ex.VARIANTS:
        for layout in ("grad", "grad_packed"):  # padded and packed rows (optim.batching)
            key = f"{layout}/{prior}/{alpha}/{reduce}/{unit}"
            err = ex.max_rel_error(distributed[key], single[key])
            assert err < 1e-6, f"{key}: relative error {err:.2e}"
    init = torch.cat([q.detach().reshape(-1) for q in ex._model(P, ex._cfg(P)).backbone_parameters()])
    sgd_moved = (single["epoch_params/sgd"] - init).abs()
    assert sgd_moved.max().item() > 1e-3  # the epoch really trained (a no-op would pass trivially)
    diff = (distributed["epoch_params/sgd"] - single["epoch_params/sgd"]).abs().max().item()
    assert diff < 1e-5, f"SGD: after one epoch on 2 workers the parameters differ by {diff:.2e}"
    # Adam divides by sqrt(v): on coordinates whose exact gradient is zero (e.g. an attention key
    # bias, which softmax ignores) it turns float rounding noise (~1e-9) into lr-sized steps in
    # ANY two runs that sum in a different order. Those coordinates are recognised by their
    # SGD displacement (< 1e-6 while real ones move by >= 1e-3) and left out; they are few.
    live = sgd_moved > 1e-6
    assert live.float().mean().item() > 0.95
    for key in ("epoch_params/adam", "epoch_params/adam_padded"):  # packed (auto) and padded batches
        a, b = distributed[key][live], single[key][live]
        diff = (a - b).abs().max().item()
        assert diff < 1e-5, f"{key}: after one epoch on 2 workers the parameters differ by {diff:.2e}"


def test_packed_batches_give_the_padded_gradient_and_epoch(single):
    """optim.batching=packed changes the layout of each rank's windows, not the global batches:
    the GA gradient of every prior, reduce and unit, and an Adam epoch, equal the padded ones."""
    for prior, alpha, reduce, unit in ex.VARIANTS:
        packed = single[f"grad_packed/{prior}/{alpha}/{reduce}/{unit}"]
        padded = single[f"grad/{prior}/{alpha}/{reduce}/{unit}"]
        assert ex.max_rel_error(packed, padded) < 1e-5, (prior, alpha, reduce, unit)
    init = torch.cat([q.detach().reshape(-1) for q in ex._model(P, ex._cfg(P)).backbone_parameters()])
    live = (single["epoch_params/sgd"] - init).abs() > 1e-6  # Adam's zero-gradient noise: see above
    assert (single["epoch_params/adam_padded"] - init).abs().max().item() > 1e-3
    diff = (single["epoch_params/adam"][live] - single["epoch_params/adam_padded"][live]).abs().max().item()
    assert diff < 1e-5, f"a packed Adam epoch differs from the padded one by {diff:.2e}"


def test_one_stratum_epoch_and_transfer_epoch_are_worker_count_independent(single, distributed):
    """`separate`/`finetune` train on one stratum's ids; `transfer` runs Reptile trajectories
    that live on one rank each: 2 workers end where 1 process ends."""
    table = ex.synthetic_train_table(P)
    head = (table.column("stratum").to_numpy() == P.num_strata - 1).nonzero()[0]
    assert torch.equal(single["stratum_ids"], torch.from_numpy(head))
    assert torch.equal(distributed["stratum_ids"], single["stratum_ids"])
    init = torch.cat([q.detach().reshape(-1) for q in ex._model(P, ex._cfg(P)).backbone_parameters()])
    # transfer's inner Adam turns float noise on zero-gradient coordinates into lr-sized steps
    # (see the Adam note above): compare on the coordinates SGD moves (+ all discriminator ones).
    live = (single["epoch_params/sgd"] - init).abs() > 1e-6
    n_disc = single["epoch_params/transfer"].numel() - init.numel()
    masks = {"epoch_params/one_stratum": torch.ones_like(live),
             "epoch_params/transfer": torch.cat([live, torch.ones(n_disc, dtype=torch.bool)])}
    for key, mask in masks.items():
        moved = (single[key][: init.numel()] - init).abs().max().item()
        assert moved > 1e-3, f"{key}: the epoch did not train ({moved:.1e})"
        diff = (distributed[key][mask] - single[key][mask]).abs().max().item()
        assert diff < 1e-5, f"{key}: 2 workers differ from 1 process by {diff:.2e}"


def test_sampled_softmax_epoch_is_worker_count_independent(single, distributed):
    """loss sampled_softmax: every rank draws the same shared negatives (keyed by seed, epoch,
    step; proposal counts all-reduced) and gathers the same sorted in-batch targets, so an epoch
    on 2 workers ends where 1 process ends: packed rows with in-batch negatives, and padded rows
    with the uniform proposal."""
    init = torch.cat([q.detach().reshape(-1) for q in ex._model(P, ex._cfg(P)).backbone_parameters()])
    for key in ("epoch_params/sampled_softmax", "epoch_params/sampled_softmax_uniform_padded"):
        moved = (single[key] - init).abs().max().item()
        assert moved > 1e-3, f"{key}: the epoch did not train ({moved:.1e})"
        diff = (distributed[key] - single[key]).abs().max().item()
        assert diff < 1e-5, f"{key}: 2 workers differ from 1 process by {diff:.2e}"
    # the two runs really differ (in-batch negatives and the proposal change the gradient)
    diff = (single["epoch_params/sampled_softmax"] - single["epoch_params/sampled_softmax_uniform_padded"])
    assert diff.abs().max().item() > 1e-3


def test_row_sparse_item_exchange_epoch_is_worker_count_independent(single, distributed):
    """optim.item_exchange=rows (sampled softmax with in-batch negatives, packed rows): the item
    table's gradient crosses ranks as the union of touched rows and lazy Adam steps only those;
    2 workers end where 1 process ends."""
    init = torch.cat([q.detach().reshape(-1) for q in ex._model(P, ex._cfg(P)).backbone_parameters()])
    key = "epoch_params/sampled_softmax_rows"
    assert (single[key] - init).abs().max().item() > 1e-3
    diff = (distributed[key] - single[key]).abs().max().item()
    assert diff < 1e-5, f"{key}: 2 workers differ from 1 process by {diff:.2e}"


def test_reweight_prior_is_a_static_weighted_mean():
    counts = torch.tensor([30.0, 10.0], dtype=torch.float64)
    r = [0.8 / 0.4, 0.2 / 0.6]  # n_s / C_s
    pi = stratum_prior(Prior("reweight", stratum_weights=r), counts)
    # every tail unit weighs r_0, every head unit r_1, normalised over the batch
    w = pi / counts
    assert float(w[0] / w[1]) == pytest.approx(r[0] / r[1])
    assert float(pi.sum()) == pytest.approx(1.0)
    # power 0 (r = 1) is the pooled mean = interaction_share
    assert torch.allclose(stratum_prior(Prior("reweight", stratum_weights=[1.0, 1.0]), counts),
                          stratum_prior(Prior("interaction_share"), counts))
