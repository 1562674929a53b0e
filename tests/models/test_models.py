"""Backbones, RecModel interface and plugins: shapes, determinism, masking, identity plugins."""

from __future__ import annotations

import pytest
import torch

from ray_pinet.config_base import ConfigError, from_dict
from ray_pinet.models.config import ModelConfig, PluginConfig
from ray_pinet.models.registry import build_model

M, K, L = 30, 2, 6
BACKBONES = ["sasrec", "gru4rec", "din"]
SMALL = dict(dim=8, max_len=L, num_heads=2, din_attention_hidden=[6, 4], din_mlp=[10, 6])


def make(backbone: str, plugins: PluginConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(backbone=backbone, **SMALL), M, K, plugins)
    return model.eval()


def batch():
    inputs = torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 0, 0, 9, 10], [1, 2, 3, 4, 5, 6]])
    items = torch.randint(1, M + 1, (3, L, 4), generator=torch.Generator().manual_seed(1))
    stratum = torch.tensor([0, 1, 1])
    return inputs, items, stratum


def perturb_plugins(model) -> None:
    with torch.no_grad():
        for p in model.plugin_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes_and_deterministic_init(backbone):
    model = make(backbone, PluginConfig(item_offset=True))
    inputs, items, stratum = batch()
    assert model.score(inputs, items, stratum).shape == (3, L, 4)
    assert model.predict(inputs, stratum, items[:, 0]).shape == (3, 4)
    assert model.supports_full == (backbone != "din")
    if model.supports_full:
        assert model.states(inputs, stratum).shape == (3, L, 8)
        assert model.full_logits(torch.randn(5, 8), torch.zeros(5, dtype=torch.long)).shape == (5, M + 1)
        assert model.predict(inputs, stratum).shape == (3, M + 1)
    else:
        with pytest.raises(ValueError, match="dot-product backbone"):
            model.predict(inputs, stratum)
    again = make(backbone, PluginConfig(item_offset=True))
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    other = make(backbone, seed=1)
    assert not torch.equal(other.backbone.item_emb.weight, model.backbone.item_emb.weight)
    assert torch.all(model.backbone.item_emb.weight[0] == 0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_parameter_groups_are_disjoint_and_complete(backbone):
    model = make(backbone, PluginConfig(item_offset=True))
    bb = {id(p) for p in model.backbone_parameters()}
    pl = {id(p) for p in model.plugin_parameters()}
    assert bb and pl and not bb & pl
    assert bb | pl == {id(p) for p in model.parameters()}
    assert not list(make(backbone).plugin_parameters())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fresh_plugins_are_exact_identity(backbone):
    plain = make(backbone)
    model = make(backbone, PluginConfig(adapter_hidden=[5, 7], item_offset=True))
    model.backbone.load_state_dict(plain.backbone.state_dict())
    inputs, items, stratum = batch()
    ref = plain.score(inputs, items, None)
    assert torch.equal(model.score(inputs, items, stratum), ref)
    assert torch.equal(model.predict(inputs, stratum, items[:, 0]), plain.predict(inputs, None, items[:, 0]))
    if model.supports_full:
        assert torch.equal(model.predict(inputs, stratum), plain.predict(inputs, None))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_plugins_route_by_stratum_and_bypass(backbone):
    model = make(backbone, PluginConfig(item_offset=True))
    inputs, items, stratum = batch()
    base = model.score(inputs, items, None)
    perturb_plugins(model)
    routed = model.score(inputs, items, stratum)
    assert not torch.allclose(routed, base)
    # each row equals what it gets alone: routing is per row, by its own stratum
    for b in range(3):
        alone = model.score(inputs[b : b + 1], items[b : b + 1], stratum[b : b + 1])
        torch.testing.assert_close(routed[b : b + 1], alone)
    model.use_plugins = False
    assert torch.equal(model.score(inputs, items, stratum), base)
    model.use_plugins = True
    assert torch.equal(model.score(inputs, items, None), base)
    model.reset_plugins()
    torch.testing.assert_close(model.score(inputs, items, stratum), base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="stratum values"):
        model.score(inputs, items, torch.tensor([0, 1, 2]))


def test_din_reset_copies_trained_head():
    model = make("din", PluginConfig())
    inputs, items, stratum = batch()
    with torch.no_grad():
        for p in model.backbone.head.parameters():
            p.mul_(1.5)  # "training" the backbone head after the plugins were built
    model.reset_plugins()
    assert torch.equal(model.score(inputs, items, stratum), model.score(inputs, items, None))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_causal_and_padding_invariant(backbone):
    model = make(backbone)
    inputs, items, _ = batch()
    ref = model.score(inputs, items, None)
    future = inputs.clone()
    future[:, -1] = 7  # changing the newest item changes nothing before it
    torch.testing.assert_close(model.score(future, items, None)[:, :-1], ref[:, :-1])
    # more left padding (a batch padded to a longer length) leaves real positions unchanged
    short = inputs[1:2, 2:]
    got = model.score(short, items[1:2, 2:], None)
    torch.testing.assert_close(got[:, -2:], ref[1:2, -2:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
def test_score_predict_agree_with_full_logits(backbone):
    model = make(backbone, PluginConfig(item_offset=True))
    perturb_plugins(model)
    inputs, items, stratum = batch()
    states = model.states(inputs, stratum)
    full = model.full_logits(states.reshape(-1, 8), stratum.repeat_interleave(L)).view(3, L, M + 1)
    torch.testing.assert_close(model.score(inputs, items, stratum), full.gather(2, items))
    skip = model.full_logits(states.reshape(-1, 8), stratum.repeat_interleave(L), skip_padding=True)
    torch.testing.assert_close(skip, full.view(-1, M + 1)[:, 1:])
    pred = model.predict(inputs, stratum)
    torch.testing.assert_close(pred, full[:, -1])
    torch.testing.assert_close(model.predict(inputs, stratum, items[:, 0]), pred.gather(1, items[:, 0]))


def test_din_attention_matches_naive_concat():
    model = make("din")
    din = model.backbone
    inputs, items, _ = batch()
    hist, target = din.item_emb(inputs), din.item_emb(items)
    got = din.attention_logits(hist, target)
    h = hist[:, None, None].expand(-1, L, 4, -1, -1)
    e = target.unsqueeze(3).expand_as(h)
    naive = din.attention(torch.cat([h, e, h - e, h * e], -1)).squeeze(-1)
    torch.testing.assert_close(got, naive, rtol=1e-5, atol=1e-6)
    # predict = score at the last position; inputs[:, t] = 0 rows contribute nothing
    torch.testing.assert_close(model.predict(inputs, None, items[:, -1]), model.score(inputs, items, None)[:, -1])


def test_configs_validate():
    cfg = from_dict(ModelConfig, {"backbone": "din", "din_mlp": [32, 16]})
    assert cfg.din_mlp == [32, 16]
    with pytest.raises(ConfigError, match="num_heads"):
        from_dict(ModelConfig, {"dim": 10, "num_heads": 3})
    with pytest.raises(ConfigError, match="backbone"):
        from_dict(ModelConfig, {"backbone": "bert"})
    with pytest.raises(ConfigError, match="head_layers"):
        from_dict(PluginConfig, {"head_layers": -1})


def test_dropout_matches_inverted_dropout_statistics():
    from ray_pinet.models.layers import dropout

    x = torch.ones(200_000)
    torch.manual_seed(0)
    y = dropout(x, 0.3, training=True)
    values = sorted(y.unique().tolist())
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.7)
    assert (y == 0).float().mean().item() == pytest.approx(0.3, abs=0.005)
    torch.manual_seed(0)
    assert torch.equal(dropout(x, 0.3, training=True), y)  # seeded
    assert dropout(x, 0.3, training=False) is x
