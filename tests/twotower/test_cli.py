"""``ray-pinet twotower`` argument handling without training: the resolved config, the smoke-test
overrides and a config error's exit code."""

from __future__ import annotations

import json

from ray_pinet.cli import main
from tests.conftest import REPO

CONFIG = str(REPO / "configs/twotower/ml-100k-onebp.yaml")


def test_print_config_resolves_every_value(capsys):
    assert main(["twotower", "--config", CONFIG, "--set", "optim.max_epochs=7", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["method"] == "onebp" and cfg["optim"]["max_epochs"] == 7
    assert cfg["model"]["duplicate_rule"] == "last_write" and cfg["model"]["ema_granularity"] == "batch"
    assert cfg["run"]["seed"] == 2022 and cfg["data"]["test_share"] == 0.2


def test_smoke_test_is_small_and_writes_beside_the_real_data(capsys):
    assert main(["twotower", "--config", CONFIG, "--smoke-test", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["optim"]["max_epochs"] == 2 and cfg["data"]["max_users"] == 60
    assert cfg["data"]["output"] == "prepared/ml-100k-pairs-smoke"


def test_config_error_exits_2_and_names_the_key(capsys):
    assert main(["twotower", "--config", CONFIG, "--set", "model.sampler=auc_ns"]) == 2
    assert "model.method=bpr" in capsys.readouterr().err
