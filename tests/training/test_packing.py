"""Padding-free (packed) training batches: the plan, the layout, and states/losses equal to padded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_pinet.config import TrainConfig
from ray_pinet.config_base import ConfigError
from ray_pinet.methods.ga import batch_unit_counts, unit_losses
from ray_pinet.methods.losses import per_position_losses
from ray_pinet.models.config import PluginConfig
from ray_pinet.models.registry import build_model
from ray_pinet.training import exactness as ex
from ray_pinet.training.batches import TrainRows
from ray_pinet.training.packing import pack_plan

P = ex.Problem(num_rows=64, num_items=40, max_len=10)


def test_plan_places_every_window_once_without_overlap():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(0, 11, size=200), [10, 10, 0, 1]])
    row, offset, rows, width = pack_plan(lengths, 10)
    used = np.zeros((rows, 10), dtype=int)
    for k, m in enumerate(lengths):
        if m == 0:
            assert row[k] == -1
            continue
        assert 0 <= row[k] < rows and offset[k] + m <= width <= 10
        used[row[k], offset[k]: offset[k] + m] += 1
    assert used.max() == 1 and used.sum() == lengths.sum()
    # first-fit decreasing needs at most ~11/9 OPT + 1 rows; OPT >= total / width
    assert rows <= int(np.ceil(lengths.sum() / 10 * 11 / 9)) + 1
    again = pack_plan(lengths, 10)
    assert all(np.array_equal(a, b) for a, b in zip((row, offset), again[:2]))
    with pytest.raises(ValueError, match="does not fit"):
        pack_plan(np.array([3, 11]), 10)


def test_packed_rows_hold_each_window_items_and_targets():
    table = ex.synthetic_train_table(P)
    rows = TrainRows(table, P.max_len, P.num_rows, 2)
    ids = torch.from_numpy(np.random.default_rng(1).permutation(P.num_rows)[:40])
    padded, packed = rows.take(ids), rows.take(ids, packed=True)
    assert len(packed) == len(padded) == 40
    assert packed.inputs.shape[0] < padded.inputs.shape[0]  # fewer rows: the point of packing
    assert torch.equal(packed.stratum, padded.stratum) and torch.equal(packed.sample_id, padded.sample_id)
    for w in range(len(padded)):
        real = padded.inputs[w] != 0
        cols = packed.segments == w
        assert torch.equal(packed.inputs[cols], padded.inputs[w][real])
        assert torch.equal(packed.targets[cols], padded.targets[w][real])
        assert torch.equal(packed.negs[cols], padded.negs[w][real])
    assert int((packed.inputs != 0).sum()) == int((padded.inputs != 0).sum())
    assert bool((packed.inputs[packed.segments < 0] == 0).all())
    for unit in ("position", "user"):
        assert torch.equal(
            batch_unit_counts(packed.inputs, packed.targets, packed.stratum, unit, 2, packed.segments),
            batch_unit_counts(padded.inputs, padded.targets, padded.stratum, unit, 2))


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_packed_losses_equal_padded_with_plugins(loss):
    """Per-window losses (and their gradients) of packed rows equal the padded ones, with the
    per-stratum plugins active (adapter, item bias, item offset), dropout on but in eval mode."""
    table = ex.synthetic_train_table(P)
    cfg = ex._cfg(P, {"loss": loss, "model.dropout": 0.3})
    torch.manual_seed(0)
    model = build_model(cfg.model, P.num_items, 2, PluginConfig(adapter_hidden=[8], item_offset=True))
    with torch.no_grad():  # plugins away from the identity, so routing by stratum matters
        for p in model.plugin_parameters():
            p.normal_(0, 0.1)
    model.eval()
    rows = TrainRows(table, P.max_len, P.num_rows, 2)
    ids = torch.arange(P.num_rows)
    out = {}
    for packed in (False, True):
        b = rows.take(ids, packed=packed)
        model.zero_grad()
        lv, ri = per_position_losses(model, b.inputs, b.targets, b.negs, b.stratum, loss, segments=b.segments)
        ul, ur = unit_losses(lv, ri, len(b), "user")
        ul.sum().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        out[packed] = (ul, ur, grads)
    assert torch.equal(out[True][1], out[False][1])  # same windows, same order
    assert torch.allclose(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    assert ex.max_rel_error(out[True][2], out[False][2]) < 1e-5


def test_a_rank_without_windows_gets_an_empty_packed_batch():
    table = ex.synthetic_train_table(P)
    rows = TrainRows(ex.shard(table, 1, 2), P.max_len, P.num_rows, 0)
    b = rows.take(torch.tensor([0, 2, 4]), packed=True)  # ids of rank 0 only
    assert len(b) == 0 and b.inputs.shape[0] == 0


def test_packed_batching_needs_sasrec_and_not_transfer():
    with pytest.raises(ConfigError, match="optim.batching=packed needs the sasrec backbone"):
        TrainConfig.from_dict({"model": {"backbone": "gru4rec"}, "optim": {"batching": "packed"}})
    with pytest.raises(ConfigError, match="transfer"):
        TrainConfig.from_dict({"method": "transfer", "optim": {"batching": "packed"}})
    assert TrainConfig.from_dict({}).packed
    assert not TrainConfig.from_dict({"model": {"backbone": "gru4rec"}}).packed
    assert not TrainConfig.from_dict({"method": "transfer"}).packed
    assert not TrainConfig.from_dict({"optim": {"batching": "padded"}}).packed
