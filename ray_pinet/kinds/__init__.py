"""The training kinds, registered once: each module here fills in one ``training.kind.Kind``.

``sequence`` (``ray-pinet train``): PINet and its baselines on leave-one-out sequences; ``twotower``
(``ray-pinet twotower``): OneBP, TwoBP, MF-BPR and NCF on pair data. The shell (``training/trainer.py``,
``training/worker.py``, the CLI, ``compare``, ``tune``) looks a kind up here by name, by method, or by config
class, and knows nothing else of it. A third kind is one new module and one entry in ``KINDS``.
"""

from __future__ import annotations

from typing import Any

from ray_pinet.config_base import ConfigError
from ray_pinet.kinds.sequence import SEQUENCE
from ray_pinet.kinds.twotower import TWOTOWER
from ray_pinet.training.kind import Kind

KINDS: dict[str, Kind] = {k.name: k for k in (SEQUENCE, TWOTOWER)}


def kind_named(name: str) -> Kind:
    if name not in KINDS:
        raise ConfigError(f"unknown training kind {name!r}: one of {sorted(KINDS)}")
    return KINDS[name]


def kind_of(cfg: Any) -> Kind:
    for kind in KINDS.values():
        if isinstance(cfg, kind.config_class):
            return kind
    raise TypeError(f"{type(cfg).__name__} is not the config of a training kind")


def kind_of_method(method: str) -> Kind:
    for kind in KINDS.values():
        if method in kind.methods:
            return kind
    raise ConfigError(f"unknown method {method!r}: " + "; ".join(f"{k.name}: {list(k.methods)}"
                                                            for k in KINDS.values()))
