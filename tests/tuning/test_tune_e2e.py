"""`ray-pinet tune` end to end: a real 4-trial ASHA sweep over two thresholds and two learning
rates on the bundled ml-latest-small (tiny SASRec), each trial a TorchTrainer on local Ray.
Checked: ASHA stopped a trial early, the MLflow parent/child structure, the registered model
version with its tags, and that the registered model scores a batch; rerunning the command
resumes the finished sweep without training anything again."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import REPO, run_cli_in_repo, small_run_args

pytestmark = pytest.mark.slow


def tune_args(tmp, uri):
    return ["tune", "--space", str(REPO / "tune_spaces/smoke.yaml"), *small_run_args(tmp, uri),
            "--storage", str(tmp / "tune"), "--name", "smoke", "--register-as", "smoke-model"]


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    assert run_cli_in_repo(tune_args(tmp, uri)) == 0
    summary = json.loads((tmp / "tune" / "smoke" / "summary.json").read_text())
    return tmp, uri, summary


def test_asha_stops_a_trial_and_the_best_is_feasible_and_finished(sweep):
    tmp, _, summary = sweep
    trials = summary["trials"]
    assert len(trials) == 4 and not any(t["error"] for t in trials)
    stopped = [t for t in trials if not t["finished"]]
    assert stopped, "ASHA stopped no trial"
    assert all(t["iterations"] < max(x["iterations"] for x in trials) for t in stopped)
    best = summary["best"]
    assert best["finished"] and best["feasible"]
    assert best["values"]["optim.lr"] == pytest.approx(0.003)  # 1e-6 learns nothing
    # Two thresholds -> two stratifications: the q = 0.3 trials ran on a restratified view.
    qs = {t["values"]["prepare.strata.q"] for t in trials}
    assert qs == {0.2, 0.3}
    views = [p for p in (tmp / "tune").glob("prepared-*") if p.is_dir()]
    assert len(views) == 1 and (views[0] / "restratified.json").is_file()  # no second prepare
    assert (views[0] / "train").resolve() == (tmp / "prepared" / "train").resolve()


def test_mlflow_parent_children_and_registered_model(sweep):
    import mlflow
    from mlflow.tracking import MlflowClient

    tmp, uri, summary = sweep
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ray-pinet")
    parent = client.search_runs([exp.experiment_id], "tags.`ray_pinet.run_name` = 'smoke'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    roles = sorted(c.data.tags.get("role", "trial") for c in children)
    assert roles == ["reference", "trial", "trial", "trial", "trial"]
    trial_runs = [c for c in children if c.data.tags.get("role") != "reference"]
    for c in trial_runs:  # per-epoch per-stratum validation metrics of every trial
        hist = client.get_metric_history(c.info.run_id, "val/tail/ndcg_at_10")
        assert len(hist) >= 1 and c.data.params["method"] == "pinet"
    reg = summary["registered"]
    assert reg["name"] == "smoke-model" and reg["version"] == "1"
    mv = client.get_model_version("smoke-model", "1")
    assert mv.run_id == summary["best"]["run_id"]
    for tag in ("dataset", "strata.mode", "strata.thresholds", "strata.tail", "strata.head", "objective", "sweep"):
        assert tag in mv.tags, tag
    assert json.loads(mv.tags["strata.thresholds"])["q"] == summary["best"]["values"]["prepare.strata.q"]
    mlflow.set_tracking_uri(uri)
    from ray_pinet.serving import load_program

    model = load_program("models:/smoke-model/1")
    x = np.zeros((3, 51), dtype=np.int64)
    x[:, 0] = [0, 1, 0]
    x[:, -4:] = [[5, 6, 7, 8], [1, 2, 3, 4], [9, 10, 11, 12]]
    import torch

    scores = model(torch.as_tensor(x))
    assert scores.shape[0] == 3 and torch.isfinite(scores[:, 1:]).all()  # column 0 = padding, -inf
    assert (tmp / "tune" / "smoke" / "report.md").read_text().count("| stopped early |") == \
        sum(not t["finished"] for t in summary["trials"])


def test_rerun_resumes_without_training_again(sweep):
    from mlflow.tracking import MlflowClient

    tmp, uri, summary = sweep
    assert run_cli_in_repo(tune_args(tmp, uri)) == 0
    again = json.loads((tmp / "tune" / "smoke" / "summary.json").read_text())
    assert [t["trial_id"] for t in again["trials"]] == [t["trial_id"] for t in summary["trials"]]
    assert again["best"]["trial_id"] == summary["best"]["trial_id"]
    versions = MlflowClient(uri).search_model_versions("name='smoke-model'")
    assert len(versions) == 1  # not registered twice
