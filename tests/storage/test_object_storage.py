"""Object-storage URIs end to end against a real S3 server (moto, tests/storage/conftest.py):
raw log in s3:// -> ``prepare`` into s3:// -> ``train`` reading s3:// with its checkpoints in
s3:// -> the same run name relaunched resumes from the checkpoint in the bucket. Plus the URI
rules themselves (never Path-resolved, file:// is local) and the one-line errors of a bucket
that does not exist."""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest

from ray_pinet import storage_uri
from tests.conftest import BUNDLED_DATA, DEV_PREPARE, REPO, run_cli_in_repo
from tests.storage.conftest import BUCKET

S3 = f"s3://{BUCKET}"


# ------------------------------------------------------------------------------------------------
# URI rules (no server)
# ------------------------------------------------------------------------------------------------


def test_a_uri_is_never_path_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("s3://b/x", "gs://b/x/y", "s3://b/x/"):
        assert storage_uri.local_or_uri(uri) == uri.rstrip("/")  # not <cwd>/s3:/b/x
        assert storage_uri.is_remote(uri)
    assert storage_uri.local_or_uri("file:///tmp/x") == "/tmp/x"
    assert storage_uri.local_or_uri("file:///tmp/a%20b") == "/tmp/a b"
    assert not storage_uri.is_remote("file:///tmp/x")
    assert storage_uri.local_or_uri("rel/x") == str(tmp_path / "rel/x")
    assert storage_uri.join("s3://b/runs", "name") == "s3://b/runs/name"
    fs, path = storage_uri.filesystem_for("file:///tmp/x")
    assert isinstance(fs, pafs.LocalFileSystem) and path == "/tmp/x"
    assert storage_uri.run_storage("/tmp/runs") == {"storage_path": "/tmp/runs"}


def test_s3_filesystem_from_the_environment_needs_no_environment_where_it_is_used(monkeypatch):
    import pickle

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    fs, path = storage_uri.filesystem_for("s3://b/runs/x")
    assert path == "b/runs/x"
    opts = pickle.loads(pickle.dumps(fs)).__reduce__()[1][0]  # what a Ray task or Train worker gets
    assert (opts["endpoint_override"], opts["scheme"], opts["access_key"]) == ("127.0.0.1:9", "http", "k")
    kwargs = storage_uri.run_storage("s3://b/runs")
    assert kwargs["storage_path"] == "b/runs" and kwargs["storage_filesystem"].type_name == "s3"


def test_default_mlflow_store_of_a_uri_storage_path_is_local(tmp_path, monkeypatch):
    from ray_pinet.tracking.mlflow_utils import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, "s3://b/runs") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert resolve_tracking_uri(None, "file:///tmp/x/runs") == "sqlite:////tmp/x/runs/mlflow.db"


# ------------------------------------------------------------------------------------------------
# Against the S3 server
# ------------------------------------------------------------------------------------------------


def _bucket_files(prefix: str) -> list[str]:
    fs, path = storage_uri.filesystem_for(f"{S3}/{prefix}")
    sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return sorted(i.path[len(BUCKET) + 1:] for i in fs.get_file_info(sel) if i.type == pafs.FileType.File)


def _train_args(tmp, name: str, storage: str = f"{S3}/runs") -> list[str]:
    return [
        "train", "--config", str(REPO / "configs/ml-latest-small.yaml"),
        "--set", f"data.path={S3}/prepared", "--set", "data.prepare=null",
        "--set", f"run.storage_path={storage}", "--set", f"run.name={name}",
        "--set", "run.progress=false", "--set", "run.num_workers=1",
        "--set", "model.dim=16", "--set", "model.num_blocks=1",
        "--set", "optim.max_epochs=1", "--set", "optim.max_minutes=0",
        "--set", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "--set", "tracking.log_model=false",
        "--method", "joint", "--json", str(tmp / "final.json"),
    ]


@pytest.fixture(scope="module")
def s3_run(ray_cluster, s3_server, tmp_path_factory):
    """Raw ratings uploaded to s3://.../raw, prepared into s3://.../prepared, trained for one epoch
    with its checkpoints in s3://.../runs (Ray started before the AWS_* variables were set: the
    workers use the filesystem objects the driver built)."""
    tmp = tmp_path_factory.mktemp("s3e2e")
    fs, _ = storage_uri.filesystem_for(S3)
    pafs.copy_files(str(BUNDLED_DATA / "ml-latest-small/ratings.csv"), f"{BUCKET}/raw/ratings.csv",
                    source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    assert run_cli_in_repo(["prepare", "--config", str(DEV_PREPARE), "--path", f"{S3}/raw",
                            "--output", f"{S3}/prepared", "--no-progress"]) == 0
    prepared = _bucket_files("prepared")
    assert run_cli_in_repo(_train_args(tmp, "s3e2e")) == 0
    return tmp, prepared, json.loads((tmp / "final.json").read_text())["joint"]


def test_prepare_writes_the_prepared_folder_to_the_bucket(s3_run):
    _, prepared, _ = s3_run
    for f in ("prepared/prepare_config.json", "prepared/strata.json", "prepared/report.json",
              "prepared/users.parquet", "prepared/items.parquet"):
        assert f in prepared, prepared
    for split in ("train", "valid", "test"):
        assert any(f.startswith(f"prepared/{split}/") and f.endswith(".parquet") for f in prepared)
    assert not any("_work" in f or ".partial" in f for f in prepared)
    fs, _ = storage_uri.filesystem_for(S3)
    with fs.open_input_stream(f"{BUCKET}/prepared/prepare_config.json") as f:
        conf = json.loads(f.read())
    assert conf["output"] == f"{S3}/prepared" and conf["source"]["path"] == f"{S3}/raw"
    with fs.open_input_stream(f"{BUCKET}/prepared/report.json") as f:
        report = f.read().decode()
    assert f"{S3}/raw/ratings.csv" in report  # the input file, named by its URI


def test_train_checkpoints_into_the_bucket(s3_run):
    _, _, final = s3_run
    runs = _bucket_files("runs/s3e2e")
    assert "runs/s3e2e/checkpoint_manager_snapshot.json" in runs, runs
    assert any(f.startswith("runs/s3e2e/checkpoint_") and f.endswith("/state.pt") for f in runs), runs
    assert 0.0 <= final["test/all/ndcg@10"] <= 1.0 and final["test/all/users"] > 100


def test_relaunch_resumes_from_the_checkpoint_in_the_bucket(s3_run, capsys):
    tmp, _, first = s3_run
    assert run_cli_in_repo(_train_args(tmp, "s3e2e")) == 0
    again = json.loads((tmp / "final.json").read_text())["joint"]
    # the finished checkpoint was handed back: same model and test metrics, no training
    assert again["test/all/ndcg@10"] == pytest.approx(first["test/all/ndcg@10"], abs=1e-9)
    assert again["train_seconds"] == pytest.approx(first["train_seconds"])


def test_relaunch_with_another_config_is_refused_naming_the_bucket_run(s3_run, capsys):
    tmp, _, _ = s3_run
    args = _train_args(tmp, "s3e2e") + ["--set", "optim.lr=0.0123"]
    assert run_cli_in_repo(args) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.lr" in err and f"{S3}/runs/s3e2e" in err and "\n" not in err


def test_missing_bucket_is_one_line_naming_the_uri(s3_run, capsys):
    tmp, _, _ = s3_run
    bad = "s3://no-such-bucket-rp"
    assert run_cli_in_repo(_train_args(tmp, "bad", storage=f"{bad}/runs")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"run.storage_path='{bad}/runs'" in err and "does not exist" in err
    assert run_cli_in_repo(["prepare", "--config", str(DEV_PREPARE), "--path", f"{bad}/raw",
                            "--output", str(tmp / "never"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{bad}/raw" in err and "does not exist" in err
    assert run_cli_in_repo(["prepare", "--config", str(DEV_PREPARE), "--path", f"{S3}/raw",
                            "--output", f"{bad}/prepared", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"output='{bad}/prepared'" in err and "does not exist" in err
    assert not os.path.exists(tmp / "never")
