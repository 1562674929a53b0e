"""What ``--smoke-test`` changes, for each training kind, in one place.

Every command's ``--smoke-test`` (train, compare, tune, retrain, twotower) goes through
``smoke_overrides``, so a kind's smoke settings cannot drift between commands again: ``tune`` on
a two-tower space once got the sequence settings (``unknown key 'stage2'``), and ``compare --kind
twotower`` once wrote its 60-user pair data into the real output folder.
"""

from __future__ import annotations

from typing import Optional

SEQUENCE = ["optim.max_epochs=2", "stage2.max_epochs=1", "model.dim=16", "model.num_blocks=1",
            "tracking.log_model=true"]
TWOTOWER = ["optim.epochs=2", "data.max_users=60", "model.dim=8", "eval.every=1"]


def smoke_overrides(kind: str, config: Optional[str], overrides: list[str]) -> list[str]:
    """``overrides`` with the kind's smoke settings before them (a user's ``--set`` still wins),
    except the two-tower pair data folder and run name: they take a ``-smoke`` suffix after
    everything, the user's folder included, so a smoke run's 60-user pairs never land where the
    same command's full run reads its data."""
    if kind == "twotower":
        from ray_pinet.twotower_config import TwoTowerConfig

        base = TwoTowerConfig.from_yaml(config, TWOTOWER + overrides)
        return TWOTOWER + overrides + [f"data.output={base.data.output}-smoke", f"run.name={base.run.name}-smoke"]
    if kind != "sequence":
        raise ValueError(f"unknown training kind {kind!r}")
    return SEQUENCE + overrides
