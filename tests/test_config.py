"""Config validation: unknown keys and bad values stop with the dotted key; overrides parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_pinet.cli import main
from ray_pinet.config import TrainConfig
from ray_pinet.config_base import ConfigError


def test_defaults_round_trip():
    cfg = TrainConfig()
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_unknown_key_names_the_dotted_path():
    with pytest.raises(ConfigError, match=r"'optim.bogus'.*valid keys: batch_size"):
        TrainConfig.from_yaml(None, ["optim.bogus=1"])
    with pytest.raises(ConfigError, match="'nope'"):
        TrainConfig.from_dict({"nope": 1})


@pytest.mark.parametrize("override,match", [
    ("ga.prior=median", "ga.prior"),
    ("optim.batch_size=abc", "optim.batch_size"),
    ("run.num_workers=0", "num_workers"),
    ("method=ensemble", "method"),
    ("transfer.trajectories=0", "trajectories"),
    ("data.train_strata=[]", "train_strata"),
])
def test_bad_values_are_rejected(override, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_yaml(None, [override])


def test_din_needs_candidates_and_bce():
    with pytest.raises(ConfigError, match="din"):
        TrainConfig.from_yaml(None, ["model.backbone=din"])
    cfg = TrainConfig.from_yaml(None, ["model.backbone=din", "loss=bce", "eval.candidates=100"])
    assert cfg.model.backbone == "din"


def test_sampled_softmax_is_refused_with_din_and_transfer():
    din = ["model.backbone=din", "eval.candidates=100", "loss=sampled_softmax"]
    with pytest.raises(ConfigError, match=r"loss=sampled_softmax .*din .*use loss: bce") as err:
        TrainConfig.from_yaml(None, din)
    assert err.value.key == "loss"
    with pytest.raises(ConfigError, match=r"loss=sampled_softmax: transfer") as err:
        TrainConfig.from_yaml(None, ["method=transfer", "loss=sampled_softmax"])
    assert err.value.key == "loss"
    cfg = TrainConfig.from_yaml(None, ["loss=sampled_softmax", "sampled.num_negatives=4096",
                                       "sampled.proposal=uniform", "sampled.in_batch=true"])
    assert (cfg.sampled.num_negatives, cfg.sampled.proposal, cfg.sampled.in_batch) == (4096, "uniform", True)


@pytest.mark.parametrize("override,message", [
    ("sampled.num_negatives=0", "sampled.num_negatives must be >= 1, got 0"),
    ("sampled.beta=-0.5", "sampled.beta must be a finite number >= 0, got -0.5"),
    ("sampled.beta=inf", "sampled.beta: must be a finite number"),
    ("sampled.proposal=zipf", "sampled.proposal: 'zipf' is not one of"),
])
def test_sampled_softmax_settings_are_validated(override, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(None, ["loss=sampled_softmax", override])
    assert message in str(err.value)


def test_overrides_are_typed_yaml():
    cfg = TrainConfig.from_yaml(None, ["optim.lr=5e-4", "stage2.freeze_backbone=false", "ga.alpha=-0.5"])
    assert cfg.optim.lr == 5e-4 and cfg.stage2.freeze_backbone is False and cfg.ga.alpha == -0.5


def test_cli_reports_config_errors_with_exit_code_2(capsys):
    assert main(["train", "--set", "optim.bogus=1", "--print-config"]) == 2
    assert "optim.bogus" in capsys.readouterr().err


def test_init_from_is_for_pinet_only_and_stage1_equivalence():
    with pytest.raises(ConfigError, match="init_from"):
        TrainConfig.from_dict({"method": "joint", "run": {"init_from": "runs/x"}})
    assert TrainConfig.from_dict({"ga": {"prior": "power", "alpha": 0.0}}).stage1_is_joint
    assert TrainConfig.from_dict({"ga": {"prior": "interaction_share"}}).stage1_is_joint
    assert not TrainConfig.from_dict({"ga": {"prior": "power", "alpha": 0.5}}).stage1_is_joint
    assert not TrainConfig.from_dict({"ga": {"prior": "user_share"}}).stage1_is_joint


def test_checkpoint_paths_become_absolute_for_the_workers(tmp_path, monkeypatch):
    """Ray Train workers do not run in the driver's working directory: a relative run.init_from
    (checked by the driver) once failed on the workers with FileNotFoundError."""
    from ray_pinet.training.run_inputs import absolute_checkpoint_paths

    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig.from_dict({"method": "pinet", "run": {"init_from": "runs/x/checkpoint_1"}})
    out = absolute_checkpoint_paths(cfg)
    assert out.run.init_from == str(tmp_path / "runs/x/checkpoint_1") and out.run.warm_start is None
    assert cfg.run.init_from == "runs/x/checkpoint_1"  # the caller's config is left alone
    warm = TrainConfig.from_dict({"method": "finetune", "run": {"warm_start": "~/ckpt"}})
    assert absolute_checkpoint_paths(warm).run.warm_start == str(Path("~/ckpt").expanduser())
    plain = TrainConfig.from_dict({})
    assert absolute_checkpoint_paths(plain) is plain
