"""``prepare`` end to end on the real datasets (../shared/data; skipped when absent).

Beauty runs through the CLI entry (``add_prepare_args``/``run_prepare``, what ``ray-pinet prepare``
calls) with ``configs/prepare/beauty.yaml``.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ray_pinet.config_base import from_dict
from ray_pinet.data.cli_args import add_prepare_args, run_prepare
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.pipeline import prepare
from ray_pinet.data.prepared import load_meta
from tests.conftest import REPO, shared_file
from tests.data.helpers import filt

BEAUTY = "amazon-iclrec/Beauty.txt"
MAGAZINE = "amazon2018-magazine-subscriptions/Magazine_Subscriptions.csv"
TAOBAO = "taobao-userbehavior-head/UserBehavior_head.csv"


def _prepare(fmt: str, path, out, **sections):
    cfg = {"source": {"format": fmt, "path": str(path)}, "output": str(out), "num_buckets": 4, **sections}
    return prepare(from_dict(PrepareConfig, cfg), progress=False)


@pytest.fixture(scope="module")
def beauty(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("beauty") / "out"
    args = add_prepare_args(argparse.ArgumentParser()).parse_args([
        "--config", str(REPO / "configs/prepare/beauty.yaml"), "--path", str(shared_file(BEAUTY)),
        "--output", str(out), "--set", "num_buckets=4", "--no-progress",
    ])
    assert run_prepare(args) == 0
    return SimpleNamespace(
        output=out,
        report=json.loads((out / "report.json").read_text()),
        strata=json.loads((out / "strata.json").read_text()),
    )


def test_beauty_end_to_end_counts_and_strata(beauty):
    out = beauty.output
    users = pq.read_table(out / "users.parquet")
    items = pq.read_table(out / "items.parquet")
    assert users.num_rows == 22_363 and items.num_rows == 12_101
    assert items["item_idx"].to_pylist() == list(range(1, 12_102))
    assert beauty.report["result"]["rows"] == 198_502
    strata = json.loads((out / "strata.json").read_text())
    assert strata == beauty.strata
    assert strata["num_strata"] == 2
    # 198,502 events - 2 evaluation events per user = training events
    assert strata["num_interactions"] == 198_502 - 2 * 22_363 == pc.sum(users["activeness"]).as_py()
    head = [s for s in strata["strata"] if s["stratum"] == 1][0]
    assert head["users"] == 4_473  # ceil(0.2 * 22,363)
    assert strata["priors"]["user_share"] == pytest.approx([17_890 / 22_363, 4_473 / 22_363])
    inter = [s["interactions"] for s in strata["strata"]]
    assert strata["priors"]["interaction_share"] == pytest.approx([x / sum(inter) for x in inter])
    # every head user is at least as active as every tail user
    act, st = users["activeness"].to_numpy(), users["stratum"].to_numpy()
    assert act[st == 1].min() >= act[st == 0].max()
    cfg = json.loads((out / "prepare_config.json").read_text())
    assert cfg["source"]["format"] == "amazon_seq" and cfg["strata"]["q"] == 0.2 and cfg["num_buckets"] == 4
    meta = load_meta(out)
    assert (meta.num_users, meta.num_items, meta.num_strata, meta.max_len) == (22_363, 12_101, 2, 50)
    assert meta.user_share == strata["priors"]["user_share"] and meta.split_files("train")
    for split in ("valid", "test"):
        assert pq.read_table(out / split).num_rows == 22_363
    train = pq.read_table(out / "train")
    assert sorted(train["sample_id"].to_pylist()) == list(range(train.num_rows))
    # every training position after the first is a target exactly once (window = all)
    targets = pc.sum(pc.subtract(pc.list_value_length(train["seq"]), 1)).as_py()
    assert targets == int(np.maximum(act - 1, 0).sum())


def test_beauty_negatives_never_hit_a_positive(beauty):
    """No negative (train, valid, test) is any item of the same user, in any split."""
    out = beauty.output
    # positives per user = the test history (every event before the test target) + the test target
    test = pq.read_table(out / "test", columns=["user_idx", "seen", "target"])
    m = pq.read_table(out / "items.parquet").num_rows
    users = test["user_idx"].to_numpy()
    pos_user = np.concatenate([np.repeat(users, pc.list_value_length(test["seen"]).to_numpy()), users])
    pos_item = np.concatenate([pc.list_flatten(test["seen"]).to_numpy(), test["target"].to_numpy()])
    positives = np.unique(pos_user.astype(np.int64) * (m + 1) + pos_item)

    def hits(user: np.ndarray, neg: np.ndarray) -> int:
        assert neg.min() >= 1 and neg.max() <= m
        return int(np.isin(user.astype(np.int64) * (m + 1) + neg, positives).sum())

    train = pq.read_table(out / "train", columns=["user_idx", "neg"])
    n_neg = pc.list_value_length(train["neg"]).to_numpy()
    assert hits(np.repeat(train["user_idx"].to_numpy(), n_neg), pc.list_flatten(train["neg"]).to_numpy()) == 0
    for split in ("valid", "test"):
        t = pq.read_table(out / split, columns=["user_idx", "neg"])
        assert hits(t["user_idx"].to_numpy(), t["neg"].to_numpy()) == 0


def test_magazine_duplicate_policies_reported(ray_cluster, tmp_path):
    path = shared_file(MAGAZINE)
    removed = {}
    for policy in ("drop_exact", "drop_pair", "keep"):
        res = _prepare("amazon2018_csv", path, tmp_path / policy, clean={"duplicates": policy})
        assert res.report["source"]["rows_read"] == 89_689
        assert res.report["source"]["users_read"] == 72_098
        removed[policy] = filt(res.report, "duplicates")["removed_rows"]
        mh = filt(res.report, "min_history")
        assert res.report["result"]["rows"] == 89_689 - removed[policy] - mh["removed_rows"]
    # identical (user, item, timestamp) rows vs repeated (user, item) pairs (README: 88,318 pairs)
    assert removed == {"drop_exact": 1_222, "drop_pair": 1_371, "keep": 0}


def test_taobao_behaviour_filter_counted(ray_cluster, tmp_path):
    res = _prepare("taobao_csv", shared_file(TAOBAO), tmp_path / "buy", source={
        "format": "taobao_csv", "path": str(shared_file(TAOBAO)), "behaviors": ["buy"]})
    assert res.report["source"]["rows_read"] == 84_287
    beh = filt(res.report, "behaviors")
    assert beh["removed_rows"] == 84_287 - 1_749
    assert beh["removed_users"] == 814 - 558  # users without a single buy
    mh = filt(res.report, "min_history")
    assert res.report["result"]["users"] == 250 and res.report["result"]["rows"] == 1_318
    assert mh["removed_users"] == 558 - 250 and mh["removed_rows"] == 1_749 - 1_318
    assert pa.types.is_int8(pq.read_table(res.output / "users.parquet").schema.field("stratum").type)
