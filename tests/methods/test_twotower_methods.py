"""The two-tower method registry and the method lists: one named object per method with its
needs, and every list of method names derived from the Literal that types the config field."""

from __future__ import annotations

import typing

from ray_pinet.config import METHODS as SEQUENCE_METHODS
from ray_pinet.config import PER_STRATUM_METHODS, TrainConfig
from ray_pinet.methods.twotower_methods import METHODS
from ray_pinet.twotower_config import TWOTOWER_METHODS, TwoTowerConfig, TwoTowerModel


def test_method_lists_are_the_literals_of_the_config_fields():
    assert typing.get_args(typing.get_type_hints(TwoTowerModel)["method"]) == TWOTOWER_METHODS
    assert typing.get_args(typing.get_type_hints(TrainConfig)["method"]) == SEQUENCE_METHODS
    assert set(PER_STRATUM_METHODS) < set(SEQUENCE_METHODS)
    assert tuple(METHODS) == TWOTOWER_METHODS and all(METHODS[n].name == n for n in METHODS)


def test_each_method_states_its_needs():
    m = TwoTowerConfig.from_dict({"model": {"num_negatives": 7, "dim": 4}}).model
    negatives = {n: METHODS[n].negatives or m.num_negatives for n in METHODS}
    assert negatives == {"onebp": 7, "twobp": 7, "bpr": 1, "ncf": 1}
    assert [n for n in METHODS if METHODS[n].labeled] == ["ncf"]
    assert {n: METHODS[n].second_metric for n in METHODS} == {"onebp": "p@10", "twobp": "p@10", "bpr": "p@10",
                                                              "ncf": "auc"}
    # OneBP's user tower is written by the moving aggregation, never by the optimizer
    trainable = {n: {k for k, p in METHODS[n].model(5, 6, m).named_parameters() if p.requires_grad}
                 for n in ("onebp", "twobp")}
    assert "user.weight" in trainable["twobp"] and "user.weight" not in trainable["onebp"]
