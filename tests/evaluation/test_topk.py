"""Top-k accuracy and popularity-bias rates: hand-computed cases, shard additivity, and an oracle
port of the AUC-NS repository's dense ``topk_eval`` formulas."""

from __future__ import annotations

import math

import pytest
import torch

from ray_pinet.evaluation.topk import TopKStats, hot_items, topk_user_metrics


def d(r: int) -> float:
    """Discount of 0-based list position r."""
    return 1 / math.log2(r + 2)


def test_hand_computed_single_user():
    # items 0..6; item 6 is a training item scoring highest (masked); ranking 0,1,2,3,4,5.
    scores = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 9.0]])
    test = torch.tensor([[False, True, False, True, False, True, False]])  # T = {1, 3, 5}
    hot = torch.tensor([True, True, False, False, False, True, True])  # hot = {0, 1, 5, 6}
    exclude = torch.zeros(1, 7, dtype=torch.bool)
    exclude[0, 6] = True
    m = topk_user_metrics(scores, test, hot, (2, 4), exclude)
    # k = 2: R = [0, 1], hits 1 (item 1 at position 1)
    k2 = {name: float(v) for name, v in m[2].items()}
    assert k2["p"] == 0.5 and k2["r"] == pytest.approx(1 / 3) and k2["f1"] == pytest.approx(2 / 5)
    assert k2["ndcg"] == pytest.approx(d(1) / (d(0) + d(1)))
    # rec hot {0, 1}: over-hot {0} -> 1/2; rec cold {} -> 0 (no cold recommended)
    assert k2["ohr"] == 0.5 and k2["ocr"] == 0.0
    # test hot {1, 5}: under-hot {5} -> 1/2; test cold {3}: under-cold {3} -> 1
    assert k2["uhr"] == 0.5 and k2["ucr"] == 1.0
    # k = 4: R = [0, 1, 2, 3], hits {1, 3} at positions 1, 3
    k4 = {name: float(v) for name, v in m[4].items()}
    assert k4["p"] == 0.5 and k4["r"] == pytest.approx(2 / 3) and k4["f1"] == pytest.approx(4 / 7)
    assert k4["ndcg"] == pytest.approx((d(1) + d(3)) / (d(0) + d(1) + d(2)))
    assert k4["ohr"] == 0.5 and k4["ocr"] == 0.5  # rec cold {2, 3}: over {2}
    assert k4["uhr"] == 0.5 and k4["ucr"] == 0.0  # 3 recommended now
    # without the mask the training item takes position 0
    unmasked = topk_user_metrics(scores, test, hot, (2,), None)
    assert float(unmasked[2]["p"]) == 0.0


def test_users_without_test_items_are_skipped_and_idcg_caps_at_k():
    scores = torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    test = torch.tensor([[False, False, False], [True, True, True]])
    stats = TopKStats((1, 2))
    stats.add(scores, test, torch.tensor([True, False, False]))
    out = stats.finalize()
    assert out["users"] == 1.0
    assert out["p@1"] == 1.0 and out["ndcg@2"] == 1.0 and out["r@2"] == pytest.approx(2 / 3)
    assert out["f1@2"] == pytest.approx(4 / 5)  # 2·hits / (|T| + k)
    assert math.isnan(TopKStats((1,)).finalize()["p@1"])


def test_hot_items_threshold_keeps_ties():
    assert hot_items(torch.tensor([5, 1, 3, 3, 0, 9, 3, 2]), 0.25).tolist() == [
        True, False, False, False, False, True, False, False]
    # position floor(0.75·8) = 6 of [0,1,2,3,3,3,5,9] is 5 -> {5, 9}; with share .5: position 4 = 3
    assert hot_items(torch.tensor([5, 1, 3, 3, 0, 9, 3, 2]), 0.5).sum() == 5  # the three 3s tie in


def test_shards_add_up_to_the_whole():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 30, generator=g)
    test = torch.rand(40, 30, generator=g) < 0.2
    exclude = (torch.rand(40, 30, generator=g) < 0.2) & ~test
    hot = torch.rand(30, generator=g) < 0.3
    whole = TopKStats((5, 10))
    whole.add(scores, test, hot, exclude)
    parts = [TopKStats((5, 10)) for _ in range(3)]
    for r, part in enumerate(parts):  # rank r holds users r, r+3, ...
        idx = torch.arange(r, 40, 3)
        part.add(scores[idx], test[idx], hot, exclude[idx])
    summed = parts[0] + parts[1] + parts[2]
    assert torch.allclose(summed.tensor, whole.tensor, atol=1e-12)
    rebuilt = TopKStats((5, 10), summed.tensor.clone())
    assert rebuilt.finalize() == pytest.approx(whole.finalize())
    with pytest.raises(ValueError):
        TopKStats((5,), torch.zeros(3))


def _oracle(score: torch.Tensor, k: int, test: torch.Tensor, hot: torch.Tensor) -> dict[str, float]:
    """The dense formulas of studentcej/AUC_NS evaluation.py (rec/test 0-1 matrices, 1e-8 guards),
    over users that all have test items."""
    test = test.float()
    hot_t = hot.float().expand_as(test)
    n = test.shape[0]
    top = score.topk(k, dim=-1).indices
    rec = torch.zeros_like(test).scatter_(1, top, 1.0)
    hit = rec * test
    tp = hit.sum(-1)
    cnt = test.sum(-1)
    disc = torch.tensor([1 / math.log2(i + 1) for i in range(1, k + 1)])
    dcg = (hit.gather(1, top) * disc).sum(-1)
    idcg = torch.stack([disc[: int(c)].sum() for c in cnt])
    diff = rec - test
    over, under = (diff == 1).float(), (diff == -1).float()
    rate = lambda num, den: float((num.sum(-1) / (den.sum(-1) + 1e-8)).sum()) / n  # noqa: E731
    return {
        "p": float(tp.sum() / k) / n, "r": float((tp / cnt).sum()) / n,
        "f1": float((2 * tp / (cnt + k)).sum()) / n, "ndcg": float((dcg / idcg).sum()) / n,
        "ohr": rate(over * hot_t, rec * hot_t), "ocr": rate(over * (1 - hot_t), rec * (1 - hot_t)),
        "uhr": rate(under * hot_t, test * hot_t), "ucr": rate(under * (1 - hot_t), test * (1 - hot_t)),
    }


def test_matches_the_reference_implementation():
    g = torch.Generator().manual_seed(1)
    users, items = 50, 80
    scores = torch.randn(users, items, generator=g)
    test = torch.rand(users, items, generator=g) < 0.15
    test[:, 0] = True  # every user has a test item
    train = (torch.rand(users, items, generator=g) < 0.2) & ~test
    hot = hot_items(torch.randint(0, 50, (items,), generator=g), 0.15)
    stats = TopKStats((5, 10, 20))
    stats.add(scores, test, hot, train)
    ours = stats.finalize()
    masked = scores + train.float() * -1000  # the code's erase()
    for k in (5, 10, 20):
        for name, value in _oracle(masked, k, test, hot).items():
            assert ours[f"{name}@{k}"] == pytest.approx(value, abs=1e-6), (name, k)
