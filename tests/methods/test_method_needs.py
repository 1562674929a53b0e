"""The method tables of both kinds: each method's needs stated once (methods/needs.py), the two-tower
method objects, every list of method names derived from the Literal that types the config field, and
no method-name comparison anywhere else in the package."""

from __future__ import annotations

import ast
import typing
from pathlib import Path

from ray_pinet.config import METHODS as SEQUENCE_METHODS
from ray_pinet.config import TrainConfig
from ray_pinet.kinds.sequence import SEQUENCE
from ray_pinet.methods.ga import method_prior
from ray_pinet.methods.needs import SEQUENCE_NEEDS
from ray_pinet.methods.twotower_methods import METHODS
from ray_pinet.twotower_config import TWOTOWER_METHODS, TwoTowerConfig, TwoTowerModel


def test_method_lists_are_the_literals_of_the_config_fields():
    assert typing.get_args(typing.get_type_hints(TwoTowerModel)["method"]) == TWOTOWER_METHODS
    assert typing.get_args(typing.get_type_hints(TrainConfig)["method"]) == SEQUENCE_METHODS
    assert {n for n, m in SEQUENCE_NEEDS.items() if m.per_stratum} < set(SEQUENCE_METHODS) == set(SEQUENCE_NEEDS)
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


def test_each_sequence_method_runs_as_its_needs_say():
    def cfg(method: str, **sets) -> TrainConfig:
        return TrainConfig.from_dict({"method": method, **sets})

    assert [m for m in SEQUENCE_METHODS if cfg(m).uses_plugins] == ["pinet"]
    assert not cfg("pinet", stage2={"enabled": False}).uses_plugins
    assert [m for m in SEQUENCE_METHODS if SEQUENCE.multi_run(cfg(m)) is not None] == ["separate", "finetune"]
    assert [m for m in SEQUENCE_METHODS if not cfg(m, model={"backbone": "sasrec"}).packed] == ["transfer"]
    priors = {m: method_prior(cfg(m, ga={"prior": "user_share"}), [0.8, 0.2], [0.3, 0.7]).kind
              for m in SEQUENCE_METHODS}
    assert priors == {"joint": "interaction_share", "pinet": "user_share", "separate": "interaction_share",
                      "finetune": "interaction_share", "reweight": "reweight", "transfer": "interaction_share"}


def _names_compared(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines comparing a method field with a method name (``cfg.method == "pinet"``,
    ``method in ("bpr", "ncf")``); prior kinds such as "reweight" compared with a prior are not."""
    def strings(node: ast.AST) -> set:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*map(strings, node.elts)) if node.elts else set()
        return set()

    def is_method(node: ast.AST) -> bool:
        return any((isinstance(n, ast.Attribute) and n.attr == "method")
                   or (isinstance(n, ast.Name) and n.id == "method") for n in ast.walk(node))

    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Compare):
            sides = (n.left, *n.comparators)
            if any(strings(s) & names for s in sides) and any(is_method(s) for s in sides):
                found.append(n.lineno)
    return found


def test_no_module_compares_method_names_outside_the_tables():
    names = set(SEQUENCE_METHODS) | set(TWOTOWER_METHODS)
    package = Path(__file__).resolve().parents[2] / "ray_pinet"
    found = {str(p.relative_to(package)): lines for p in sorted(package.rglob("*.py"))
             if (lines := _names_compared(ast.parse(p.read_text()), names))}
    assert found == {}, found
    for code in ('if cfg.method == "pinet": pass', 'ok = self.method in ("bpr", "ncf")', 'x = method != "joint"'):
        assert _names_compared(ast.parse(code), names) == [1], code
