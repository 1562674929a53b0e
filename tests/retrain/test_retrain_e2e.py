"""`ray-pinet retrain` over two days of real data: ml-latest-small split by time into a history
partition (before 2018) and two new ones (2018-01..04, 2018-05..09).

Day 0 trains from scratch and registers version 1; day 1 warm-starts from it on history + the
first new partition (activeness recomputed, item vocabulary grown), passes the gate and becomes
version 2; day 2 is sabotaged (learning rate 1.0) so the gate must reject it: it is registered as
version 3 without `@champion`, which stays on version 2.
Each candidate's MLflow run carries the drift report."""

from __future__ import annotations

import json

import pytest

from ray_pinet.data.config import SourceConfig
from ray_pinet.data.sources import read_log
from ray_pinet.retrain.partitions import write_partitions
from tests.conftest import BUNDLED_DATA, REPO, run_cli_in_repo, small_run_args

pytestmark = pytest.mark.slow
MODEL = "retrain-model"
# All 610 users, not the dev quarter: each day's holdout is the users active in the newest
# partition, and a quarter of them gives the gate a handful of hits to decide on.
FULL = REPO / "configs/prepare/ml-latest-small.yaml"


@pytest.fixture(scope="module")
def days(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("retrain")
    src = SourceConfig(format="movielens_csv", path=str(BUNDLED_DATA / "ml-latest-small" / "ratings.csv"))
    log, _ = read_log(src)
    write_partitions(log, tmp / "logs", ["2018-01-01", "2018-05-01"])
    uri = f"sqlite:///{tmp / 'mlflow.db'}"

    def retrain(through, *extra):
        args = ["retrain", *small_run_args(tmp, uri, FULL), "--set", "optim.max_epochs=1", "--set", "stage2.max_epochs=1",
                "--set", "run.name=mls-daily", "--logs", str(tmp / "logs"), "--model", MODEL,
                "--through", through, *extra]
        code = run_cli_in_repo(args)
        summary = tmp / "runs" / "retrain" / f"mls-daily-through-{through}" / "summary.json"
        return code, json.loads(summary.read_text()) if summary.exists() else None

    out = {"day0": retrain("2017-12-31", "--tolerance", "0.5"),
           "day1": retrain("2018-04-30", "--tolerance", "0.9")}
    out["again"] = run_cli_in_repo(["retrain", *small_run_args(tmp, uri, FULL), "--set", "run.name=mls-daily",
                                    "--logs", str(tmp / "logs"), "--model", MODEL, "--through", "2018-04-30"])
    out["day2"] = retrain("2018-09-24", "--tolerance", "0.3", "--set", "optim.lr=1.0")
    return tmp, uri, out


def test_day0_trains_from_scratch_and_registers_version_1(days):
    _, uri, out = days
    code, s = out["day0"]
    assert code == 0 and s["decision"] == "registered" and s["incumbent"] is None
    assert s["registered"] == f"models:/{MODEL}/1" and s["new_partitions"] == ["2017-12-31"]
    assert s["champion"] is True  # the first training serves: it took @champion (day 1 moves it on)


def test_day1_warm_starts_on_the_grown_log_and_passes_the_gate(days):
    from mlflow.tracking import MlflowClient

    _, uri, out = days
    code, s = out["day1"]
    assert code == 0, s
    assert s["incumbent"] == f"models:/{MODEL}/1" and s["new_partitions"] == ["2018-04-30"]
    v = s["vocabulary"]
    assert v["kept"] > 8000 and v["added"] > 0 and v["new_items"] == v["kept"] + v["added"]
    # activeness recomputed over history + new data: more interactions than day 0 saw
    d = s["drift"]
    assert d["interactions"]["new"] > d["interactions"]["old"] and d["users"]["new"] >= d["users"]["old"]
    assert {r["slice"] for r in s["gate"]["rows"]} == {"tail", "head", "all"}
    assert all(r["incumbent"] is not None for r in s["gate"]["rows"])
    for r in s["gate"]["rows"]:  # each change comes with its paired-bootstrap interval around it
        lo, hi = r["ci95"]
        assert lo <= hi and lo - 0.02 <= r["change"] <= hi + 0.02
        # (a slice whose users both models miss entirely has the point interval [0, 0])
    assert next(r for r in s["gate"]["rows"] if r["slice"] == "all")["ci95"][0] < \
        next(r for r in s["gate"]["rows"] if r["slice"] == "all")["ci95"][1]
    assert s["decision"] == "registered" and s["registered"] == f"models:/{MODEL}/2" and s["champion"] is True
    client = MlflowClient(uri)
    mv = client.get_model_version(MODEL, "2")
    assert mv.tags["data.through"] == "2018-04-30" and mv.tags["retrain.parent"] == f"models:/{MODEL}/1"
    assert mv.tags["retrain.decision"] == "registered"
    arts = {a.path for a in client.list_artifacts(s["candidate_run"], "retrain")}
    assert {"retrain/drift.md", "retrain/drift.json", "retrain/drift.png"} <= arts
    # the candidate's own evaluation on the holdout equals what its training run reported
    run = client.get_run(s["candidate_run"])
    assert run.data.metrics["test/all/ndcg_at_10"] == pytest.approx(s["candidate"]["all/ndcg@10"], abs=1e-9)


def test_rerun_without_new_partitions_is_up_to_date(days):
    _, _, out = days
    assert out["again"] == 0


def test_day2_regression_is_registered_without_the_alias_and_version_2_stays_champion(days):
    from mlflow.tracking import MlflowClient

    _, uri, out = days
    code, s = out["day2"]
    assert code == 3 and s["decision"] == "rejected" and s["registered"] is None
    assert s["incumbent"] == f"models:/{MODEL}/2" and s["new_partitions"] == ["2018-09-24"]
    bad = [r for r in s["gate"]["rows"] if not r["ok"]]
    assert bad and all(r["change"] < -0.3 for r in bad)
    client = MlflowClient(uri)
    # registered (findable beside the champion), without @champion, and tagged with why
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'")) == [1, 2, 3]
    assert s["registered_without_alias"] == f"models:/{MODEL}/3"
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    v3 = client.get_model_version(MODEL, "3")
    assert v3.run_id == s["candidate_run"] and v3.tags["retrain.decision"] == "rejected"
    assert bad[0]["slice"] in v3.tags["retrain.rejected_because"]
    tags = client.get_run(s["candidate_run"]).data.tags
    assert tags["retrain.decision"] == "rejected" and "ndcg@10" in tags["retrain.rejected_because"]
    assert bad[0]["slice"] in tags["retrain.rejected_because"]
