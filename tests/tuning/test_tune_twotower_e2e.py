"""`ray-pinet tune` on a two-tower method end to end: a real 2-trial grid over OneBP's learning
rate on 60 users of ML-100K, each trial a Ray Train run; each trial's objective is its best
validation NDCG@10 (checked against its MLflow metric history), the best trial is the one with
the highest, every trial is an MLflow child of the sweep, and the report lists both.

Run with ``--smoke-test``: until each kind held its own smoke settings (``kinds/<kind>.py``), tune applied the sequence kind's smoke
settings before handing a two-tower space over (``ConfigError: unknown key(s) 'stage2'``)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_cli_in_repo, shared_file

pytestmark = pytest.mark.slow

SPACE = """
method: onebp
objective: {slice: all, metric: ndcg, measure: absolute}
search: {algorithm: grid, num_samples: 1, max_concurrent: 1}
scheduler: {kind: none}
fixed: {optim.max_epochs: 3, eval.every: 1, model.dim: 8}
space:
  optim.lr: {grid: [0.005, 0.000001]}
"""


def test_twotower_sweep_picks_the_better_trial_on_validation(ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["tune", "--space", str(space), "--config", str(REPO / "configs/twotower/ml-100k-onebp.yaml"),
            "--storage", str(tmp_path / "tune"), "--name", "tt", "--smoke-test"]
    for s in (f"data.source.path={shared_file('ml-100k/u.data')}", f"data.output={tmp_path / 'pairs'}",
              "data.max_users=60", "data.valid_share=0.2", f"run.storage_path={tmp_path / 'runs'}",
              f"tracking.tracking_uri={uri}", "run.progress=false"):
        args += ["--set", s]
    assert run_cli_in_repo(args) == 0
    # the two-tower smoke settings: their own pair data folder, never the full run's
    assert (tmp_path / "pairs-smoke").is_dir() and not (tmp_path / "pairs").exists()
    summary = json.loads((tmp_path / "tune" / "tt" / "summary.json").read_text())
    trials = summary["trials"]
    assert len(trials) == 2 and all(t["finished"] and not t["error"] for t in trials)
    assert {t["values"]["optim.lr"] for t in trials} == {0.005, 0.000001}
    best = max(trials, key=lambda t: t["objective"])
    assert summary["best"]["trial_id"] == best["trial_id"] and best["objective"] > 0
    report = (tmp_path / "tune" / "tt" / "report.md").read_text()
    assert "**chosen**" in report and report.count("| finished") == 2
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ray-pinet-twotower")
    parent = client.search_runs([exp.experiment_id], "tags.`ray_pinet.run_name` = 'tt'")[0]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2
    # a trial's objective is the best validation NDCG@10 of its run (logged per epoch in MLflow)
    for t in trials:
        run = next(c for c in children if c.data.tags.get("trial_id") == t["trial_id"])
        history = client.get_metric_history(run.info.run_id, "valid/all/ndcg_at_10")
        assert len(history) == 2 and t["objective"] == pytest.approx(max(m.value for m in history))  # smoke: 2
