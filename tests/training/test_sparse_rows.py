"""Row-sparse item-table exchange (optim.item_exchange=rows): the sparse GA gradient is the dense
one's touched rows, lazy Adam moves only those rows, and the config refuses what it cannot do."""

from __future__ import annotations

import pytest
import torch

from ray_pinet.config import TrainConfig
from ray_pinet.config_base import ConfigError
from ray_pinet.methods.ga import batch_unit_counts, unit_losses
from ray_pinet.methods.losses import per_position_losses
from ray_pinet.training import exactness as ex
from ray_pinet.training.batches import TrainRows
from ray_pinet.training.ga_step import GradReducer
from ray_pinet.training.sparse_rows import RowSparseTable

P = ex.Problem(num_items=400)


def _ga_grads(sparse: bool, packed: bool):
    """The GA (power 0.5, per user) gradient of one global batch, dense or row-sparse."""
    cfg = ex._cfg(P, {"loss": "bce"})
    model = ex._model(P, cfg)
    rows = TrainRows(ex.synthetic_train_table(P), P.max_len, P.num_rows, 2)
    b = rows.take(torch.arange(P.num_rows), packed=packed)
    params = list(model.backbone_parameters())
    table = RowSparseTable(model) if sparse else None
    reducer = GradReducer(table.dense_params(params) if sparse else params, P.num_strata)
    reducer.start_counts(batch_unit_counts(b.inputs, b.targets, b.stratum, "user", P.num_strata, b.segments))
    args = (None, "bce")
    if sparse:
        override, (inputs, targets, negs) = table.begin([b.inputs, b.targets, b.negs])
        lv, ri = table.call(override, per_position_losses, inputs, targets, negs, *args, segments=b.segments)
    else:
        lv, ri = per_position_losses(model, b.inputs, b.targets, b.negs, *args, segments=b.segments)
    ul, ur = unit_losses(lv, ri, len(b), "user")
    reducer.backward(ul, b.stratum[ur], ex.variant_prior(P, "power", 0.5),
                     extra_inputs=[table.sub] if sparse else ())
    touched = table.exchange() if sparse else None
    reducer.close()
    return model, touched, b


@pytest.mark.parametrize("packed", [False, True])
def test_row_sparse_gradient_is_the_dense_gradient_of_the_touched_rows(packed):
    dense_model, _, b = _ga_grads(sparse=False, packed=packed)
    model, touched, _ = _ga_grads(sparse=True, packed=packed)
    g = model.backbone.item_emb.weight.grad
    assert g.is_sparse and g.shape == dense_model.backbone.item_emb.weight.shape
    expected = torch.unique(torch.cat([b.inputs.reshape(-1), b.targets.reshape(-1), b.negs.reshape(-1),
                                       torch.zeros(1, dtype=torch.int64)]))
    assert torch.equal(touched, expected)
    dense = dense_model.backbone.item_emb.weight.grad
    assert dense[~torch.isin(torch.arange(P.num_items + 1), touched)].abs().max() == 0
    assert ex.max_rel_error(g.to_dense(), dense) < 1e-6
    assert touched.numel() < P.num_items  # the point: fewer rows than the table
    for (name, p), (_, q) in zip(model.named_parameters(), dense_model.named_parameters()):
        if name != "backbone.item_emb.weight" and q.grad is not None:
            assert ex.max_rel_error(p.grad, q.grad) < 1e-6, name


def test_lazy_adam_moves_only_touched_rows():
    model, touched, _ = _ga_grads(sparse=True, packed=True)
    w = model.backbone.item_emb.weight
    before = w.detach().clone()
    torch.optim.SparseAdam([w], lr=0.01).step()
    moved = (w.detach() != before).any(1)
    assert bool(moved[touched[1:]].all())  # row 0 (padding) has zero gradient
    assert not bool(moved[~torch.isin(torch.arange(P.num_items + 1), touched)].any())


@pytest.mark.parametrize("sets,why", [
    ({"loss": "ce"}, "every item row a gradient"),
    ({"loss": "bce", "optim": {"item_exchange": "rows", "weight_decay": 0.01}}, "weight_decay=0"),
    ({"loss": "bce", "ga": {"reduce": "stratum_sums"}}, "stratum_sums"),
])
def test_rows_exchange_refuses_what_it_cannot_do(sets, why):
    d = {"optim": {"item_exchange": "rows"}, **sets}
    d["optim"] = {"item_exchange": "rows", **sets.get("optim", {})}
    with pytest.raises(ConfigError, match=why):
        TrainConfig.from_dict(d)
    assert TrainConfig.from_dict({"loss": "bce", "optim": {"item_exchange": "rows"}}).optim.item_exchange == "rows"
