"""The served model (issue 22 items 1 and 4): the exported scoring graph equals eager scoring,
and the MLflow pyfunc on raw ids answers what in-process scoring gives, in this process and from
``mlflow models serve`` in a fresh virtualenv that holds no ray-pinet."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ray_pinet.config import TrainConfig
from ray_pinet.config_base import apply_overrides, from_dict, load_yaml
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.pipeline import prepare
from ray_pinet.data.prepared import read_split
from ray_pinet.local_ray import free_local_port
from ray_pinet.models.ensemble import StratumEnsemble
from ray_pinet.models.registry import build_model
from ray_pinet.serving import ScoringModule, export_scoring, serving_users, static_routing
from ray_pinet.training.batches import EvalRows
from tests.conftest import DEV_PREPARE, REPO, stop_process, wait_for_http

L = 50


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("serving") / "prepared"
    over = [f"source.path={REPO / 'data/ml-latest-small/ratings.csv'}", f"output={out}"]
    prepare(from_dict(PrepareConfig, apply_overrides(load_yaml(DEV_PREPARE), over)), progress=False)
    return out


def _model(backbone: str, num_items: int, plugins: bool = True, seed: int = 0):
    """A model whose plugins are far from the identity, so routing matters (untrained weights:
    the check is that two graphs compute one function, whatever the weights)."""
    cfg = TrainConfig.from_dict({"model": {"backbone": backbone, "dim": 16, "num_blocks": 1, "max_len": L,
                                           "dropout": 0.0},
                                 "stage2": {"plugin": {"adapter_hidden": [8], "item_bias": True}}})
    torch.manual_seed(seed)
    m = build_model(cfg.model, num_items, 2, cfg.stage2.plugin if plugins else None)
    with torch.no_grad():
        for p in m.plugin_parameters():
            p.normal_(0, 0.3)
    m.use_plugins = plugins
    return m.eval()


def _num_items(path: Path) -> int:
    return pq.read_metadata(path / "items.parquet").num_rows


def _inputs(path: Path) -> torch.Tensor:
    """Every test user's scoring input: stratum, then the history, plus rows of unknown users."""
    rows = EvalRows(read_split(path, "test"), L)
    x = torch.cat([rows.stratum.unsqueeze(1), rows.history], 1)
    unknown = x[:7].clone()
    unknown[:, 0] = -1
    return torch.cat([x, unknown])


@pytest.mark.parametrize("kind", ["sasrec", "gru4rec", "ensemble"])
def test_exported_graph_equals_eager_scoring_for_every_test_user(prepared, kind):
    m = _num_items(prepared)
    model = (StratumEnsemble([_model("sasrec", m, plugins=False, seed=s) for s in range(2)])
             if kind == "ensemble" else _model(kind, m))
    module = ScoringModule(model, unseen_stratum=0).eval()
    x = _inputs(prepared)
    with torch.no_grad():
        eager = module(x)
    program = export_scoring(module, L).module()
    static_routing(model, False)  # eager again: the data-dependent route of training
    with torch.no_grad():
        again = module(x)
    got = program(x)
    assert torch.equal(eager, again)
    assert got.shape == eager.shape == (len(x), m + 1)
    assert torch.isneginf(got[:, 0]).all()
    diff = (got[:, 1:] - eager[:, 1:]).abs().max().item()
    assert diff <= 1e-5, diff
    # routing matters here, so the check has teeth: stratum 0 and 1 score a row differently
    flipped = x.clone()
    flipped[:, 0] = 1 - flipped[:, 0].clamp(min=0)
    assert (program(flipped)[:, 1:] - got[:, 1:]).abs().max().item() > 1e-3


def _expected(prepared: Path, module: ScoringModule, requests: pd.DataFrame, k: int) -> list[dict]:
    """Top-k raw ids by eager scoring and the documented rules, written independently of
    served_model.py: stored history and seen items for known users, request items as history."""
    users = serving_users(prepared, L).to_pandas().set_index("user_id")
    items = pq.read_table(prepared / "items.parquet").to_pandas()
    idx_of = dict(zip(items["item_id"].astype(str), items["item_idx"]))
    id_of = dict(zip(items["item_idx"], items["item_id"].astype(str)))
    out = []
    for uid, raw in zip(requests["user_id"], requests["items"]):
        known = uid is not None and uid in users.index
        stratum, hist, skip = -1, [], set()
        if known:
            stratum, hist, skip = int(users.loc[uid, "stratum"]), list(users.loc[uid, "history"]), set(users.loc[uid, "seen"])
        unknown = 0
        if raw:
            hist = [idx_of[i] for i in raw if i in idx_of]
            unknown = sum(i not in idx_of for i in raw)
            skip |= set(hist)
        x = torch.zeros((1, 1 + L), dtype=torch.int64)
        x[0, 0] = stratum
        hist = hist[-L:]
        if hist:
            x[0, 1 + L - len(hist):] = torch.tensor(hist)
        static_routing(module.model, False)
        with torch.no_grad():
            s = module(x)[0]
        for i in skip:
            s[i] = -torch.inf
        top = torch.topk(s, k)
        out.append({"user_id": uid, "known_user": known, "unknown_items": unknown,
                    "item_ids": [id_of[int(i)] for i in top.indices], "scores": top.values.tolist()})
    return out


def _requests(prepared: Path) -> pd.DataFrame:
    users = pq.read_table(prepared / "users.parquet").column("user_id").to_pylist()
    items = pq.read_table(prepared / "items.parquet").column("item_id").to_pylist()
    return pd.DataFrame({
        "user_id": [users[0], users[-1], users[3], "no-such-user", None],
        "items": [None, [], [items[5], items[7], "no-such-item"], [items[1], items[2]], [items[9]]],
    })


def _same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        missing = lambda v: v is None or (isinstance(v, float) and np.isnan(v))  # noqa: E731
        assert (missing(g["user_id"]) and missing(w["user_id"])) or g["user_id"] == w["user_id"], (g, w)
        assert g["known_user"] == w["known_user"], (g, w)
        assert g["unknown_items"] == w["unknown_items"], (g, w)
        assert list(g["item_ids"]) == w["item_ids"], (g["item_ids"], w["item_ids"])
        np.testing.assert_allclose(g["scores"], w["scores"], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def registered(prepared, tmp_path_factory):
    """A served model logged and registered in a SQLite store: (tracking uri, module)."""
    import mlflow

    from ray_pinet.serving import log_served_pyfunc

    tmp = tmp_path_factory.mktemp("served-mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.set_experiment("serving")
    module = ScoringModule(_model("sasrec", _num_items(prepared)), unseen_stratum=0).eval()
    with mlflow.start_run(experiment_id=exp.experiment_id) as run:
        pass
    log_served_pyfunc(uri, run.info.run_id, module, L, prepared, registered_model_name="served-raw")
    return uri, module


def test_pyfunc_on_raw_ids_answers_as_in_process_scoring(prepared, registered):
    import mlflow.pyfunc

    uri, module = registered
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/served-raw/1")
    requests = _requests(prepared)
    got = served.predict(requests, params={"k": 7}).to_dict("records")
    _same(got, _expected(prepared, module, requests, 7))
    assert [g["known_user"] for g in got] == [True, True, True, False, False]
    assert got[2]["unknown_items"] == 1
    default = served.predict(requests.iloc[:1])
    assert len(default["item_ids"][0]) == 10  # model_config k
    # nothing of ray_pinet is pickled into the model: it is code plus plain artifacts
    local = Path(mlflow.artifacts.download_artifacts("models:/served-raw/1"))
    assert not list(local.rglob("*.pkl")) and (local / "served_model.py").exists()


@pytest.fixture(scope="session")
def fresh_env(tmp_path_factory):
    """A virtualenv with torch, mlflow and their dependencies only (no ray-pinet, no Ray), built
    once per test run (~1 minute from the pip cache). ``RAY_PINET_SERVE_VENV`` reuses one."""
    import mlflow

    given = os.environ.get("RAY_PINET_SERVE_VENV")
    if given:
        return Path(given)
    env = tmp_path_factory.mktemp("fresh-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pins = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
            f"pandas=={pd.__version__}", f"pyarrow=={pa.__version__}", f"numpy=={np.__version__}"]
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", *pins], check=True,
                   capture_output=True, text=True, timeout=1200)
    return env


def test_mlflow_models_serve_in_a_fresh_env_answers_raw_id_requests(prepared, registered, fresh_env, tmp_path):
    uri, module = registered
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run([str(fresh_env / "bin" / "python"), "-c", "import ray_pinet"], capture_output=True,
                           cwd=tmp_path, env=env)
    assert probe.returncode != 0  # the serving env really has no ray-pinet (nor Ray)
    port = free_local_port(0)
    env.update(MLFLOW_TRACKING_URI=uri, PATH=f"{fresh_env / 'bin'}:{env.get('PATH', '')}")
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [str(fresh_env / "bin" / "mlflow"), "models", "serve", "-m", "models:/served-raw/1", "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, tmp_path / "serve.log", 180, "mlflow models serve")
        requests = _requests(prepared)
        body = {"dataframe_records": [{"user_id": u, "items": i} for u, i in zip(requests["user_id"], requests["items"])],
                "params": {"k": 5}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())["predictions"]
        _same(answer, _expected(prepared, module, requests, 5))
    finally:
        stop_process(server)
        log.close()
    shutil.rmtree(tmp_path / "mlruns", ignore_errors=True)


def test_recommend_scores_every_user_as_evaluation_ranks(prepared, registered, tmp_path):
    """`ray-pinet recommend` (Ray Data + Scorer actors on the exported graph): every user with a
    history gets the top-k of eager scoring with evaluation's masking (padding and seen items)."""
    from ray_pinet.evaluation.protocol import mask_seen_
    from ray_pinet.recommend import RecommendOptions, recommend

    uri, module = registered
    summary = recommend(RecommendOptions(model_uri="models:/served-raw/1", output=str(tmp_path / "recs"), k=10,
                                         batch_size=100, actors=2, tracking_uri=uri), progress=False)
    users = serving_users(prepared, L).to_pandas()
    with_history = users[users["history"].map(len) > 0]
    assert summary["users_scored"] == len(with_history) and summary["users"] == len(users)
    assert summary["users_skipped"]["no history"] == len(users) - len(with_history)
    got = pq.read_table(tmp_path / "recs").to_pandas().set_index("user_id")
    assert len(got) == len(with_history) and json.loads((tmp_path / "recs" / "_summary.json").read_text())
    items = pq.read_table(prepared / "items.parquet").to_pandas()
    id_of = dict(zip(items["item_idx"], items["item_id"].astype(str)))
    x = torch.zeros((len(with_history), 1 + L), dtype=torch.int64)
    x[:, 0] = torch.from_numpy(with_history["stratum"].to_numpy().astype(np.int64))
    for r, h in enumerate(with_history["history"]):
        x[r, 1 + L - len(h):] = torch.tensor(list(h))
    rows = torch.repeat_interleave(torch.arange(len(with_history)),
                                   torch.tensor(with_history["seen"].map(len).to_numpy()))
    seen = torch.from_numpy(np.concatenate(with_history["seen"].to_numpy()).astype(np.int64))
    static_routing(module.model, False)
    with torch.no_grad():
        top = torch.topk(mask_seen_(module(x), rows, seen), 10)
    for r, uid in enumerate(with_history["user_id"]):
        assert list(got.loc[uid, "item_ids"]) == [id_of[int(i)] for i in top.indices[r]], uid
        np.testing.assert_allclose(got.loc[uid, "scores"], top.values[r].numpy(), rtol=0, atol=1e-5)


def test_recommend_for_another_prepared_folder_maps_items_by_raw_id(prepared, registered, tmp_path):
    """`recommend --data`: the users of other data (half of the users instead of the model's
    quarter: other item indices, and items the model never saw), their histories mapped to the
    model's vocabulary by raw item id, unknown items dropped and counted."""
    from ray_pinet.evaluation.protocol import mask_seen_
    from ray_pinet.recommend import RecommendOptions, recommend

    uri, module = registered
    other = tmp_path / "other"
    over = [f"source.path={REPO / 'data/ml-latest-small/ratings.csv'}", f"output={other}", "clean.sample_users=0.5"]
    prepare(from_dict(PrepareConfig, apply_overrides(load_yaml(DEV_PREPARE), over)), progress=False)
    ours = pq.read_table(prepared / "items.parquet").to_pandas()
    theirs = pq.read_table(other / "items.parquet").to_pandas()
    summary = recommend(RecommendOptions(model_uri="models:/served-raw/1", output=str(tmp_path / "recs"),
                                         data=str(other), k=5, batch_size=64, tracking_uri=uri), progress=False)
    raw_of = dict(zip(theirs["item_idx"], theirs["item_id"].astype(str)))
    idx = dict(zip(ours["item_id"].astype(str), ours["item_idx"]))
    id_of = {v: k for k, v in idx.items()}
    users = serving_users(other, L).to_pandas()
    mapped = [[idx[raw_of[i]] for i in h if raw_of[i] in idx] for h in users["history"]]
    unknown = sum(len(h) for h in users["history"]) - sum(len(h) for h in mapped)
    assert unknown > 0 and summary["history_items_unknown_to_the_model"] == unknown
    assert summary["users_scored"] == sum(len(h) > 0 for h in mapped)
    assert summary["users_skipped"]["no history"] == sum(len(h) == 0 for h in mapped)
    got = pq.read_table(tmp_path / "recs").to_pandas().set_index("user_id")
    static_routing(module.model, False)
    checked = 0
    for r, u in users.iterrows():
        hist = mapped[r]
        if not hist or checked == 40:
            continue
        checked += 1
        x = torch.zeros((1, 1 + L), dtype=torch.int64)
        x[0, 0] = int(u["stratum"])
        x[0, 1 + L - len(hist):] = torch.tensor(hist)
        seen = torch.tensor([idx[raw_of[i]] for i in u["seen"] if raw_of[i] in idx])
        with torch.no_grad():
            top = torch.topk(mask_seen_(module(x), torch.zeros_like(seen), seen), 5)
        assert list(got.loc[u["user_id"], "item_ids"]) == [id_of[int(i)] for i in top.indices[0]]
    assert checked == 40
