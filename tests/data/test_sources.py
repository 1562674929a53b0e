"""Ingestion of the real datasets: parsed counts match ../shared/data/README.md (no Ray needed)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ray_pinet.data.config import SourceConfig
from ray_pinet.data.sources import FileStats, read_file, resolve_inputs
from tests.conftest import shared_file


def read_all(path, fmt: str, **kw) -> tuple[pa.Table, FileStats]:
    fs, files = resolve_inputs(str(path))
    stats = FileStats(files[0])
    table = pa.concat_tables(list(read_file(fs, files[0], SourceConfig(format=fmt, path=str(path), **kw), stats)))
    return table, stats


def n_unique(table: pa.Table, col: str) -> int:
    return pc.count_distinct(table[col]).as_py()


@pytest.mark.parametrize(
    "rel, fmt, rows, users, items",
    [
        ("amazon-iclrec/Beauty.txt", "amazon_seq", 198_502, 22_363, 12_101),
        ("ml-100k/u.data", "movielens_100k", 100_000, 943, 1_682),
        ("ml-latest-small/ratings.csv", "movielens_csv", 100_836, 610, 9_724),
        ("amazon2018-magazine-subscriptions/Magazine_Subscriptions.csv", "amazon2018_csv", 89_689, 72_098, 2_428),
        ("taobao-userbehavior-head/UserBehavior_head.csv", "taobao_csv", 84_287, 814, 55_233),
    ],
)
def test_real_counts(rel, fmt, rows, users, items):
    table, stats = read_all(shared_file(rel), fmt)
    assert (table.num_rows, n_unique(table, "user_id"), n_unique(table, "item_id")) == (rows, users, items)
    assert stats.rows_read == rows
    assert table.schema.field("user_id").type == pa.string() and table.schema.field("timestamp").type == pa.int64()


def test_magazine_item_first_and_taobao_behaviours():
    mag, _ = read_all(shared_file("amazon2018-magazine-subscriptions/Magazine_Subscriptions.csv"), "amazon2018_csv")
    first = shared_file("amazon2018-magazine-subscriptions/Magazine_Subscriptions.csv").read_text().split("\n")[0]
    item, user, rating, ts = first.split(",")
    expected = {"user_id": user, "item_id": item, "timestamp": int(ts), "rating": float(rating)}
    assert mag.slice(0, 1).to_pylist()[0] == expected
    _, stats = read_all(shared_file("taobao-userbehavior-head/UserBehavior_head.csv"), "taobao_csv")
    assert dict(stats.behaviors) == {"pv": 75_693, "cart": 4_494, "fav": 2_351, "buy": 1_749}


def test_amazon_seq_timestamp_is_position():
    path = shared_file("amazon-iclrec/Beauty.txt")
    table, _ = read_all(path, "amazon_seq")
    first = path.read_text().split("\n")[0].split()
    head = table.slice(0, len(first) - 1).to_pylist()
    assert [r["item_id"] for r in head] == first[1:]
    assert [r["timestamp"] for r in head] == list(range(len(first) - 1))
    assert {r["user_id"] for r in head} == {first[0]}


def test_paths_dirs_globs_and_uris(tmp_path):
    for name in ("b.csv", "a.csv", "_SUCCESS", ".hidden"):
        (tmp_path / name).write_text("user_id,item_id,timestamp\n1,2,3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.csv").write_text("user_id,item_id,timestamp\n1,2,3\n")
    expect = [str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), str(tmp_path / "sub" / "c.csv")]
    assert resolve_inputs(str(tmp_path))[1] == expect
    assert resolve_inputs(str(tmp_path / "*.csv"))[1] == expect[:2]
    assert resolve_inputs(f"file://{tmp_path}/a.csv")[1] == [expect[0]]
    fs, files = resolve_inputs(f"file://{tmp_path}/*.csv")  # glob over a URI: fsspec
    assert [f.rsplit("/", 1)[-1] for f in files] == ["a.csv", "b.csv"]
    table = pa.concat_tables(list(read_file(fs, files[0], SourceConfig(format="csv", path="x"), FileStats("x"))))
    assert table.to_pylist() == [{"user_id": "1", "item_id": "2", "timestamp": 3}]
