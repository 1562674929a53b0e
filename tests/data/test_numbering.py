"""Prepared format 2: users numbered bucket by bucket from driver summaries (no per-user table on
the driver), the same for any num_buckets; strata as the all-users rule gives; format 1 refused."""

from __future__ import annotations

import json
import shutil
import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_pinet.config_base import from_dict
from ray_pinet.data.config import PrepareConfig, StrataConfig
from ray_pinet.data.pipeline import prepare
from ray_pinet.data.prepared import check_format, load_meta
from ray_pinet.data.restratify import restratify
from ray_pinet.data.strata import assign_strata, strata_stats
from ray_pinet.data.synthetic import generate
from ray_pinet.errors import DataError
from ray_pinet.training.run_inputs import load_run_meta


def _prepare(log, out, buckets: int, strata: dict) -> object:
    return prepare(from_dict(PrepareConfig, {
        "source": {"format": "parquet", "path": str(log)}, "output": str(out), "num_buckets": buckets,
        "strata": strata, "samples": {"max_len": 8, "train_negatives": 1},
    }), progress=False)


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    # ~600 users with Zipf activeness: many ties at every low activeness value
    d = tmp_path_factory.mktemp("numbering") / "log"
    generate(d, 6_000, num_items=300, seed=3, rows_per_file=2_000)
    return d


def _tables(out) -> dict:
    t = {s: pq.read_table(out / s).sort_by("sample_id") for s in ("train", "valid", "test")}
    return {**t, "users": pq.read_table(out / "users.parquet"), "items": pq.read_table(out / "items.parquet"),
            "strata": json.loads((out / "strata.json").read_text())}


@pytest.mark.parametrize("strata", [{"mode": "top_fraction", "q": 0.2}, {"mode": "quantiles", "k": 3}],
                         ids=["top_fraction", "quantiles"])
def test_same_numbering_for_any_buckets_and_strata_of_the_all_users_rule(ray_cluster, log, tmp_path, strata):
    one = _prepare(log, tmp_path / "b1", 1, strata).output
    many = _prepare(log, tmp_path / "b7", 7, strata).output
    a, b = _tables(one), _tables(many)
    for name in a:
        assert a[name] == b[name], name
    users = a["users"].to_pydict()
    ids = users["user_id"]
    # user_idx follows (crc32(id) % 2^16, id), the order docs/design.md states
    assert users["user_idx"] == list(range(len(ids)))
    assert ids == sorted(ids, key=lambda u: (zlib.crc32(u.encode()) % 2**16, u))
    act = np.array(users["activeness"])
    assert len(np.unique(act)) < len(act) / 5  # ties are what the rule must break
    cfg = StrataConfig(**strata)
    expected = assign_strata(act, cfg)
    assert users["stratum"] == expected.tolist()
    assert a["strata"] == json.loads(json.dumps(strata_stats(act, expected, cfg)))
    # each sample carries its user's stratum
    for split in ("train", "valid", "test"):
        t = a[split]
        assert t["stratum"].to_pylist() == expected[t["user_idx"].to_numpy()].tolist()


def test_a_folder_of_format_1_is_refused_by_every_reader(ray_cluster, log, tmp_path):
    out = _prepare(log, tmp_path / "p", 2, {"mode": "top_fraction", "q": 0.2}).output
    check_format(out)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    report = json.loads((old / "report.json").read_text())
    assert report.pop("prepared_format") == 2
    (old / "report.json").write_text(json.dumps(report))  # what a format-1 prepare wrote
    for read in (load_meta, load_run_meta, lambda p: restratify(p, StrataConfig(q=0.3), tmp_path / "v")):
        with pytest.raises(DataError, match="prepared data of format 1") as exc:
            read(old)
        assert exc.value.file == str(old / "report.json")
        assert (exc.value.column, exc.value.value) == ("prepared_format", 1)
