"""Two-tower runs on 2 real Ray Train workers end with exactly what one process computes on the
same data (methods.md §6): the item table, the user table (OneBP's rows live on their users'
ranks), the loss and every per-stratum metric of every epoch. The data is the real ML-100K file
(its first 120 users), batches small enough that users repeat inside a batch (the duplicate rule
matters) and every epoch holds several steps."""

from __future__ import annotations

import pytest
import torch

from ray_pinet.data.pairs import prepare_pairs
from ray_pinet.training.twotower_loop import TwoTowerRun, run_epochs
from ray_pinet.training.twotower_trainer import fit_twotower, load_checkpoint_state
from ray_pinet.twotower_config import TwoTowerConfig
from tests.conftest import REPO, shared_file

VARIANTS = {
    "onebp": ["model.method=onebp", "model.duplicate_rule=last_write", "model.ema_granularity=batch"],
    "bpr-auc_ns": ["model.method=bpr", "model.sampler=auc_ns", "optim.lr=0.01"],
}


def _cfg(tmp_path, name: str, extra: list[str]) -> TwoTowerConfig:
    return TwoTowerConfig.from_yaml(REPO / "configs/twotower/ml-100k-onebp.yaml", [
        f"data.source.path={shared_file('ml-100k/u.data')}", f"data.output={tmp_path / 'pairs'}",
        "data.max_users=120", "data.valid_share=0.1", "model.dim=8", "optim.batch_size=256",
        "optim.epochs=3", "eval.every=1", f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}",
        "run.progress=false", "tracking.enabled=false", "model.beta=0.9", *extra])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_workers_equal_one_process(ray_cluster, tmp_path, variant):
    single_cfg = _cfg(tmp_path, variant, VARIANTS[variant])
    path = prepare_pairs(single_cfg.data, progress=False)
    run = TwoTowerRun(single_cfg, path)
    batches_with_repeats = 0
    from ray_pinet.training.batches import epoch_batches
    for ids in epoch_batches(run.num_train, 256, single_cfg.run.seed, 0):
        users = run.rows["train"].take(ids)[1]
        batches_with_repeats += int(len(torch.unique(users)) < len(users))
    assert batches_with_repeats > 0  # the duplicate rule is exercised
    history = run_epochs(run, lambda row, r: None)
    want = run.state()

    dist_cfg = _cfg(tmp_path, variant + "-w2", VARIANTS[variant] + ["run.num_workers=2", "run.torch_threads=1"])
    res = fit_twotower(dist_cfg)
    got = load_checkpoint_state(res.checkpoint_path)
    assert got["run"]["epoch"] == 3
    torch.testing.assert_close(got["run"]["item"], want["item"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["run"]["user"], want["user"], rtol=1e-4, atol=1e-6)
    assert len(res.history) == len(history) == 3
    for a, b in zip(res.history, history):
        for key in ("train/loss", "test/all/ndcg@10", "test/tail/p@10", "test/head/ndcg@20",
                    "valid/all/ndcg@10", "test/all/ohr@10", "test/all/users", "valid/head/users"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key
    assert res.final["final/all/ndcg@10"] == pytest.approx(max(h["test/all/ndcg@10"] for h in history), rel=1e-5)
