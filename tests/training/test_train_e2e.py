"""End to end on real data, the README's main job in miniature: bundled ml-latest-small -> prepare
-> 2-worker joint, then pinet starting from joint's backbone (its stage 1 is joint training) on
Ray Train -> MLflow runs with config, per-stratum metrics, plots, stratum statistics and a
servable model; rerunning the same command resumes instead of retraining."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_cli_in_repo, small_run_args

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
    _, _, _, final, _ = trained
    for s in ("tail", "head", "all"):
        for m in ("ndcg@10", "hr@10", "auc", "gauc"):
            assert 0.0 <= final[f"test/{s}/{m}"] <= 1.0
        assert f"stage1_test/{s}/ndcg@10" in final
    assert final["test/tail/users"] + final["test/head/users"] == final["test/all/users"] == 610
    # a trained model ranks far better than chance (10 / 9724 items)
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
    import mlflow.pytorch

    model_uri = f"runs:/{run.info.run_id}/model"
    mlflow.set_tracking_uri(uri)
    module = mlflow.pytorch.load_model(model_uri)
    x = np.zeros((3, 51), dtype=np.int64)
    x[:, 0] = [0, 1, -1]  # tail, head, unseen user (-> tail plugin)
    x[:, -2:] = [[5, 6], [7, 8], [5, 6]]
    import torch

    scores = module(torch.from_numpy(x))
    assert scores.shape == (3, 9725)
    assert torch.equal(scores[0], scores[2])  # unseen users are routed to the tail plugin
    out = mlflow.pyfunc.load_model(model_uri).predict(x)
    assert np.asarray(out).shape == (3, 9725)


def test_rerun_with_same_name_resumes(trained, capsys):
    tmp, _, args, final, _ = trained
    assert run_cli_in_repo(args) == 0
    both = json.loads((tmp / "final.json").read_text())
    again = both["pinet"]
    assert both["joint"]["train_seconds"] == pytest.approx(trained[4]["train_seconds"])
    # resumed from the finished checkpoint: same model, same test metrics, no retraining
    assert again["test/all/ndcg@10"] == pytest.approx(final["test/all/ndcg@10"], abs=1e-9)
    assert again["train_seconds"] == pytest.approx(final["train_seconds"])
