"""Declarative search spaces (``tune_spaces/*.yaml``): parsed, validated and turned into Ray Tune domains.

A space file::

    method: pinet
    objective: {slice: tail, metric: ndcg, measure: lift, guard_tolerance: 0.005}
    search: {algorithm: random, num_samples: 12, max_concurrent: 1, seed: 0}
    scheduler: {kind: asha, grace_period: 2, reduction_factor: 2}
    fixed:                      # applied to every trial and to the reference joint run
      optim.max_epochs: 10
    space:
      prepare.strata.q: {uniform: [0.05, 0.4]}
      stage2.plugin.adapter_hidden: {choice: [[32], [64], [128]]}
      ga.prior: {choice: [interaction_share, user_share]}

Keys are dotted train-config keys (``optim.lr``) or ``prepare.`` + a prepare-config key under ``strata`` /
``samples`` (a trial with its own stratification gets a restratified view of the base data, one with its own
history length its own prepared copy; ``sequence_sweep.ensure_trial_data``). ``model.max_len`` also sets
``prepare.samples.max_len`` (they must agree). Clean/source keys are refused: they would change which users
are evaluated, and trials are only comparable on the same users. ``sweep.load_space`` resolves the ends of
every domain into a full config, so a typo or an out-of-range bound fails before any trial starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from ray_pinet.config_base import ConfigError, from_dict, load_yaml

DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
PREPARE_SECTIONS = ("strata", "samples")


@dataclass
class ObjectiveSpec:
    """What a trial is scored by (on validation only; docs/design.md "Tuning").

    slice: the stratum to improve (tail = stratum 0, or s0..s{K-1}); metric at eval.k.
    measure: ``lift`` = relative change against the reference joint model *on the same users*
    (why: ``objective.py``); ``absolute`` = the metric itself.
    guard_tolerance: every other stratum must keep at least reference x (1 - tolerance) of the
    same metric; a trial that breaks it is infeasible: reported, never chosen.
    """

    slice: str = "tail"
    metric: Literal["ndcg", "hr", "auc", "gauc"] = "ndcg"
    measure: Literal["lift", "absolute"] = "lift"
    guard_tolerance: float = 0.005

    def validate(self) -> None:
        if not 0.0 <= self.guard_tolerance < 1.0:
            raise ConfigError(f"guard_tolerance must be in [0, 1), got {self.guard_tolerance}")


@dataclass
class SearchSpec:
    algorithm: Literal["random", "grid", "optuna", "hyperopt"] = "random"
    # Trials to sample (random/optuna/hyperopt); with grid domains, repeats of the whole grid.
    num_samples: int = 8
    # Trials at once; 0 = as many as the cluster's CPUs fit. 1 on a small machine: a trial's
    # workers already use every core.
    max_concurrent: int = 1
    seed: int = 0

    def validate(self) -> None:
        if self.num_samples < 1 or self.max_concurrent < 0:
            raise ConfigError("num_samples must be >= 1 and max_concurrent >= 0")


@dataclass
class SchedulerSpec:
    """ASHA on the objective, one iteration per validation report (one per epoch)."""

    kind: Literal["asha", "none"] = "asha"
    grace_period: int = 2
    reduction_factor: int = 2

    def validate(self) -> None:
        if self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("grace_period must be >= 1 and reduction_factor >= 2")


@dataclass
class TrialSpec:
    num_workers: int = 1
    cpus_per_worker: float = 1.0


@dataclass
class TuneSpace:
    # joint/pinet/reweight: `ray-pinet train` methods; onebp/twobp/bpr/ncf: two-tower methods
    # (tuning/twotower_sweep.py: absolute validation objective, no reference, no registry)
    method: Literal["joint", "pinet", "reweight", "onebp", "twobp", "bpr", "ncf"] = "pinet"
    objective: ObjectiveSpec = field(default_factory=ObjectiveSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    trial: TrialSpec = field(default_factory=TrialSpec)
    fixed: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.space:
            raise ConfigError("space: at least one key to search over")
        for key, dom in self.space.items():
            _check_domain(key, dom)
        if self.search.algorithm == "grid" and any(_kind(d) not in ("grid", None) for d in self.space.values()):
            raise ConfigError("search.algorithm grid: every space entry must be {grid: [...]} or a constant")


def _kind(dom: Any) -> Optional[str]:
    if isinstance(dom, dict) and len(dom) == 1 and next(iter(dom)) in DOMAINS:
        return next(iter(dom))
    return None  # a constant


def _check_domain(key: str, dom: Any) -> None:
    kind = _kind(dom)
    if isinstance(dom, dict) and kind is None:
        raise ConfigError(f"space.{key}: {dom!r} is not a domain; use one of "
                          f"{', '.join('{' + d + ': ...}' for d in DOMAINS)} or a constant")
    if kind is None:
        return
    args = dom[kind]
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"space.{key}: {kind} needs a non-empty list, got {args!r}")
        return
    n = 3 if kind == "quniform" else 2
    if not isinstance(args, list) or len(args) != n or not all(isinstance(a, (int, float)) for a in args):
        raise ConfigError(f"space.{key}: {kind} needs [low, high{', q' if n == 3 else ''}], got {args!r}")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise ConfigError(f"space.{key}: {kind} needs low < high, got {args!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"space.{key}: loguniform needs low > 0, got {args!r}")


def extreme_values(dom: Any) -> list[Any]:
    """Values a domain can produce at its ends (what load-time validation resolves)."""
    kind = _kind(dom)
    if kind is None:
        return [dom]
    args = dom[kind]
    if kind in ("choice", "grid"):
        return list(args)
    if kind == "randint":  # Ray's randint excludes the upper bound
        return [int(args[0]), int(args[1]) - 1]
    return [args[0], args[1]]


def _structured(dom: Any) -> bool:
    """A choice/grid over lists or mappings (e.g. adapter widths [[32], [64]]). Tune reads list
    values of ``points_to_evaluate`` as nested specs, so such values travel as JSON strings."""
    kind = _kind(dom)
    return kind in ("choice", "grid") and any(isinstance(v, (list, dict)) for v in dom[kind])


def encode_value(dom: Any, value: Any) -> Any:
    return json.dumps(value) if _structured(dom) else value


def decode_values(space: "TuneSpace", values: dict[str, Any]) -> dict[str, Any]:
    """Trial values as the config expects them (JSON-encoded structured choices decoded)."""
    return {k: json.loads(v) if _structured(space.space.get(k)) and isinstance(v, str) else v
            for k, v in values.items()}


def to_tune_domain(dom: Any):
    from ray import tune

    kind = _kind(dom)
    if kind is None:
        return dom
    args = dom[kind]
    if _structured(dom):
        args = [json.dumps(v) for v in args]
    if kind in ("choice", "grid"):
        return (tune.choice if kind == "choice" else tune.grid_search)(args)
    if kind == "randint":
        return tune.randint(int(args[0]), int(args[1]))
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "quniform": tune.quniform}[kind](*args)


def param_space(space: TuneSpace) -> dict[str, Any]:
    """Ray Tune's param_space: one flat entry per dotted key (Tune would otherwise nest them)."""
    return {key: to_tune_domain(dom) for key, dom in space.space.items()}


def split_overrides(values: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Trial values -> (train-config overrides, prepare-config overrides), both ``key=value``."""
    train, prep = [], []
    for key, value in values.items():
        text = json.dumps(value)
        if key.startswith("prepare."):
            prep.append(f"{key[len('prepare.'):]}={text}")
        else:
            train.append(f"{key}={text}")
            if key == "model.max_len":
                prep.append(f"samples.max_len={text}")
    return train, prep


def parse_space(path: str | Path) -> TuneSpace:
    """A space file as a validated ``TuneSpace`` (its keys are checked against the base config
    by the kind's sweep: ``sweep.load_space``)."""
    try:
        return from_dict(TuneSpace, load_yaml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
