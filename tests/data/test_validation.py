"""Each kind of bad input raises a DataError naming file, column, 1-based row and value."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_pinet.config_base import ConfigError
from ray_pinet.data.config import SourceConfig
from ray_pinet.data.sources import FileStats, read_file, resolve_inputs
from ray_pinet.errors import DataError
from tests.data.helpers import run, write_csv

HEADER = "user_id,item_id,timestamp,rating"


def read(path, fmt="csv", **kw):
    fs, files = resolve_inputs(str(path))
    src = SourceConfig(format=fmt, path=str(path), **kw)
    return [t for f in files for t in read_file(fs, f, src, FileStats(f))]


def check(exc: pytest.ExceptionInfo, file, column, row, value):
    err = exc.value
    assert (err.file, err.column, err.row, err.value) == (str(file), column, row, value)
    shown = [str(file), column or "-", "-" if row is None else str(row), "-" if value is None else repr(value)]
    assert all(part in str(err) for part in shown)  # the message shows all four


def test_message_shows_all_fields():
    err = DataError("bad timestamp", file="a.csv", column="timestamp", row=7, value="x")
    assert str(err) == "bad timestamp [file: a.csv, column: timestamp, row: 7, value: 'x']"
    assert str(DataError("corrupt", file="b.parquet")) == "corrupt [file: b.parquet, column: -, row: -, value: -]"


def test_missing_column_csv_header(tmp_path):
    f = write_csv(tmp_path / "log.csv", "user,item,time", ["1,2,3"])
    with pytest.raises(DataError, match="missing column 'ts'") as exc:
        read(f, columns={"user_id": "user", "item_id": "item", "timestamp": "ts"})
    check(exc, f, "timestamp", 1, "user,item,time")


def test_missing_column_parquet(tmp_path):
    f = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["1"], "item_id": ["2"]}), f)
    with pytest.raises(DataError, match="missing column 'timestamp'") as exc:
        read(f, "parquet")
    check(exc, f, "timestamp", None, ["user_id", "item_id"])


def test_missing_field_in_headerless_row(tmp_path):
    f = write_csv(tmp_path / "u.data", None, ["1\t10\t5\t100", "1\t11\t4\t101", "2\t10\t3"])
    with pytest.raises(DataError, match="expected 4 columns, got 3") as exc:
        read(f, "movielens_100k")
    check(exc, f, "timestamp", 3, "2\t10\t3")



def test_missing_field_in_row_with_header(tmp_path):
    """A short row in the parser's first block: the column is named from the header line."""
    f = write_csv(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp", ["1,10,4.0,100", "1,11,4.0"])
    with pytest.raises(DataError, match="expected 4 columns, got 3") as exc:
        read(f, "movielens_csv")
    check(exc, f, "timestamp", 3, "1,11,4.0")
    g = write_csv(tmp_path / "log.csv", "uid,sku,ts", ["1,10,100", "1"])
    with pytest.raises(DataError, match="expected 3 columns, got 1") as exc:
        read(g, columns={"user_id": "uid", "item_id": "sku", "timestamp": "ts"})
    check(exc, g, "item_id", 3, "1")

def test_wrong_type_parquet_float_ids(tmp_path):
    f = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": [1.5, 2.0], "item_id": ["a", "b"], "timestamp": [1, 2]}), f)
    with pytest.raises(DataError, match="type double, expected string or integer") as exc:
        read(f, "parquet")
    check(exc, f, "user_id", 1, 1.5)


def test_wrong_type_rating_text(tmp_path):
    f = write_csv(tmp_path / "log.csv", HEADER, ["1,2,3,4.5", "1,3,4,5", "2,2,5,abc"])
    with pytest.raises(DataError, match="not a number") as exc:
        read(f, columns={"rating": "rating"})
    check(exc, f, "rating", 4, "abc")


def test_null_id_csv_and_parquet(tmp_path):
    f = write_csv(tmp_path / "log.csv", HEADER, ["1,2,3,4", ",2,3,4"])
    with pytest.raises(DataError, match="empty 'user_id'") as exc:
        read(f)
    check(exc, f, "user_id", 3, "")
    p = tmp_path / "log.parquet"
    pq.write_table(pa.table({"user_id": ["1", "2", "3"], "item_id": ["a", None, "c"], "timestamp": [1, 2, 3]}), p)
    with pytest.raises(DataError, match="missing value") as exc:
        read(p, "parquet")
    check(exc, p, "item_id", 2, None)


def test_blank_line_is_reported_with_its_line_number(tmp_path):
    f = write_csv(tmp_path / "log.csv", HEADER, ["1,2,3,4", "", "1,3,4,5"])
    with pytest.raises(DataError) as exc:
        read(f)
    assert (exc.value.column, exc.value.row) == ("user_id", 3)


def test_unparsable_timestamp(tmp_path):
    f = write_csv(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp",
                  ["1,2,4.0,10", "1,3,4.0,11", "1,4,4.0,12", "2,5,3.0,2020-01-01"])
    with pytest.raises(DataError, match="unparsable timestamp") as exc:
        read(f, "movielens_csv")
    check(exc, f, "timestamp", 5, "2020-01-01")
    iso = write_csv(tmp_path / "iso.csv", "user_id,item_id,timestamp", ["1,2,2020-01-01T00:00:01Z", "1,3,yesterday"])
    with pytest.raises(DataError, match="ISO-8601") as exc:
        read(iso, timestamp_unit="iso")
    check(exc, iso, "timestamp", 3, "yesterday")
    ok = write_csv(tmp_path / "ok.csv", "user_id,item_id,timestamp",
                   ["1,2,1970-01-01T00:01:05.9", "1,3,1970-01-01 00:00:02+00:00"])
    assert read(ok, timestamp_unit="iso")[0]["timestamp"].to_pylist() == [65, 2]


def test_amazon_seq_line_without_items(tmp_path):
    f = write_csv(tmp_path / "Beauty.txt", None, ["1 5 6 7", "2"])
    with pytest.raises(DataError, match="no items") as exc:
        read(f, "amazon_seq")
    check(exc, f, "item_id", 2, "2")


def test_corrupt_parquet(tmp_path):
    f = tmp_path / "part-0.parquet"
    f.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file") as exc:
        read(f, "parquet")
    assert (exc.value.file, exc.value.column, exc.value.row, exc.value.value) == (str(f), None, None, None)


def test_no_input_files(tmp_path):
    with pytest.raises(DataError, match="no data files") as exc:
        resolve_inputs(str(tmp_path / "*.csv"))
    assert exc.value.file == str(tmp_path / "*.csv")
    with pytest.raises(DataError, match="does not exist"):
        resolve_inputs(str(tmp_path / "missing.csv"))


def test_empty_file_through_prepare(ray_cluster, tmp_path):
    f = tmp_path / "empty.csv"
    f.write_text("")
    with pytest.raises(DataError, match="input is empty") as exc:
        run(f, tmp_path / "out")
    assert (exc.value.file, exc.value.column, exc.value.row, exc.value.value) == (str(f), None, None, None)
    header_only = write_csv(tmp_path / "header.csv", "user_id,item_id,timestamp", [])
    with pytest.raises(DataError, match="input is empty"):
        run(header_only, tmp_path / "out")


def test_error_in_a_ray_task_keeps_its_fields(ray_cluster, tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    write_csv(d / "a.csv", "user_id,item_id,timestamp", ["1,2,3"])
    bad = write_csv(d / "b.csv", "user_id,item_id,timestamp", ["1,2,3", "1,2,3", "4,5,x9"])
    with pytest.raises(DataError) as exc:
        run(d, tmp_path / "out")
    check(exc, bad, "timestamp", 4, "x9")


def test_config_errors(ray_cluster, tmp_path):
    f = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp", ["1,2,3"])
    with pytest.raises(ConfigError, match="min_rating"):
        run(f, tmp_path / "out", clean={"min_rating": 3})
    with pytest.raises(ConfigError, match="no behavior column"):
        run(f, tmp_path / "out", source={"behaviors": ["buy"]})
    with pytest.raises(ConfigError, match="no user is left"):
        run(f, tmp_path / "out")
