"""Two-tower runs on 2 workers end with exactly what one process computes on the same data
(methods.md §6): the item table, the user table (OneBP's rows live on their users' ranks), the
loss and every per-stratum metric of every epoch. The data is the real ML-100K file (its first
120 users), batches small enough that users repeat inside a batch (the duplicate rule matters) and
every epoch holds several steps.

OneBP and TwoBP run through the product path (``ray-pinet compare --kind twotower`` ->
``fit``: 2 Ray Train workers, gloo). The other variants run the same loop on 2 plain gloo
processes (``torch.multiprocessing``): the same collectives without Ray Train's ~20 s start-up
per fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ray_pinet.data.pairs import prepare_pairs
from ray_pinet.training.twotower_loop import TwoTowerRun, run_epochs
from ray_pinet.training.checkpoint import load_state
from ray_pinet.twotower_config import TwoTowerConfig
from tests.conftest import REPO, shared_file

VARIANTS = {
    "onebp": ["model.method=onebp", "model.duplicate_rule=last_write", "model.ema_granularity=batch"],
    "onebp-epoch-mean": ["model.method=onebp", "model.duplicate_rule=mean", "model.ema_granularity=epoch"],
    "twobp": ["model.method=twobp"],
    "bpr-auc_ns": ["model.method=bpr", "model.sampler=auc_ns", "optim.lr=0.01"],
    # Inverse Learning's data: labeled rows; T-CE truncates over the gathered global batch
    "ncf-gmf-tce": ["model.method=ncf", "data.label_threshold=2", "model.loss=tce", "model.tce_num_gradual=20",
                    "optim.lr=0.01"],
    "ncf-neumf-idl": ["model.method=ncf", "data.label_threshold=2", "model.backbone=neumf", "model.loss=idl",
                      "optim.lr=0.01"],
    # IG: all-reduced ∇IDL before the sign, the three-way choice from all-reduced losses
    "ncf-ig-as_coded": ["model.method=ncf", "data.label_threshold=2", "model.loss=ig", "model.ig_mode=as_coded"],
    "ncf-ig-clean": ["model.method=ncf", "data.label_threshold=2", "model.loss=ig", "model.ig_mode=clean"],
}
NCF_KEYS = ("train/loss", "test/all/auc", "test/tail/wauc", "test/head/ndcg@10", "valid/all/bce", "test/all/users")
KEYS = ("train/loss", "test/all/ndcg@10", "test/tail/p@10", "test/head/ndcg@20", "valid/all/ndcg@10",
        "test/all/ohr@10", "test/all/users", "valid/head/users")


def _cfg(tmp_path, name: str, extra: list[str]) -> TwoTowerConfig:
    return TwoTowerConfig.from_yaml(REPO / "configs/twotower/ml-100k-onebp.yaml", [
        f"data.source.path={shared_file('ml-100k/u.data')}", f"data.output={tmp_path / 'pairs'}",
        "data.max_users=120", "data.valid_share=0.1", "model.dim=8", "optim.batch_size=256",
        "optim.max_epochs=3", "eval.every=1", f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}",
        "run.progress=false", "tracking.enabled=false", "model.beta=0.9", *extra])


def _single(tmp_path, variant, extra=()):
    """The one-process run: its config, data path, history and final state."""
    single_cfg = _cfg(tmp_path, variant, VARIANTS[variant] + list(extra))
    path = Path(single_cfg.data.output)
    if not (path / "meta.json").exists():  # variants share the prepared data
        prepare_pairs(single_cfg.data, progress=False)
    run = TwoTowerRun(single_cfg, path)
    batches_with_repeats = 0
    from ray_pinet.training.batches import epoch_batches
    for ids in epoch_batches(run.num_train, 256, single_cfg.run.seed, 0):
        users = run.rows["train"].take(ids)[1]
        batches_with_repeats += int(len(torch.unique(users)) < len(users))
    assert batches_with_repeats > 0  # the duplicate rule is exercised
    history = run_epochs(run, lambda row, r: None)
    return single_cfg, path, history, run.state()


def _assert_same(got_state, got_history, want_state, want_history):
    if "model" in want_state:  # ncf: every parameter
        for name, value in want_state["model"].items():
            torch.testing.assert_close(got_state["model"][name], value, rtol=1e-4, atol=1e-6)
    else:
        torch.testing.assert_close(got_state["item"], want_state["item"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_state["user"], want_state["user"], rtol=1e-4, atol=1e-6)
    assert len(got_history) == len(want_history) == 3
    for a, b in zip(got_history, want_history):
        for key in NCF_KEYS if "model" in want_state else KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key


def test_compare_grid_on_two_ray_train_workers_equals_one_process(ray_cluster, tmp_path):
    """``ray-pinet compare --kind twotower`` (the product path: Ray Train, 2 workers, MLflow) with
    OneBP against its TwoBP reference: each cell's final tables and per-epoch metrics equal a
    one-process run of the same config, and the report measures OneBP against TwoBP."""
    import json

    from tests.conftest import run_cli_in_repo

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [f"data.source.path={shared_file('ml-100k/u.data')}", f"data.output={tmp_path / 'pairs'}",
            "data.max_users=120", "data.valid_share=0.1", "model.dim=8", "optim.batch_size=256",
            "optim.max_epochs=3", "eval.every=1", f"run.storage_path={tmp_path / 'runs'}", "run.progress=false",
            "model.beta=0.9", "run.num_workers=2", "run.torch_threads=1", f"tracking.tracking_uri={uri}"]
    argv = ["compare", "--kind", "twotower", "--config", str(REPO / "configs/twotower/ml-100k-onebp.yaml"),
            "--methods", "onebp", "--seeds", "0", "--name", "tt", "--output", str(tmp_path / "report")]
    for x in sets:
        argv += ["--set", x]
    assert run_cli_in_repo(argv) == 0
    cells = [json.loads(line) for line in (tmp_path / "report" / "cells.jsonl").read_text().splitlines()]
    assert [c["label"] for c in cells] == ["twobp", "onebp"]
    for cell in cells:
        variant = cell["label"]
        _, _, history, want = _single(tmp_path / f"single-{variant}", variant, ["run.seed=0"])
        got = load_state(cell["checkpoint"])
        assert got["run"]["epoch"] == 3
        _assert_same(got["run"], got["history"], want, history)
        assert cell["final"]["test/all/ndcg@10"] == pytest.approx(max(h["test/all/ndcg@10"] for h in history))
    report = (tmp_path / "report" / "report.md").read_text()
    assert "Change against twobp (NDCG@10, OHR@10)" in report and "| onebp | mf | 1 |" in report
    # rerunning the command finds both cells done and trains nothing
    assert run_cli_in_repo(argv) == 0
    assert len((tmp_path / "report" / "cells.jsonl").read_text().splitlines()) == 2


def _gloo_rank(rank: int, world: int, jobs: list[tuple[dict, str, str]], init: str) -> None:
    """Every (config, data path, output file) of ``jobs`` in turn, on one process group."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for cfg_dict, path, out in jobs:
            run = TwoTowerRun(TwoTowerConfig.from_dict(cfg_dict), path, rank, world)
            history = run_epochs(run, lambda row, r: None)
            state = run.state()  # collective
            if rank == 0:
                torch.save({"state": state, "history": history}, out)
    finally:
        dist.destroy_process_group()


# onebp and twobp run on Ray Train above
GLOO_VARIANTS = ["ncf-ig-as_coded", "ncf-ig-clean", "ncf-gmf-tce", "ncf-neumf-idl", "onebp-epoch-mean", "bpr-auc_ns"]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """One pair of processes (spawned once) runs every other variant in turn."""
    import torch.multiprocessing as mp

    singles, jobs = {}, []
    for v in GLOO_VARIANTS:
        data = tmp_path / ("pairs-labeled" if v.startswith("ncf") else "pairs")
        cfg, path, history, state = _single(tmp_path / v, v, [f"data.output={data}"])
        singles[v] = (history, state)
        jobs.append((cfg.to_dict(), str(path), str(tmp_path / f"{v}.pt")))
    mp.spawn(_gloo_rank, args=(2, jobs, f"file://{tmp_path / 'pg'}"), nprocs=2)
    for v in GLOO_VARIANTS:
        got = torch.load(tmp_path / f"{v}.pt", weights_only=False)
        _assert_same(got["state"], got["history"], singles[v][1], singles[v][0])
