"""Model registration against a real `mlflow server` on 127.0.0.1 (SQLite backend, proxied
artifacts): the served model of a run is registered once with its stratum tags, registering
again finds the same version, and the registered model loads and scores a batch over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import wait_for_http


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
         "--artifacts-destination", str(tmp / "artifacts"), "--workers", "1"],
        stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    wait_for_http(f"{uri}/health", proc, tmp / "server.log", 90, "mlflow server")
    yield uri, tmp
    proc.terminate()
    proc.wait(timeout=30)


def test_register_best_on_a_tracking_server(server):
    import mlflow
    from mlflow.tracking import MlflowClient

    from ray_pinet.config import TrainConfig
    from ray_pinet.models.registry import build_model
    from ray_pinet.tracking import mlflow_utils as mu
    from ray_pinet.tracking.registry import register_best
    from ray_pinet.serving import load_program
    from ray_pinet.training.sequence_outputs import log_served_model
    from tests.bad_input.test_loading_and_registry import write_tiny_prepared

    uri, tmp = server
    cfg = TrainConfig.from_dict({"model": {"dim": 8, "num_blocks": 1, "max_len": 5}})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_items=20, num_strata=2, plugins=cfg.stage2.plugin).eval()
    run_id, _ = mu.start_or_resume_run(uri, "reg-test", "trial-a", cfg.to_dict())
    data = write_tiny_prepared(tmp / "prepared", num_items=20)
    log_served_model(cfg, model, uri, run_id, data)
    (data / "strata.json").write_text(json.dumps({
        "mode": "top_fraction", "num_strata": 2, "thresholds": {"q": 0.3},
        "strata": [{"stratum": 0, "name": "tail", "users": 7, "interactions": 30},
                   {"stratum": 1, "name": "head", "users": 3, "interactions": 60}]}))

    first = register_best(uri, run_id, "served", sweep="s1", trial_dir=str(tmp), objective=0.12,
                          data_path=str(data))
    again = register_best(uri, run_id, "served", sweep="s1", trial_dir=str(tmp), objective=0.12,
                          data_path=str(data))
    assert first["version"] == again["version"] == "1"
    client = MlflowClient(uri)
    assert len(client.search_model_versions("name='served'")) == 1
    mv = client.get_model_version("served", "1")
    assert mv.run_id == run_id and mv.tags["dataset"] == "prepared"
    assert json.loads(mv.tags["strata.thresholds"]) == {"q": 0.3}
    assert json.loads(mv.tags["strata.head"])["users"] == 3 and mv.tags["objective"] == "0.12"

    mlflow.set_tracking_uri(uri)
    served = load_program("models:/served/1")  # the exported graph, fetched from the server
    x = np.array([[0, 0, 1, 2, 3, 4], [1, 0, 0, 0, 5, 6], [-1, 0, 0, 0, 0, 7]], dtype=np.int64)
    scores = served(torch.as_tensor(x))
    assert scores.shape == (3, 21) and torch.isfinite(scores[:, 1:]).all()
    expected = model.predict(torch.as_tensor(x[:, 1:]), torch.tensor([0, 1, 0]), None)
    assert torch.allclose(scores[:, 1:], expected[:, 1:])
