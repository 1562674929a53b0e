"""Inverse Dual Loss, T-CE and R-CE against their definitions (methods.md §5), and the NCF
backbones' shapes and initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from ray_pinet.methods.denoising import (
    bce_rows,
    drop_rate_at,
    idl_rows,
    reweighted_rows,
    truncation_keep,
)
from ray_pinet.models.ncf import NCF


def test_idl_matches_the_formula_and_favours_the_likelier_label():
    s = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    want = []
    for v in s.tolist():
        lp, ln = -math.log(1 / (1 + math.exp(-v))), -math.log(1 - 1 / (1 + math.exp(-v)))
        den = lp ** 2 + ln ** 2 + 1e-9
        want.append(ln ** 2 / den * lp + lp ** 2 / den * ln)
    assert torch.allclose(idl_rows(s), torch.tensor(want), atol=1e-6)
    # at s = 4 the model believes "positive": IDL is close to ℓ⁺ (small), pushing s further up
    x = torch.tensor([4.0], requires_grad=True)
    idl_rows(x).sum().backward()
    assert float(x.grad) < 0  # descent raises s
    y = torch.tensor([-4.0], requires_grad=True)
    idl_rows(y).sum().backward()
    assert float(y.grad) > 0  # descent lowers s


def test_idl_weights_are_not_differentiated():
    s = torch.tensor([0.3], requires_grad=True)
    idl_rows(s).sum().backward()
    lp = torch.nn.functional.softplus(-torch.tensor(0.3))
    ln = torch.nn.functional.softplus(torch.tensor(0.3))
    wp, wn = ln ** 2 / (lp ** 2 + ln ** 2), lp ** 2 / (lp ** 2 + ln ** 2)
    sig = torch.sigmoid(torch.tensor(0.3))
    assert float(s.grad) == pytest.approx(float(wp * (sig - 1) + wn * sig), rel=1e-5)


def test_truncation_drops_the_hardest_positives_only():
    losses = torch.tensor([0.1, 2.0, 0.5, 3.0, 9.0, 0.2, 1.0, 0.3, 0.4, 0.6])
    labels = torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 1, 1])
    keep = truncation_keep(losses, labels, 0.2)
    assert keep.sum() == 8
    assert not keep[3] and not keep[1]  # the two largest positive losses
    assert keep[4]  # a negative with a large loss is kept
    assert truncation_keep(losses, labels, 0.0).all()


def test_drop_rate_schedule():
    assert drop_rate_at(0) == 0.0
    assert drop_rate_at(15000) == pytest.approx(0.1)
    assert drop_rate_at(10 ** 6) == pytest.approx(0.2)


def test_reweighting_down_weights_unlikely_positives():
    logits = torch.tensor([-3.0, 3.0, -3.0, 3.0])
    labels = torch.tensor([1, 1, 0, 0])
    r, b = reweighted_rows(logits, labels, alpha=0.2), bce_rows(logits, labels)
    p = torch.sigmoid(logits)
    assert torch.allclose(r, b * torch.tensor([p[0] ** 0.2, p[1] ** 0.2, (1 - p[2]) ** 0.8, (1 - p[3]) ** 0.8]))
    assert r[0] / b[0] < r[1] / b[1]


@pytest.mark.parametrize("kind", ["gmf", "neumf"])
def test_ncf_shapes_and_init(kind):
    torch.manual_seed(0)
    m = NCF(50, 40, dim=8, kind=kind, num_layers=3)
    out = m(torch.tensor([0, 3, 49]), torch.tensor([1, 39, 0]))
    assert out.shape == (3,) and torch.isfinite(out).all()
    assert float(m.user_gmf.weight.detach().std()) == pytest.approx(0.01, rel=0.2)
    if kind == "neumf":
        assert m.user_mlp.weight.shape == (50, 32)  # 2^(L-1)·d
        widths = [layer.out_features for layer in m.mlp if isinstance(layer, torch.nn.Linear)]
        assert widths == [32, 16, 8] and m.predict.in_features == 16
    with pytest.raises(ValueError):
        NCF(5, 5, kind="mlp")
