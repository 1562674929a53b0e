"""What each method of each kind needs, as torch-free tables: the configs check them at load and the
training code asks them, so no other module compares method names. The two-tower method objects
(``methods/twotower_methods.py``) answer from ``TWOTOWER_NEEDS``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass(frozen=True)
class SequenceNeeds:
    # Stage 1's loss prior (methods/ga.py::method_prior): "pooled" = the pooled mean over units (joint
    # training), "ga" = the config's ga.prior (PINet), "reweight" = the pooled mean with static weights.
    prior: Literal["pooled", "ga", "reweight"] = "pooled"
    plugins: bool = False  # stage 2: one plugin per stratum (stage2.enabled switches it off)
    adversarial: bool = False  # Yin et al.: the stratum discriminator and its own task loop (transfer_epoch)
    per_stratum: bool = False  # K joint runs, each on one stratum's rows (training/per_stratum.py)
    from_joint: bool = False  # each stratum's run fine-tunes a joint run's checkpoint


SEQUENCE_NEEDS: dict[str, SequenceNeeds] = {
    "joint": SequenceNeeds(),
    "pinet": SequenceNeeds(prior="ga", plugins=True),
    "separate": SequenceNeeds(per_stratum=True),
    "finetune": SequenceNeeds(per_stratum=True, from_joint=True),
    "reweight": SequenceNeeds(prior="reweight"),
    "transfer": SequenceNeeds(adversarial=True),
}


@dataclass(frozen=True)
class TwoTowerNeeds:
    labeled: bool = False  # trains on labeled rows (data.label_threshold) and is evaluated pointwise
    negatives: Optional[int] = None  # sampled items per training row (None: model.num_negatives)
    auc_ns: bool = False  # takes model.sampler=auc_ns: one hard negative per positive, for its BPR loss


TWOTOWER_NEEDS: dict[str, TwoTowerNeeds] = {
    "onebp": TwoTowerNeeds(),
    "twobp": TwoTowerNeeds(),
    "bpr": TwoTowerNeeds(negatives=1, auc_ns=True),
    "ncf": TwoTowerNeeds(labeled=True, negatives=1),
}
