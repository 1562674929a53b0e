"""``run_epochs``' early stop (``eval.patience`` through ``EarlyStopping``) and its state rebuilt
from the history on resume, on a scripted run (no data, no model)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from ray_pinet.config_base import ConfigError
from ray_pinet.methods.twotower_methods import METHODS
from ray_pinet.training.twotower_loop import run_epochs
from ray_pinet.twotower_config import TwoTowerConfig


class ScriptedRun:
    """What ``run_epochs`` reads of a ``TwoTowerRun``; epoch e validates at ``scores[e]``."""

    def __init__(self, cfg: TwoTowerConfig, scores: list[float], epoch: int = 0) -> None:
        self.cfg, self.scores, self.epoch, self.rank = cfg, scores, epoch, 0
        self.device, self.method = torch.device("cpu"), METHODS[cfg.model.method]
        self.rows = {"valid": SimpleNamespace(sample_id=torch.arange(3))}

    def train_epoch(self) -> dict[str, float]:
        self.epoch += 1
        return {"train/loss": 0.0, "train/seconds": 0.0}

    def evaluate(self, split: str) -> dict[str, float]:
        return {f"{split}/all/ndcg@10": self.scores[self.epoch - 1], f"{split}/all/p@10": 0.0}


def _cfg(patience: int) -> TwoTowerConfig:
    return TwoTowerConfig.from_dict({"data": {"valid_share": 0.1}, "optim": {"max_epochs": 10},
                                     "eval": {"patience": patience}})


@pytest.mark.parametrize("patience, scores, epochs", [
    (2, [0.1, 0.3, 0.2, 0.3, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], 4),  # a tie is no improvement
    (2, [0.1, 0.3, 0.2, 0.4, 0.3, 0.1, 0.9, 0.9, 0.9, 0.9], 6),  # a new best resets the count
    (2, [math.nan, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], 4),  # NaN is no improvement
    (0, [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0], 10),  # 0: never stops
])
def test_patience_stops_after_that_many_evaluations_without_a_strictly_better_one(patience, scores, epochs):
    lines: list[str] = []
    history = run_epochs(ScriptedRun(_cfg(patience), scores), lambda row, run: None, say=lines.append)
    assert len(history) == epochs and len(lines) == epochs and "P@10 0.0000" in lines[0]
    # resumed after any epoch, the rebuilt state stops at the same epoch
    for done in range(1, epochs):
        resumed = run_epochs(ScriptedRun(_cfg(patience), scores, done), lambda row, run: None,
                             history=history[:done])
        assert [h["epoch"] for h in resumed] == [h["epoch"] for h in history]


@pytest.mark.parametrize("old, new", [("epochs", "max_epochs"), ("l2", "weight_decay")])
def test_renamed_optim_keys_name_their_new_name(old, new):
    with pytest.raises(ConfigError, match=rf"optim\.{old} was renamed to optim\.{new}") as exc:
        TwoTowerConfig.from_yaml(None, [f"optim.{old}=3"])
    assert exc.value.key == f"optim.{old}"
