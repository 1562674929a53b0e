"""Per-stratum evaluation protocol against values worked out by hand."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from ray_pinet.evaluation.protocol import evaluate
from ray_pinet.training.batches import EvalRows

SCORES = torch.tensor([
    [9.0, 0.5, 0.9, 0.1, 0.7, 0.3],  # user 0 (tail): target 4 (0.7), seen {2} masked, neg 1 (0.5)
    [9.0, 0.8, 0.6, 0.4, 0.2, 0.9],  # user 1 (head): target 3 (0.4), seen {1} masked, neg 5 (0.9)
])


class FixedScores(torch.nn.Module):
    def predict(self, history, stratum, candidates):
        return SCORES[history[:, -1] - 1]  # last history item 1 -> row 0, 2 -> row 1


def rows() -> EvalRows:
    t = pa.table({
        "sample_id": pa.array([0, 1], pa.int64()),
        "stratum": pa.array([0, 1], pa.int8()),
        "history": pa.array([[1], [2]], pa.list_(pa.int32())),
        "target": pa.array([4, 3], pa.int32()),
        "neg": pa.array([1, 5], pa.int32()),
        "seen": pa.array([[2], [1]], pa.list_(pa.int32())),
    })
    return EvalRows(t, max_len=3)


def test_hand_computed_metrics_k10():
    m = evaluate(FixedScores(), rows(), num_strata=2, k=10)
    # user 0: padding (9.0) and seen item 2 (0.9) masked -> nothing above 0.7 -> rank 0
    assert m["tail/hr@10"] == 1.0 and m["tail/ndcg@10"] == 1.0 and m["tail/gauc"] == 1.0
    # user 1: items 2 (0.6) and 5 (0.9) above 0.4 -> rank 2 -> NDCG 1/log2(4) = 0.5
    assert m["head/hr@10"] == 1.0 and m["head/ndcg@10"] == pytest.approx(0.5)
    assert m["head/gauc"] == 0.0  # 0.4 < 0.9
    assert m["all/ndcg@10"] == pytest.approx(0.75)
    # pooled AUC over pos {0.7, 0.4} vs neg {0.5, 0.9}: 1 of 4 pairs ordered
    assert m["all/auc"] == pytest.approx(0.25)
    assert m["all/users"] == 2


def test_hand_computed_metrics_k2():
    m = evaluate(FixedScores(), rows(), num_strata=2, k=2)
    assert m["head/hr@2"] == 0.0 and m["head/ndcg@2"] == 0.0  # rank 2 is outside the top 2
    assert m["all/hr@2"] == 0.5
