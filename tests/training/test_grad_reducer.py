"""GradReducer, the production form of the ``loss_weighted`` GA step, in one process: it must give
the literal ``stratum_sums`` gradient whatever the bucket size, write it into one flat buffer
(the parameters' ``.grad`` are views of it), count units before the forward exactly as the loss
does, and stay out of other backward passes. Its collectives across 2 real workers, with several
buckets, are checked by test_exactness.py (the epoch) and tests/benchmarks (against DDP)."""

from __future__ import annotations

import pytest
import torch

from ray_pinet.methods.ga import Prior, batch_unit_counts, stratum_counts, unit_losses
from ray_pinet.methods.losses import per_position_losses
from ray_pinet.training import exactness as ex
from ray_pinet.training.batches import TrainRows
from ray_pinet.training.collectives import flatten_grads
from ray_pinet.training.ga_step import GradReducer, ga_backward

P = ex.Problem()


@pytest.fixture(scope="module")
def batch():
    rows = TrainRows(ex.synthetic_train_table(P), P.max_len, P.num_rows, 2)
    return rows.take(torch.arange(P.num_rows))


def _units(model, batch, unit, loss="ce"):
    lv, ri = per_position_losses(model, batch.inputs, batch.targets, batch.negs, None, loss)
    ul, ur = unit_losses(lv, ri, len(batch), unit)
    return ul, batch.stratum[ur]


@pytest.mark.parametrize("unit", ["position", "user"])
@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_batch_unit_counts_match_the_loss_units(batch, unit, loss):
    model = ex._model(P, ex._cfg(P))
    _, strata = _units(model, batch, unit, loss)
    counted = batch_unit_counts(batch.inputs, batch.targets, batch.stratum, unit, P.num_strata)
    assert torch.equal(counted, stratum_counts(strata, P.num_strata)) and counted.sum() > 0


@pytest.mark.parametrize("unit", ["position", "user"])
@pytest.mark.parametrize("cap_mb", [25.0, 0.002])
def test_reducer_equals_literal_stratum_sums_for_any_bucket_size(batch, unit, cap_mb):
    model = ex._model(P, ex._cfg(P))
    params = list(model.backbone_parameters())
    ul, strata = _units(model, batch, unit)
    ref_info = ga_backward(params, ul, strata, 2, Prior("power", 0.5, [0.8, 0.2]), "stratum_sums")
    ref = flatten_grads(params).clone()
    model.zero_grad(set_to_none=True)
    reducer = GradReducer(params, 2, cap_mb)
    try:
        # as the loop does it: counts from the batch before the forward, then the backward
        reducer.start_counts(batch_unit_counts(batch.inputs, batch.targets, batch.stratum, unit, 2))
        ul, strata = _units(model, batch, unit)
        info = reducer.backward(ul, strata, Prior("power", 0.5, [0.8, 0.2]))
    finally:
        reducer.close()
    assert (reducer.num_buckets > 1) == (cap_mb < 1)
    got = flatten_grads(params)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6
    assert info.loss == pytest.approx(ref_info.loss, rel=1e-6)
    assert torch.equal(info.global_counts, ref_info.global_counts)
    storage = reducer.flat.untyped_storage().data_ptr()
    assert all(p.grad.untyped_storage().data_ptr() == storage for p in params)


def test_units_that_differ_from_the_counted_batch_are_an_error(batch):
    model = ex._model(P, ex._cfg(P))
    params = list(model.backbone_parameters())
    reducer = GradReducer(params, 2)
    try:
        reducer.start_counts(batch_unit_counts(batch.inputs, batch.targets, batch.stratum, "user", 2))
        ul, strata = _units(model, batch, "position")
        with pytest.raises(RuntimeError, match="units per stratum"):
            reducer.backward(ul, strata, Prior("interaction_share"))
    finally:
        reducer.close()


def test_hooks_leave_other_backward_passes_alone_and_close_removes_them(batch):
    model = ex._model(P, ex._cfg(P))
    params = list(model.backbone_parameters())
    reducer = GradReducer(params, 2, 0.002)
    ul, _ = _units(model, batch, "position")
    ul.mean().backward()  # not the reducer's backward: plain gradients, no bucket bookkeeping
    assert reducer._next == 0 and not reducer._works
    plain = flatten_grads(params).clone()
    assert all(p.grad.untyped_storage().data_ptr() != reducer.flat.untyped_storage().data_ptr() for p in params)
    reducer.close()
    assert not reducer._hooks
    model.zero_grad(set_to_none=True)
    ul, _ = _units(model, batch, "position")
    ul.mean().backward()
    assert torch.allclose(flatten_grads(params), plain)


def test_a_rank_without_units_contributes_zeros(batch):
    model = ex._model(P, ex._cfg(P))
    params = list(model.backbone_parameters())
    reducer = GradReducer(params, 2)
    try:
        empty = batch_unit_counts(batch.inputs[:0], batch.targets[:0], batch.stratum[:0], "position", 2)
        reducer.start_counts(empty)
        info = reducer.backward(torch.zeros(0), torch.zeros(0, dtype=torch.int64), Prior("interaction_share"))
    finally:
        reducer.close()
    assert info.loss == 0.0 and float(info.global_counts.sum()) == 0.0
    assert float(flatten_grads(params).abs().sum()) == 0.0
