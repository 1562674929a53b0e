"""End to end on real data, the README's main job in miniature: bundled ml-latest-small -> prepare
-> 2-worker joint, then pinet starting from joint's backbone (its stage 1 is joint training) on
Ray Train -> MLflow runs with config, per-stratum metrics, plots, stratum statistics and a
servable model; rerunning the same command resumes instead of retraining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO, run_cli_in_repo, small_run_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = [
        "train", *small_run_args(tmp, uri), "--set", "run.name=e2e",
        "--set", "run.num_workers=2", "--set", "run.cpus_per_worker=0.5",
        "--set", "optim.max_epochs=2", "--set", "stage2.max_epochs=1",
        "--method", "joint", "--method", "pinet", "--json", str(tmp / "final.json"),
    ]
    assert run_cli_in_repo(args) == 0
    both = json.loads((tmp / "final.json").read_text())
    return tmp, uri, args, both["pinet"], both["joint"]


def test_final_metrics_per_stratum(trained):
    tmp, _, _, final, _ = trained
    for s in ("tail", "head", "all"):
        for m in ("ndcg@10", "hr@10", "auc", "gauc"):
            assert 0.0 <= final[f"test/{s}/{m}"] <= 1.0
        assert f"stage1_test/{s}/ndcg@10" in final
    users = pq.read_metadata(tmp / "prepared" / "users.parquet").num_rows
    assert final["test/tail/users"] + final["test/head/users"] == final["test/all/users"] == users > 100
    # a trained model ranks far better than chance (10 / 6396 items)
    assert final["test/all/hr@10"] > 0.02
    assert final["test/all/auc"] > 0.6


def test_pinet_starts_from_the_joint_backbone(trained):
    _, _, _, pinet, joint = trained
    # stage 1 was not retrained: the backbone-only scores of pinet are joint's final scores
    for s in ("tail", "head", "all"):
        assert pinet[f"stage1_test/{s}/ndcg@10"] == pytest.approx(joint[f"test/{s}/ndcg@10"], abs=1e-12)
        assert pinet[f"stage1_test/{s}/auc"] == pytest.approx(joint[f"test/{s}/auc"], abs=1e-12)


def test_mlflow_run_holds_config_metrics_plots_and_model(trained):
    from mlflow.tracking import MlflowClient

    tmp, uri, _, _, _ = trained
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ray-pinet")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`ray_pinet.run_name` = 'e2e-pinet'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "pinet" and run.data.params["ga.prior"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    arts |= {a.path for d in ("plots", "data") for a in client.list_artifacts(run.info.run_id, d)}
    for name in ("config.json", "plots/stratum_metrics.png", "plots/activeness_histogram.png",
                 "plots/test_metrics_by_stratum.png", "data/strata.json", "data/report.json"):
        assert name in arts, (name, arts)
    hist = client.get_metric_history(run.info.run_id, "val/tail/ndcg_at_10")
    assert len(hist) >= 1  # stage-2 epochs (stage 1 is the joint run's)
    assert "checkpoint" in run.data.params["run.init_from"]
    cfg = json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp))).read_text())
    assert cfg["run"]["num_workers"] == 2

    import mlflow.pyfunc

    from ray_pinet.serving import load_program

    model_uri = f"runs:/{run.info.run_id}/model"
    mlflow.set_tracking_uri(uri)
    module = load_program(model_uri)  # the exported scoring graph on item indices
    x = np.zeros((3, 51), dtype=np.int64)
    x[:, 0] = [0, 1, -1]  # tail, head, unseen user (-> tail plugin)
    x[:, -2:] = [[5, 6], [7, 8], [5, 6]]
    import torch

    scores = module(torch.from_numpy(x))
    num_items = pq.read_metadata(tmp / "prepared" / "items.parquet").num_rows
    assert scores.shape == (3, num_items + 1)  # one column per item plus padding
    assert torch.equal(scores[0], scores[2])  # unseen users are routed to the tail plugin
    # the served model on raw ids: a known user by id, an unknown one by recent items
    import pandas as pd

    users = pq.read_table(tmp / "prepared" / "users.parquet").column("user_id").to_pylist()
    items = pq.read_table(tmp / "prepared" / "items.parquet").column("item_id").to_pylist()
    out = mlflow.pyfunc.load_model(model_uri).predict(
        pd.DataFrame({"user_id": [users[0], "nobody"], "items": [None, [items[4], items[5]]]}))
    assert out["known_user"].tolist() == [True, False]
    assert all(len(ids) == 10 and set(ids) <= set(items) for ids in out["item_ids"])
    assert not {items[4], items[5]} & set(out["item_ids"][1])  # the request's items are excluded


def test_rerun_with_same_name_resumes(trained, capsys):
    tmp, _, args, _, joint = trained
    # the joint half of the command again (pinet resumes the same way; one Train start saved)
    i = args.index("--method")
    again_args = args[:i] + ["--method", "joint", "--set", "run.name=e2e-joint"] + args[i + 4:]
    assert run_cli_in_repo(again_args) == 0
    again = json.loads((tmp / "final.json").read_text())["joint"]
    # resumed from the finished checkpoint: same model, same test metrics, no retraining
    assert again["test/all/ndcg@10"] == pytest.approx(joint["test/all/ndcg@10"], abs=1e-9)
    assert again["train_seconds"] == pytest.approx(joint["train_seconds"])


def test_killed_worker_recovers_from_the_last_checkpoint(trained):
    """Worker-failure recovery: the fixture's joint run again (new name, max_failures=1); once its
    first per-epoch checkpoint exists one of the two training worker processes is SIGKILLed. The
    run must restart from that checkpoint (not from scratch), finish, and end where the
    uninterrupted run ended (same seeds, same world size)."""
    import os
    import signal
    import threading
    import time

    import ray
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_actors

    from ray_pinet.config import TrainConfig
    from ray_pinet.training.trainer import fit
    from ray_pinet.training.checkpoint import load_state

    tmp, uri, args, _, joint = trained
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    config = args[args.index("--config") + 1]
    cfg = TrainConfig.from_yaml(config, sets + ["method=joint", "run.name=e2e-killed", "run.max_failures=1"])
    cwd = os.getcwd()
    os.chdir(REPO)  # prepare configs are relative to the repo
    out: dict = {}
    t0 = time.perf_counter()
    th = threading.Thread(target=lambda: out.update(res=fit(cfg)), daemon=True)
    th.start()
    try:
        run_dir = tmp / "runs" / "e2e-killed"
        victim = None
        while victim is None and th.is_alive() and time.perf_counter() - t0 < 300:
            # the checkpoint counts once Train has registered it (its manager snapshot is written
            # after the upload); a directory alone may still be half written
            if (run_dir / "checkpoint_manager_snapshot.json").exists():
                workers = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                if len(workers) == 2:
                    victim = sorted(w.pid for w in workers)[-1]
                    os.kill(victim, signal.SIGKILL)
                    killed_at = time.perf_counter() - t0
            time.sleep(0.2)
        th.join(timeout=600)
    finally:
        os.chdir(cwd)
    wall = time.perf_counter() - t0
    assert victim is not None, "no checkpoint appeared, or the run ended before a worker could be killed"
    res = out["res"]
    engine = load_state(res.checkpoint_path)["engine"]
    # restarted once, from the checkpoint of epoch 0 (at most the epoch in flight was lost)
    assert engine["resumed_at"] and engine["resumed_at"][0].startswith("stage 1 epoch "), engine["resumed_at"]
    assert int(engine["resumed_at"][0].split()[-1]) >= 1
    for s in ("tail", "head", "all"):
        assert res.final[f"test/{s}/ndcg@10"] == pytest.approx(joint[f"test/{s}/ndcg@10"], rel=1e-4, abs=1e-6)
        assert res.final[f"test/{s}/auc"] == pytest.approx(joint[f"test/{s}/auc"], rel=1e-4, abs=1e-6)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ray-pinet")
    base = client.search_runs([exp.experiment_id], filter_string="tags.`ray_pinet.run_name` = 'e2e-joint'",
                              order_by=["attributes.start_time ASC"])[0]  # the training run, not a resume
    base_wall = (base.info.end_time - base.info.start_time) / 1000.0
    print(f"\nworker killed at {killed_at:.1f}s; run with recovery {wall:.1f}s, uninterrupted {base_wall:.1f}s "
          f"(lost {wall - base_wall:.1f}s); resumed at {engine['resumed_at']}")
