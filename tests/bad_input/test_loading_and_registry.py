"""Issue 18, findings 1 and 4: nothing runs on load, and `retrain` never skips its gate.

A tampered checkpoint (a ``__reduce__`` payload that would create a marker file) is refused by
every loader — ``load_state``, ``train --set run.init_from``, ``retrain --checkpoint``, a
registered version's weights — with one error naming the file, and the marker never appears.
``retrain`` tells "no registered model of that name" from a registry it cannot read (the latter
fails the job), and model names with quotes are found. Real parts throughout: Engine snapshots,
an MLflow SQLite store, the CLI in-process.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_pinet.config import TrainConfig
from ray_pinet.errors import DataError
from ray_pinet.training.engine import RunMeta
from tests.conftest import BUNDLED_DATA, run_cli_in_repo, small_run_args

REFUSED = "refused to load this checkpoint: it holds code or objects other than weights"


class Payload:
    """Pickles as a call of ``open(marker, "w")``: loading it with ``weights_only=False`` creates
    the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tampered_checkpoint(where: Path, marker: Path, snap: dict | None = None) -> Path:
    """A checkpoint directory whose state.pt looks like a run's snapshot plus the payload."""
    where.mkdir(parents=True, exist_ok=True)
    torch.save({**(snap or {}), "engine": {"stage": 3}, "payload": Payload(marker)}, where / "state.pt")
    return where


def _tiny_model(num_items: int = 20):
    from ray_pinet.models.registry import build_model

    cfg = TrainConfig.from_dict({"model": {"dim": 8, "num_blocks": 1, "max_len": 5}})
    meta = RunMeta(num_items=num_items, num_strata=2, num_train_samples=10, user_share=[0.8, 0.2],
                   interaction_share=[0.5, 0.5], strata={"num_strata": 2, "mode": "top_fraction"})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_items, 2, cfg.stage2.plugin).eval()
    model.use_plugins = True
    return cfg, meta, model


def write_tiny_prepared(data: Path, num_items: int) -> Path:
    """The parts of a prepared folder a served model carries (``serving.serving_users``):
    items, two users and their validation/test rows."""
    data.mkdir(parents=True, exist_ok=True)
    if not (data / "items.parquet").exists():
        pq.write_table(pa.table({"item_idx": pa.array(np.arange(1, num_items + 1), pa.int32()),
                                 "item_id": [f"i{i}" for i in range(1, num_items + 1)]}), data / "items.parquet")
    # users and their latest histories
    pq.write_table(pa.table({"user_idx": pa.array([0, 1], pa.int64()), "user_id": ["u0", "u1"],
                             "activeness": pa.array([3, 9], pa.int64()), "stratum": pa.array([0, 1], pa.int8())}),
                   data / "users.parquet")
    for split in ("valid", "test"):
        (data / split).mkdir(exist_ok=True)
        pq.write_table(pa.table({"sample_id": pa.array([0, 1], pa.int64()), "user_idx": pa.array([0, 1], pa.int64()),
                                 "stratum": pa.array([0, 1], pa.int8()),
                                 "history": pa.array([[1, 2], [3, 4, 5]], pa.list_(pa.int32())),
                                 "target": pa.array([6, 7], pa.int32()), "neg": pa.array([8, 9], pa.int32()),
                                 "seen": pa.array([[1, 2], [3, 4, 5]], pa.list_(pa.int32()))}),
                       data / split / "part-00000.parquet")
    return data


def _log_run_with_vocab(uri: str, run_name: str, num_items: int, tmp: Path) -> str:
    """A tracked run carrying the vocabulary and strata artifacts a trained run logs."""
    from ray_pinet.tracking import mlflow_utils as mu

    run_id, _ = mu.start_or_resume_run(uri, "bad-input", run_name, {"x": 1})
    data = tmp / f"data-{run_name}"
    data.mkdir(parents=True)
    pq.write_table(pa.table({"item_idx": pa.array(np.arange(1, num_items + 1), pa.int32()),
                             "item_id": [f"i{i}" for i in range(1, num_items + 1)]}), data / "items.parquet")
    (data / "strata.json").write_text(json.dumps({"num_strata": 2, "mode": "top_fraction"}))
    mu.log_artifact(uri, run_id, data / "items.parquet", "vocab")
    mu.log_artifact(uri, run_id, data / "strata.json", "data")
    write_tiny_prepared(data, num_items)
    return run_id


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """Date partitions of the bundled ml-latest-small log (what `retrain --logs` reads)."""
    from ray_pinet.data.config import SourceConfig
    from ray_pinet.data.sources import read_log
    from ray_pinet.retrain.partitions import write_partitions

    tmp = tmp_path_factory.mktemp("logs")
    log, _ = read_log(SourceConfig(format="movielens_csv",
                                   path=str(BUNDLED_DATA / "ml-latest-small" / "ratings.csv")))
    write_partitions(log, tmp / "logs", ["2018-01-01"])
    return tmp / "logs"


def _retrain_cli(tmp: Path, uri: str, logs: Path, model: str, *extra: str) -> int:
    return run_cli_in_repo(["retrain", *small_run_args(tmp, uri), "--set", "run.name=bad-input-retrain",
                            "--logs", str(logs), "--model", model, *extra])


# -- finding 1: checkpoints --------------------------------------------------------------------
def test_engine_snapshot_loads_with_weights_only(tmp_path):
    """What a sequence run checkpoints (the Engine's snapshot, written by the worker's report)
    reads back under weights_only=True."""
    from ray_pinet.checkpoint_io import save_weights
    from ray_pinet.training.checkpoint import load_state
    from tests.training.test_engine import make_engine

    reports = []
    make_engine(reports=reports, overrides={"optim.max_epochs": 1, "stage2.max_epochs": 1}).run()
    snap = reports[-1][1]
    (tmp_path / "ckpt").mkdir()
    save_weights(snap, tmp_path / "ckpt" / "state.pt")
    back = load_state(str(tmp_path / "ckpt"))
    assert back["engine"]["stage"] == 3 and back["config"] == snap["config"]
    for k, v in snap["model"].items():
        assert torch.equal(back["model"][k], v)


def test_load_state_refuses_a_tampered_checkpoint(tmp_path):
    from ray_pinet.training.checkpoint import load_state

    marker = tmp_path / "PWNED"
    ckpt = _tampered_checkpoint(tmp_path / "ckpt", marker)
    with pytest.raises(DataError, match=REFUSED) as e:
        load_state(str(ckpt))
    assert str(ckpt / "state.pt") in str(e.value) and "io.open" in str(e.value)
    assert not marker.exists()


def test_train_init_from_refuses_a_tampered_checkpoint_on_the_driver(ray_cluster, tmp_path, capsys):
    """`train --set run.init_from=DIR`: one line, exit 2, before any Ray Train worker starts."""
    marker = tmp_path / "PWNED"
    ckpt = _tampered_checkpoint(tmp_path / "ckpt", marker)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = run_cli_in_repo(["train", *small_run_args(tmp_path, uri), "--set", "method=pinet",
                            "--set", f"run.init_from={ckpt}", "--set", "run.name=tampered-init"])
    err = capsys.readouterr().err
    assert code == 2 and REFUSED in err and str(ckpt / "state.pt") in err
    assert not marker.exists()
    assert not (tmp_path / "runs" / "tampered-init").exists()  # Ray Train never started the run


def test_retrain_checkpoint_refuses_a_tampered_checkpoint(tmp_path, logs, capsys):
    marker = tmp_path / "PWNED"
    ckpt = _tampered_checkpoint(tmp_path / "ckpt", marker)
    code = _retrain_cli(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", logs, "m", "--checkpoint", str(ckpt))
    err = capsys.readouterr().err
    assert code == 2 and REFUSED in err and str(ckpt / "state.pt") in err
    assert not marker.exists()
    assert not (tmp_path / "runs" / "retrain").exists()


def test_warm_start_checkpoint_that_retrain_writes_loads_with_weights_only(tmp_path):
    from ray_pinet.retrain.warm import write_warm_checkpoint
    from ray_pinet.training.checkpoint import load_backbone_state

    cfg, meta, model = _tiny_model()
    meta.strata = {"num_strata": np.int64(2), "share": np.float64(0.2)}  # numpy values, as JSON never has
    where = write_warm_checkpoint(model.state_dict(), cfg.to_dict(), meta.__dict__, tmp_path / "warm")
    backbone = load_backbone_state(where)
    assert backbone and all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())


# -- finding 1: registered versions ------------------------------------------------------------
def test_model_state_artifact_round_trip(tmp_path):
    """The plain state dict that log_served_model logs beside the served model rebuilds an equal
    model in from_registry (weights_only, no project class unpickled)."""
    from ray_pinet.retrain.warm import from_registry
    from ray_pinet.tracking.registry import register_run
    from ray_pinet.training.sequence_outputs import log_served_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg, meta, model = _tiny_model()
    run_id = _log_run_with_vocab(uri, "round-trip", 20, tmp_path)
    log_served_model(cfg, model, uri, run_id, tmp_path / "data-round-trip", meta=meta)
    register_run(uri, run_id, "round-trip", {"data.through": "2020-01-01"}, None)
    inc = from_registry(uri, "round-trip")
    assert inc is not None and inc.version == "1" and inc.through == "2020-01-01"
    assert list(inc.item_ids[1:4]) == ["i1", "i2", "i3"] and inc.strata["num_strata"] == 2
    assert type(inc.model) is type(model) and inc.model.use_plugins
    got, want = inc.model.state_dict(), model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    x = torch.tensor([[0, 0, 1, 2, 3], [0, 4, 5, 6, 7]])
    s = torch.tensor([0, 1])
    assert torch.equal(inc.model.predict(x, s, None), model.predict(x, s, None))


def test_from_registry_refuses_a_tampered_registered_version(tmp_path, logs, capsys):
    """Both the weights artifact and the pickled served model carry the payload; neither runs."""
    import mlflow
    import mlflow.pytorch

    from ray_pinet.retrain.warm import from_registry
    from ray_pinet.tracking.registry import register_run

    marker = tmp_path / "PWNED"

    class Evil(torch.nn.Module):
        def __reduce__(self):
            return (open, (str(marker), "w"))

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = _log_run_with_vocab(uri, "tampered", 20, tmp_path)
    cfg, meta, model = _tiny_model()
    bad = tmp_path / "model_state"
    bad.mkdir()
    torch.save({"config": cfg.to_dict(), "meta": meta.__dict__, "model": model.state_dict(),
                "use_plugins": Payload(marker)}, bad / "state.pt")
    from ray_pinet.tracking import mlflow_utils as mu

    mu.log_artifact(uri, run_id, bad / "state.pt", "model_state")
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(Evil(), name="model", serialization_format="pickle",
                                 pip_requirements=["torch"])
    register_run(uri, run_id, "tampered", {}, None)
    assert not marker.exists()

    with pytest.raises(DataError, match=REFUSED) as e:
        from_registry(uri, "tampered")
    assert "models:/tampered/1" in str(e.value)
    assert not marker.exists()

    code = _retrain_cli(tmp_path, uri, logs, "tampered")
    err = capsys.readouterr().err
    assert code == 2 and REFUSED in err and not marker.exists()
    from mlflow.tracking import MlflowClient

    assert [v.version for v in MlflowClient(uri).search_model_versions("name='tampered'")] == [1]


def test_registered_version_without_weights_artifact_says_so(tmp_path):
    from ray_pinet.config_base import ConfigError
    from ray_pinet.retrain.warm import from_registry
    from ray_pinet.tracking.registry import register_run
    from ray_pinet.training.sequence_outputs import log_served_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg, meta, model = _tiny_model()
    run_id = _log_run_with_vocab(uri, "older", 20, tmp_path)
    log_served_model(cfg, model, uri, run_id, tmp_path / "data-older")  # no meta: no model_state artifact
    register_run(uri, run_id, "older", {}, None)
    with pytest.raises(ConfigError, match="has no model_state/state.pt artifact: it was logged by an older ray-pinet"):
        from_registry(uri, "older")


# -- finding 4: registry errors are not "no incumbent" ----------------------------------------
def test_retrain_fails_when_the_registry_is_unreachable(tmp_path, logs, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{_closed_port()}"
    code = _retrain_cli(tmp_path, uri, logs, "daily")
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("ray-pinet:")]
    assert len(lines) == 1 and "could not read the model registry" in lines[0] and uri in lines[0]
    assert "'daily'" in lines[0]
    # the job stopped before preparing or training anything (so nothing could be registered)
    assert not (tmp_path / "runs" / "retrain").exists() and not list(tmp_path.glob("prepared*"))


def test_model_names_with_quotes_find_their_versions(tmp_path):
    from ray_pinet.retrain.warm import from_registry
    from ray_pinet.tracking.registry import register_run
    from ray_pinet.training.sequence_outputs import log_served_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg, meta, model = _tiny_model()
    for i, name in enumerate(("team's model", 'the "best" one')):
        run_id = _log_run_with_vocab(uri, f"quoted-{i}", 20, tmp_path)
        log_served_model(cfg, model, uri, run_id, tmp_path / f"data-quoted-{i}", meta=meta)
        first = register_run(uri, run_id, name, {}, None)
        again = register_run(uri, run_id, name, {}, None)  # idempotent: finds the version it made
        assert first["version"] == again["version"] == "1"
        inc = from_registry(uri, name)
        assert inc is not None and inc.version == "1"
    assert from_registry(uri, "team's") is None  # a name with no registered model: first training
    # a sweep finds its trials' runs by name tag the same way (tuning/sweep.py -> find_run)
    from mlflow.tracking import MlflowClient

    from ray_pinet.tracking import mlflow_utils as mu

    client = MlflowClient(uri)
    exp = mu.experiment_id(uri, "bad-input")
    trial = client.create_run(exp, tags={mu.RUN_NAME_TAG: "o'brien-sweep-t1"}).info.run_id
    assert mu.find_run(uri, "bad-input", "o'brien-sweep-t1") == trial
    from ray_pinet.config_base import ConfigError

    with pytest.raises(ConfigError, match="both quote characters"):
        from_registry(uri, 'it\'s "both"')


# -- retrain's artifacts: whole or not at all ---------------------------------------------------
def _strata(users: int) -> dict:
    return {"mode": "top_fraction", "thresholds": {"q": 0.2}, "num_strata": 2,
            "strata": [{"name": "tail", "users": users, "interactions": 10 * users, "user_share": 0.8,
                        "interaction_share": 0.5, "min_activeness": 1, "max_activeness": 9},
                       {"name": "head", "users": 5, "interactions": 50, "user_share": 0.2,
                        "interaction_share": 0.5, "min_activeness": 10, "max_activeness": 99}]}


def test_a_failing_retrain_report_leaves_the_previous_report(tmp_path, monkeypatch):
    """A rerun of the same day whose report cannot be logged (the tracking server went away)
    fails and leaves the previous report, and the warm start beside it, exactly as they were."""
    from ray_pinet.retrain.gate import drift, gate
    from ray_pinet.retrain.run import write_report
    from ray_pinet.tracking import mlflow_utils as mu

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, _ = mu.start_or_resume_run(uri, "bad-input", "report", {"x": 1})
    cand = {"tail/ndcg@10": 0.1, "head/ndcg@10": 0.1, "all/ndcg@10": 0.1}
    summary = {"through": "2020-01-02", "incumbent": None, "new_partitions": ["2020-01-02"],
               "registered": "models:/m/1", "decision": "registered",
               "gate": gate(None, cand, 2, "ndcg@10", 0.0).to_dict(), "drift": drift(None, _strata(20))}
    out = tmp_path / "runs" / "retrain" / "daily-through-2020-01-02"
    (out / "warm_start").mkdir(parents=True)
    (out / "warm_start" / "state.pt").write_bytes(b"weights")
    write_report(out, summary, uri, run_id)

    def files():
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = files()
    assert set(before) == {"summary.json", "drift.json", "drift.md", "drift.png", "warm_start/state.pt"}
    assert json.loads(before["summary.json"])["decision"] == "registered"

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    worse = {"tail/ndcg@10": 0.05, "head/ndcg@10": 0.1, "all/ndcg@10": 0.08}
    rejected = {**summary, "decision": "rejected", "registered": None, "incumbent": "models:/m/1",
                "gate": gate(cand, worse, 2, "ndcg@10", 0.0).to_dict(), "drift": drift(_strata(20), _strata(30))}
    with pytest.raises(Exception, match="127.0.0.1"):
        # (another run id: MLflow caches where a run's artifacts go once it has looked it up)
        write_report(out, rejected, f"http://127.0.0.1:{_closed_port()}", "f" * 32)
    assert files() == before
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no half-written sibling left


def test_champion_alias_marks_the_serving_version_and_retrain_follows_it(tmp_path):
    """The first registration takes @champion, a plain later one leaves it, a winner moves it,
    a rejected candidate (make_champion=False) is registered without it; from_registry (what
    retrain warm-starts from and gates against) follows the alias, not the newest version."""
    from mlflow.tracking import MlflowClient

    from ray_pinet.retrain.warm import from_registry
    from ray_pinet.tracking.registry import champion, register_run
    from ray_pinet.training.sequence_outputs import log_served_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg, meta, model = _tiny_model()
    runs = []
    for i in range(4):
        run_id = _log_run_with_vocab(uri, f"alias-{i}", 20, tmp_path)
        log_served_model(cfg, model, uri, run_id, tmp_path / f"data-alias-{i}", meta=meta)
        runs.append(run_id)
    assert champion(uri, "aliased") is None  # no such model yet
    first = register_run(uri, runs[0], "aliased", {}, None)
    assert first["champion"] and str(champion(uri, "aliased").version) == "1"
    plain = register_run(uri, runs[1], "aliased", {}, None)  # a later plain training
    assert not plain["champion"] and str(champion(uri, "aliased").version) == "1"
    winner = register_run(uri, runs[2], "aliased", {}, None, make_champion=True)
    assert winner["champion"] and str(champion(uri, "aliased").version) == "3"
    rejected = register_run(uri, runs[3], "aliased", {"retrain.decision": "rejected"}, None, make_champion=False)
    assert rejected["version"] == "4" and not rejected["champion"]
    inc = from_registry(uri, "aliased")
    assert inc.version == "3" and inc.source == "models:/aliased/3" and inc.run_id == runs[2]
    assert str(MlflowClient(uri).get_model_version_by_alias("aliased", "champion").version) == "3"
