"""Pair data for two-tower training on the real ML-100K file: sizes, the seeded split, strata,
the counted filters and the config checks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_pinet.config_base import ConfigError
from ray_pinet.data.pairs import keyed_split, prepare_pairs
from ray_pinet.twotower_config import TwoTowerConfig
from tests.conftest import REPO, shared_file

CONFIG = REPO / "configs/twotower/ml-100k-onebp.yaml"


def _cfg(tmp_path, *sets):
    path = shared_file("ml-100k/u.data")
    return TwoTowerConfig.from_yaml(CONFIG, [f"data.source.path={path}", f"data.output={tmp_path / 'pairs'}", *sets])


def test_ml100k_pairs_have_the_published_shape(tmp_path):
    cfg = _cfg(tmp_path, "data.valid_share=0.1")
    out = prepare_pairs(cfg.data, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["num_users"], meta["num_items"]) == (943, 1682)
    assert meta["rows"] == {"train": 72000, "valid": 8000, "test": 20000}
    parts = {s: pq.read_table(out / f"{s}.parquet").to_pandas() for s in ("train", "valid", "test")}
    for df in parts.values():
        assert df["sample_id"].tolist() == list(range(len(df)))
    pairs = [set(zip(df.user, df.item)) for df in parts.values()]
    assert sum(map(len, pairs)) == 100_000 and not (pairs[0] & pairs[2]) and not (pairs[1] & pairs[2])
    users = pq.read_table(out / "users.parquet").to_pandas()
    assert users.stratum.sum() == 189  # ceil(0.2 * 943) head users
    assert (users.activeness == parts["train"].groupby("user").size().reindex(users.user, fill_value=0).values).all()
    assert users[users.stratum == 1].activeness.min() >= users[users.stratum == 0].activeness.max()
    report = json.loads((out / "report.json").read_text())
    assert report["rows_read"] == 100_000 and all(v == 0 for v in report["removed"].values())


def test_split_is_seeded_and_sized():
    keys = np.arange(10_000) * 7 + 3
    a, b = keyed_split(keys, 0.2, 0.1, 5), keyed_split(keys, 0.2, 0.1, 5)
    assert np.array_equal(a, b)
    assert (a == 2).sum() == 2000 and (a == 1).sum() == 800
    assert not np.array_equal(a, keyed_split(keys, 0.2, 0.1, 6))
    # a row's part depends on its key, not on where it is in the file
    perm = np.random.default_rng(0).permutation(len(keys))
    assert np.array_equal(keyed_split(keys[perm], 0.2, 0.1, 5), a[perm])


def test_min_rating_filter_is_counted(tmp_path):
    cfg = _cfg(tmp_path, "data.min_rating=4")
    out = prepare_pairs(cfg.data, progress=False)
    report = json.loads((out / "report.json").read_text())
    removed = report["removed"]["rating < 4.0"]
    meta = json.loads((out / "meta.json").read_text())
    assert removed == 44_625 and sum(meta["rows"].values()) == 100_000 - removed


@pytest.mark.parametrize("sets, match", [
    (["model.sampler=auc_ns"], "use model.method=bpr"),
    (["eval.select_on=validation"], "valid_share > 0"),
    (["eval.select_metric=auc@10"], "select_metric"),
    (["model.beta=1.0"], "beta"),
    (["model.duplicate_rule=first"], "duplicate_rule"),
    (["data.test_share=0"], "test_share"),
])
def test_bad_config_names_the_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        TwoTowerConfig.from_yaml(CONFIG, sets)


def test_labeled_rows_keep_every_rating_with_its_label(tmp_path):
    cfg = _cfg(tmp_path, "data.label_threshold=2", "data.valid_share=0.25")
    out = prepare_pairs(cfg.data, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["labeled"] and meta["rows"] == {"train": 60000, "valid": 20000, "test": 20000}
    parts = [pq.read_table(out / f"{s}.parquet").to_pandas() for s in ("train", "valid", "test")]
    positives = sum(int(df.label.sum()) for df in parts)
    assert positives == 100_000 - 17_480  # ratings 1 and 2 (6,110 + 11,370) are the negatives
    assert abs(meta["positive_share"]["test"] - 0.8252) < 0.01


def test_ncf_needs_labels_and_labels_exclude_min_rating(tmp_path):
    with pytest.raises(ConfigError, match="label_threshold"):
        _cfg(tmp_path, "model.method=ncf")
    with pytest.raises(ConfigError, match="unset data.min_rating"):
        _cfg(tmp_path, "data.label_threshold=2", "data.min_rating=3")


def test_prepared_data_with_other_settings_is_refused_not_reused(tmp_path):
    from ray_pinet.kinds.twotower import ensure_pairs

    cfg = _cfg(tmp_path, "data.max_users=50")
    ensure_pairs(cfg, progress=False)
    assert ensure_pairs(_cfg(tmp_path, "data.max_users=50"), progress=False) == (tmp_path / "pairs").resolve()
    with pytest.raises(ValueError, match=r"data.valid_share: prepared 0.0, asked 0.1"):
        ensure_pairs(_cfg(tmp_path, "data.max_users=50", "data.valid_share=0.1"), progress=False)
