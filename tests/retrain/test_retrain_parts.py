"""The pieces of `ray-pinet retrain`, in-process: date partitions of the real ml-latest-small log,
the move of an incumbent onto a newer item vocabulary (it must score known items exactly as
before), and the registration gate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_pinet.config import TrainConfig
from ray_pinet.data.config import SourceConfig
from ray_pinet.data.sources import read_log, resolve_inputs
from ray_pinet.errors import DataError
from ray_pinet.models.registry import build_model
from ray_pinet.evaluation.bootstrap import paired_intervals
from ray_pinet.retrain.gate import drift, gate, report_markdown
from ray_pinet.retrain.partitions import discover, select, write_partitions
from ray_pinet.retrain.warm import Incumbent, on_vocabulary, remap_state
from tests.conftest import BUNDLED_DATA


@pytest.fixture(scope="module")
def log():
    src = SourceConfig(format="movielens_csv", path=str(BUNDLED_DATA / "ml-latest-small" / "ratings.csv"))
    return read_log(src)[0]


def test_partitions_split_by_time_and_are_read_back_as_their_union(log, tmp_path):
    written = write_partitions(log, tmp_path, ["2018-01-01", "2018-05-01"])
    assert [p.date for p, _ in written] == ["2017-12-31", "2018-04-30", "2018-09-24"]
    assert sum(n for _, n in written) == log.num_rows
    parts = discover(tmp_path)
    assert [p.date for p in parts] == ["2017-12-31", "2018-04-30", "2018-09-24"]
    assert [p.date for p in select(parts, "2018-04-30")] == ["2017-12-31", "2018-04-30"]
    # every event of a partition lies in its period
    import pyarrow.parquet as pq

    ts = pq.read_table(parts[1].path).column("timestamp").to_numpy()
    assert ts.min() >= 1514764800 and ts.max() < 1525132800  # 2018-01-01 .. 2018-05-01 UTC
    fs, files = resolve_inputs([p.path for p in parts[:2]])
    assert len(files) == 2
    with pytest.raises(DataError, match="no partition on or before 2000-01-01"):
        select(parts, "2000-01-01")


def test_partition_root_errors_name_the_folder(tmp_path):
    (tmp_path / "date=2020-01-01").mkdir()
    with pytest.raises(DataError, match="empty date partition") as e:
        discover(tmp_path)
    assert "date=2020-01-01" in str(e.value)
    (tmp_path / "date=2020-01-01" / "part-0.parquet").write_bytes(b"x")
    (tmp_path / "yesterday").mkdir()
    with pytest.raises(DataError, match="not a date partition") as e:
        discover(tmp_path)
    assert "yesterday" in str(e.value)


def _model(num_items, seed, plugins=True):
    cfg = TrainConfig.from_dict({"model": {"dim": 8, "num_blocks": 1, "max_len": 6},
                                 "stage2": {"plugin": {"item_offset": True}}})
    torch.manual_seed(seed)
    m = build_model(cfg.model, num_items, 2, cfg.stage2.plugin if plugins else None)
    with torch.no_grad():  # non-zero plugins, so a wrong remap of them shows
        for p in m.plugins.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def test_incumbent_on_a_new_vocabulary_scores_known_items_exactly_as_before():
    old_ids = np.array(["", "a", "b", "c", "d", "e"], dtype=object)  # index 0 = padding
    new_ids = np.array(["", "c", "x", "a", "e", "y", "b"], dtype=object)  # d gone; x, y new
    old = _model(5, seed=1)
    template = _model(6, seed=2)
    state, stats, _ = remap_state(old.state_dict(), old_ids, template.state_dict(), new_ids, old.ITEM_AXES)
    assert (stats.kept, stats.added, stats.dropped) == (4, 2, 1)
    emb_old, emb_new = old.state_dict()["backbone.item_emb.weight"], state["backbone.item_emb.weight"]
    assert torch.equal(emb_new[1], emb_old[3]) and torch.equal(emb_new[6], emb_old[2])  # c, b
    assert torch.equal(emb_new[2], template.state_dict()["backbone.item_emb.weight"][2])  # x: fresh
    assert torch.equal(state["plugins.item_bias.weight"][:, 4], old.state_dict()["plugins.item_bias.weight"][:, 5])

    inc = Incumbent(old, old_ids, {"num_strata": 2}, None, "test")
    moved, _, _ = on_vocabulary(inc, new_ids, _model(6, seed=3))
    hist_old = torch.tensor([[0, 0, 1, 3, 5, 2], [0, 0, 0, 0, 4, 1]])  # a c e b / d a
    to_new = {1: 3, 2: 6, 3: 1, 5: 4, 0: 0}
    hist_new = torch.tensor([[0, 0, 3, 1, 4, 6], [0, 0, 0, 0, 0, 3]])  # d is unknown -> padding
    for stratum in (torch.tensor([0, 1]), torch.tensor([1, 0])):
        s_old = old.predict(torch.tensor([[0, 0, 1, 3, 5, 2], [0, 0, 0, 0, 0, 1]]), stratum, None)
        s_new = moved.predict(hist_new, stratum, None)
        for o, n in to_new.items():
            if o:
                torch.testing.assert_close(s_new[:, n], s_old[:, o], rtol=0, atol=1e-6)
        assert torch.isinf(s_new[:, [2, 5]]).all() and (s_new[:, [2, 5]] < 0).all()  # x, y unknown
    del hist_old


def test_remap_refuses_another_model_config():
    old_ids = np.array(["", "a", "b"], dtype=object)
    old = _model(2, seed=1)
    other = TrainConfig.from_dict({"model": {"dim": 16, "num_blocks": 1, "max_len": 6}})
    template = build_model(other.model, 2, 2, other.stage2.plugin).state_dict()
    with pytest.raises(ValueError, match="same model config"):
        remap_state(old.state_dict(), old_ids, template, old_ids, old.ITEM_AXES)


def test_gate_rejects_a_stratum_that_regresses_beyond_the_tolerance():
    inc = {"tail/ndcg@10": 0.100, "head/ndcg@10": 0.050, "all/ndcg@10": 0.090}
    ok = gate(inc, {"tail/ndcg@10": 0.1004, "head/ndcg@10": 0.0499, "all/ndcg@10": 0.091}, 2, "ndcg@10", 0.005)
    assert ok.accepted and not ok.reasons
    bad = gate(inc, {"tail/ndcg@10": 0.120, "head/ndcg@10": 0.049, "all/ndcg@10": 0.110}, 2, "ndcg@10", 0.005)
    assert not bad.accepted and len(bad.reasons) == 1 and bad.reasons[0].startswith("head ndcg@10")
    first = gate(None, {"tail/ndcg@10": 0.1, "head/ndcg@10": 0.1, "all/ndcg@10": 0.1}, 2, "ndcg@10", 0.0)
    assert first.accepted
    strata = lambda u: {"mode": "top_fraction", "thresholds": {"q": 0.2}, "num_strata": 2,  # noqa: E731
                        "strata": [{"name": "tail", "users": u, "interactions": 10 * u, "user_share": u / (u + 5),
                                    "interaction_share": 0.5, "min_activeness": 1, "max_activeness": 9},
                                   {"name": "head", "users": 5, "interactions": 50, "user_share": 5 / (u + 5),
                                    "interaction_share": 0.5, "min_activeness": 10, "max_activeness": 99}]}
    d = drift(strata(20), strata(30))
    assert d["users"] == {"old": 25, "new": 35}
    assert d["strata"][0]["user_share_change"] == pytest.approx(30 / 35 - 20 / 25)
    md = report_markdown({"through": "2020-01-02", "incumbent": "models:/m/1", "new_partitions": ["2020-01-02"],
                          "registered": None, "gate": bad.to_dict(), "drift": d})
    assert "rejected" in md and "| head | 0 | 0.0500 | 0.0490 | -2.00% | - | NO |" in md


def test_paired_intervals_cover_the_change_and_shrink_with_more_users():
    rng = np.random.default_rng(0)
    n = 4000
    stratum = (np.arange(n) % 10 == 0).astype(np.int64)  # 10% head
    inc = rng.random(n) * 0.2
    cand = inc * 1.1  # +10% for every user
    ci = paired_intervals(inc, cand, stratum, 2)
    for s in ("tail", "head", "all"):
        assert ci[s][0] == pytest.approx(0.1, abs=1e-9) and ci[s][1] == pytest.approx(0.1, abs=1e-9)
    noisy = cand + rng.normal(0, 0.05, n)
    ci = paired_intervals(inc, noisy, stratum, 2)
    width = {s: ci[s][1] - ci[s][0] for s in ci}
    assert ci["all"][0] < 0.1 < ci["all"][1]
    assert width["head"] > 2 * width["all"]  # 10x fewer users: a much wider interval
