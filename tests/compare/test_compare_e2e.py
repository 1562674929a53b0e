"""`ray-pinet compare` end to end on the bundled data: a real grid (joint, separate = one run
per stratum) on local Ray, one seed, tiny models; the report files and the MLflow parent/child
structure are checked, and the separate ensemble is served from MLflow. (transfer's training is
tested in-process in tests/training/test_engine.py; a cell of it here cost ~50 s of suite time.)"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import run_cli_in_repo, small_run_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def grid(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = ["compare", *small_run_args(tmp, uri), "--methods", "separate", "--seeds", "0",
            "--name", "grid", "--output", str(tmp / "report"),
            "--set", "optim.max_epochs=1"]
    assert run_cli_in_repo(args) == 0
    return tmp, uri, args


def test_report_files_hold_every_cell(grid):
    tmp, _, _ = grid
    md = (tmp / "report" / "report.md").read_text()
    for label in ("joint", "separate"):
        assert f"| {label} | sasrec | 1 |" in md
    assert (tmp / "report" / "ndcg.png").stat().st_size > 1000
    assert len((tmp / "report" / "cells.jsonl").read_text().splitlines()) == 2


def test_mlflow_parent_child_runs_and_served_ensemble(grid):
    import mlflow
    from mlflow.tracking import MlflowClient

    _, uri, _ = grid
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ray-pinet")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    by_name = {r.info.run_name: r for r in runs}
    parent = by_name["grid"]
    assert parent.info.status == "FINISHED"
    assert "report" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["cell"] for r in children) == ["joint", "separate"]
    sep = next(r for r in children if r.data.tags["cell"] == "separate")
    # separate = one run per stratum, nested under its own run
    subs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sep.info.run_id]
    assert sorted(r.data.tags["stratum"] for r in subs) == ["head", "tail"]
    joint = next(r for r in children if r.data.tags["cell"] == "joint")
    assert sep.data.metrics["test/all/users"] == joint.data.metrics["test/all/users"] > 100
    from ray_pinet.serving import load_program

    mlflow.set_tracking_uri(uri)
    model = load_program(f"runs:/{sep.info.run_id}/model")  # the per-stratum ensemble, exported
    x = np.zeros((3, 51), dtype=np.int64)
    x[:, 0] = [0, 1, -1]  # tail, head, unseen user
    x[:, -2:] = [[1, 2], [2, 3], [3, 4]]
    import torch

    scores = model(torch.as_tensor(x))
    assert scores.shape[0] == 3 and torch.isfinite(scores[:, 1:]).all()


def test_rerun_skips_finished_cells(grid, capsys):
    tmp, _, args = grid
    assert run_cli_in_repo(args) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == 2
