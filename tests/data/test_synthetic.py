"""The synthetic long-tail generator: exact row count, determinism, parallel == sequential."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ray_pinet.config_base import ConfigError
from ray_pinet.data.synthetic import generate


def test_exact_rows_and_deterministic(tmp_path):
    a = generate(tmp_path / "a", 25_001, 300, seed=3, rows_per_file=10_000)
    b = generate(tmp_path / "b", 25_001, 300, seed=3, rows_per_file=10_000)
    ta, tb = pq.read_table(tmp_path / "a"), pq.read_table(tmp_path / "b")
    assert a["rows"] == ta.num_rows == 25_001 and len(a["files"]) == 3
    assert ta.equals(tb) and a["users"] == b["users"] == pc.count_distinct(ta["user_id"]).as_py()
    assert ta.schema.names == ["user_id", "item_id", "timestamp"]
    assert not pq.read_table(tmp_path / "a").equals(pq.read_table(generate(tmp_path / "c", 25_001, 300, seed=4, rows_per_file=10_000)["output"]))


def test_long_tail_shape(tmp_path):
    generate(tmp_path, 50_000, 1_000, seed=0, rows_per_file=50_000)
    t = pq.read_table(tmp_path)
    per_user = np.sort(pc.value_counts(t["user_id"]).field(1).to_numpy())
    assert per_user[: len(per_user) // 2].max() <= 6 and per_user[-1] > 100  # most users short, a few very long
    per_item = pc.value_counts(t["item_id"])
    top = per_item.field(0)[int(np.argmax(per_item.field(1).to_numpy()))].as_py()
    assert top == "1"  # item id = popularity rank
    ts = t["timestamp"].to_numpy()
    same_user = t["user_id"].to_numpy(zero_copy_only=False)
    assert (np.diff(ts)[same_user[1:] == same_user[:-1]] >= 0).all()


def test_parallel_equals_sequential_and_csv(ray_cluster, tmp_path):
    generate(tmp_path / "seq", 12_345, 200, seed=1, rows_per_file=4_000)
    generate(tmp_path / "par", 12_345, 200, seed=1, rows_per_file=4_000, parallel=True)
    assert pq.read_table(tmp_path / "seq").equals(pq.read_table(tmp_path / "par"))
    out = generate(tmp_path / "csv", 1_000, 50, seed=1, fmt="csv")
    assert (tmp_path / "csv" / out["files"][0]).read_text().splitlines()[0] == '"user_id","item_id","timestamp"'


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="zipf_user"):
        generate(tmp_path, 10, 10, zipf_user=1.0)


def test_synthetic_log_through_prepare(ray_cluster, tmp_path):
    from ray_pinet.config_base import from_dict
    from ray_pinet.data.config import PrepareConfig
    from ray_pinet.data.pipeline import prepare

    generate(tmp_path / "log", 20_000, 500, seed=2, rows_per_file=7_000)
    res = prepare(from_dict(PrepareConfig, {"source": {"format": "parquet", "path": str(tmp_path / "log")},
                                            "output": str(tmp_path / "out"), "num_buckets": 3}), progress=False)
    assert res.report["source"]["rows_read"] == 20_000 and len(res.report["source"]["files"]) == 3
    assert res.report["result"]["users"] == res.strata["num_users"] == pq.read_table(tmp_path / "out" / "test").num_rows
