"""The seeded synthetic generator: exact row count, deterministic, chunk layout, readable by prepare."""

from __future__ import annotations

import argparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ray_pinet.config_base import ConfigError, from_dict
from ray_pinet.data.cli_args import add_synth_args, run_synth
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.pipeline import prepare
from ray_pinet.data.synthetic import generate


def _read(d) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(d.glob("part-*.parquet"))])


def test_exact_rows_and_deterministic(tmp_path):
    kw = dict(num_items=500, zipf_user=1.8, zipf_item=1.1, seed=3, rows_per_file=7_000)
    a = generate(tmp_path / "a", 50_001, **kw)
    b = generate(tmp_path / "b", 50_001, **kw)
    ta, tb = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert a["rows"] == ta.num_rows == 50_001
    assert len(a["files"]) == 8  # ceil(50,001 / 7,000), the last one smaller
    assert [pq.read_metadata(tmp_path / "a" / f).num_rows for f in a["files"]] == [7_000] * 7 + [1_001]
    assert ta.equals(tb) and a["users"] == b["users"] == pc.count_distinct(ta["user_id"]).as_py()
    assert ta.schema == pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64())])
    other = _read_gen(tmp_path / "c", 50_001, {**kw, "seed": 4})
    assert not other.equals(ta)


def _read_gen(d, n, kw):
    generate(d, n, **kw)
    return _read(d)


def test_whole_users_per_file_time_order_and_long_tail(tmp_path):
    generate(tmp_path, 200_000, num_items=2_000, zipf_user=1.7, zipf_item=1.0, seed=0, rows_per_file=50_000)
    users_per_file = []
    for p in sorted(tmp_path.glob("part-*.parquet")):
        t = pq.read_table(p)
        users_per_file.append(set(t["user_id"].to_pylist()))
        u = t["user_id"].to_numpy(zero_copy_only=False)
        ts = t["timestamp"].to_numpy()
        same = u[1:] == u[:-1]
        assert (ts[1:][same] >= ts[:-1][same]).all()  # each user's events in time order
        starts = np.r_[True, ~same]
        assert len(np.unique(u)) == int(starts.sum())  # users contiguous
    for i in range(len(users_per_file)):
        for j in range(i + 1, len(users_per_file)):
            assert not users_per_file[i] & users_per_file[j]  # a user lives in one file only
    t = _read(tmp_path)
    n = np.sort(pc.value_counts(t["user_id"]).field(1).to_numpy())[::-1]
    top10 = n[: max(1, len(n) // 10)].sum() / n.sum()
    assert top10 > 0.3  # a heavy head: the top 10% of users hold a large share of the rows
    items = pc.value_counts(t["item_id"])
    top_item = items.field(0)[int(np.argmax(items.field(1).to_numpy()))].as_py()
    assert top_item == "1"  # item id = popularity rank


def test_parallel_equals_sequential_and_prepare_reads_it(ray_cluster, tmp_path):
    kw = dict(num_items=300, seed=1, rows_per_file=10_000)
    generate(tmp_path / "seq", 30_000, **kw)
    generate(tmp_path / "par", 30_000, parallel=True, **kw)
    assert _read(tmp_path / "seq").equals(_read(tmp_path / "par"))
    res = prepare(
        from_dict(PrepareConfig, {"source": {"format": "parquet", "path": str(tmp_path / "seq")},
                                  "output": str(tmp_path / "out"), "num_buckets": 3}),
        progress=False,
    )
    assert res.report["source"]["rows_read"] == 30_000
    assert res.report["source"]["users_read"] == pc.count_distinct(_read(tmp_path / "seq")["user_id"]).as_py()


def test_cli_and_bad_arguments(tmp_path, capsys):
    parser = add_synth_args(argparse.ArgumentParser())
    args = parser.parse_args(["--output", str(tmp_path / "s"), "--rows", "1234", "--items", "50",
                              "--rows-per-file", "500", "--no-progress"])
    assert run_synth(args) == 0
    assert _read(tmp_path / "s").num_rows == 1234
    assert '"rows": 1234' in capsys.readouterr().out
    with pytest.raises(ConfigError):
        generate(tmp_path / "x", 10, num_items=5, zipf_user=1.0)
    with pytest.raises(ConfigError):
        generate(tmp_path / "x", 0, num_items=5)


def test_csv_parts_read_by_the_generic_csv_adapter(tmp_path):
    from ray_pinet.data.config import SourceConfig
    from ray_pinet.data.sources import FileStats, read_file, resolve_inputs

    out = generate(tmp_path, 1_000, num_items=50, seed=1, rows_per_file=600, fmt="csv")
    fs, files = resolve_inputs(str(tmp_path))
    assert [f.rsplit("/", 1)[-1] for f in files] == out["files"]
    src = SourceConfig(format="csv", path=str(tmp_path))
    tables = [t for f in files for t in read_file(fs, f, src, FileStats(f))]
    parquet = generate(tmp_path / "pq", 1_000, num_items=50, seed=1, rows_per_file=600)
    assert pa.concat_tables(tables).equals(_read(tmp_path / "pq")) and parquet["users"] == out["users"]
