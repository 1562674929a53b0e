"""End to end on the real datasets: `ray-pinet prepare` on Beauty, duplicates on Magazine, Taobao buys."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ray_pinet.data.cli_args import add_prepare_args, run_prepare
from ray_pinet.data.prepared import load_meta
from tests.conftest import REPO, shared_file
from tests.data.helpers import filt

MAGAZINE = "amazon2018-magazine-subscriptions/Magazine_Subscriptions.csv"


@pytest.fixture(scope="module")
def beauty(ray_cluster, tmp_path_factory):
    shared_file("amazon-iclrec/Beauty.txt")
    out = tmp_path_factory.mktemp("beauty") / "prepared"
    parser = add_prepare_args(argparse.ArgumentParser())
    args = parser.parse_args(["--config", str(REPO / "configs/prepare/beauty.yaml"), "--output", str(out),
                              "--set", f"source.path={shared_file('amazon-iclrec/Beauty.txt')}", "--no-progress"])
    assert run_prepare(args) == 0
    return out


def test_beauty_counts(beauty):
    strata = json.loads((beauty / "strata.json").read_text())
    report = json.loads((beauty / "report.json").read_text())
    assert strata["num_users"] == 22_363 and sum(s["users"] for s in strata["strata"]) == 22_363
    assert strata["strata"][1]["users"] == 4_473  # ceil(0.2 * 22,363)
    assert strata["num_interactions"] == 198_502 - 2 * 22_363  # activeness = training events
    assert report["result"]["rows"] == 198_502 and report["result"]["items"] == 12_101
    assert [pq.read_table(beauty / s).num_rows for s in ("valid", "test")] == [22_363, 22_363]
    train = pq.read_table(beauty / "train", columns=["sample_id", "seq"])
    assert sorted(train["sample_id"].to_pylist()) == list(range(train.num_rows)) == list(range(report["result"]["train_rows"]))
    targets = pc.sum(pc.subtract(pc.list_value_length(train["seq"]), 1)).as_py()
    assert targets == 198_502 - 3 * 22_363  # every training position but each user's first, once
    meta = load_meta(beauty)
    assert (meta.num_users, meta.num_items, meta.num_strata) == (22_363, 12_101, 2)
    assert meta.user_share == pytest.approx([17_890 / 22_363, 4_473 / 22_363])


def test_beauty_negatives_never_hit_a_positive(beauty):
    users = pq.read_table(beauty / "users.parquet")
    items = pq.read_table(beauty / "items.parquet")
    canon = pq.read_table(beauty / "canonical")
    u = pc.index_in(canon["user_id"], value_set=users["user_id"]).to_numpy()
    i = pc.index_in(canon["item_id"], value_set=items["item_id"]).to_numpy() + 1
    m = items.num_rows + 1
    positives = np.unique(u.astype(np.int64) * m + i)

    def hits(user_idx, neg) -> int:
        return int(np.isin(np.asarray(user_idx, dtype=np.int64) * m + np.asarray(neg), positives).sum())

    train = pq.read_table(beauty / "train", columns=["user_idx", "neg", "seq"])
    lens = pc.list_value_length(train["neg"]).to_numpy()
    assert (lens == pc.list_value_length(train["seq"]).to_numpy() - 1).all()
    flat = pc.list_flatten(train["neg"]).to_numpy()
    assert hits(np.repeat(train["user_idx"].to_numpy(), lens), flat) == 0 and flat.min() >= 1 and flat.max() < m
    for split in ("valid", "test"):
        t = pq.read_table(beauty / split, columns=["user_idx", "neg", "target"])
        assert hits(t["user_idx"].to_numpy(), t["neg"].to_numpy()) == 0
        assert hits(t["user_idx"].to_numpy(), t["target"].to_numpy()) == t.num_rows  # sanity: targets are positives


def _prepare(cfg: dict):
    from ray_pinet.config_base import from_dict
    from ray_pinet.data.config import PrepareConfig
    from ray_pinet.data.pipeline import prepare

    return prepare(from_dict(PrepareConfig, cfg), progress=False)


@pytest.mark.parametrize("policy, removed", [("drop_exact", 1_222), ("drop_pair", 1_371), ("keep", 0)])
def test_magazine_duplicates(ray_cluster, tmp_path, policy, removed):
    res = _prepare({"source": {"format": "amazon2018_csv", "path": str(shared_file(MAGAZINE))},
                    "clean": {"duplicates": policy}, "strata": {"mode": "min_count", "tau": 5},
                    "output": str(tmp_path / "mag"), "num_buckets": 4})
    r = res.report
    assert (r["source"]["rows_read"], r["source"]["users_read"]) == (89_689, 72_098)
    assert filt(r, "duplicates")["removed_rows"] == removed  # README: 89,689 rows, 88,318 distinct pairs
    removed_total = sum(f["removed_rows"] for f in r["filters"][:4])
    assert r["result"]["rows"] == 89_689 - removed_total


def test_taobao_buy_only(ray_cluster, tmp_path):
    res = _prepare({"source": {"format": "taobao_csv", "behaviors": ["buy"],
                               "path": str(shared_file("taobao-userbehavior-head/UserBehavior_head.csv"))},
                    "output": str(tmp_path / "tb"), "num_buckets": 2})
    r = res.report
    assert (r["source"]["rows_read"], r["source"]["users_read"]) == (84_287, 814)
    assert (filt(r, "behaviors")["removed_rows"], filt(r, "behaviors")["removed_users"]) == (84_287 - 1_749, 814 - 558)
    assert r["source"]["files"][0]["behaviors_read"] == {"buy": 1_749, "cart": 4_494, "fav": 2_351, "pv": 75_693}
