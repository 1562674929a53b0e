"""What each two-tower method (``model.method``) needs of its data and sampler: one torch-free table that
``twotower_config`` checks at load and the method objects of ``methods/twotower_methods.py`` answer from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class TwoTowerNeeds:
    labeled: bool = False  # trains on labeled rows (data.label_threshold) and is evaluated pointwise
    negatives: Optional[int] = None  # sampled items per training row (None: model.num_negatives)
    auc_ns: bool = False  # takes model.sampler=auc_ns: one hard negative per positive, for its BPR loss


NEEDS: dict[str, TwoTowerNeeds] = {
    "onebp": TwoTowerNeeds(),
    "twobp": TwoTowerNeeds(),
    "bpr": TwoTowerNeeds(negatives=1, auc_ns=True),
    "ncf": TwoTowerNeeds(labeled=True, negatives=1),
}
