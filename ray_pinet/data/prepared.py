"""Reading a prepared directory (docs/design.md contract): the small metadata the trainer needs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ray_pinet.errors import DataError

SPLITS = ("train", "valid", "test")


@dataclass
class PreparedMeta:
    path: Path
    num_users: int
    num_items: int  # item_idx runs 1..num_items; 0 is padding
    num_strata: int
    strata: dict[str, Any]  # strata.json
    user_share: list[float]  # prior pi_s = |U_s| / |U|
    interaction_share: list[float]  # prior pi_s = training events of s / all training events
    max_len: int
    train_negatives: int
    eval_candidates: int
    config: dict[str, Any] = field(repr=False)  # prepare_config.json

    def split_files(self, split: str) -> list[str]:
        """The Parquet parts of ``train``, ``valid`` or ``test``, sorted."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return sorted(str(p) for p in (self.path / split).glob("part-*.parquet"))


def load_meta(path: str | Path) -> PreparedMeta:
    """Metadata of a prepared directory; DataError naming the file when a part is missing."""
    root = Path(path)
    needed = ["strata.json", "prepare_config.json", "users.parquet", "items.parquet", *SPLITS]
    for name in needed:
        if not (root / name).exists():
            raise DataError("not a prepared directory (run `ray-pinet prepare`)", file=str(root / name))
    strata = json.loads((root / "strata.json").read_text())
    config = json.loads((root / "prepare_config.json").read_text())
    samples = config["samples"]
    return PreparedMeta(
        path=root,
        num_users=pq.read_metadata(root / "users.parquet").num_rows,
        num_items=pq.read_metadata(root / "items.parquet").num_rows,
        num_strata=strata["num_strata"],
        strata=strata,
        user_share=strata["priors"]["user_share"],
        interaction_share=strata["priors"]["interaction_share"],
        max_len=samples["max_len"],
        train_negatives=samples["train_negatives"],
        eval_candidates=samples["eval_candidates"],
        config=config,
    )
