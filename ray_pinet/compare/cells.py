"""A compare grid's cells and their results, as ``<output>/cells.jsonl`` holds them (what the
grid writes and the report reads)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Cell:
    label: str  # row name in the report: a method, or a variant "pinet-uniform"
    method: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class CellResult:
    label: str
    backbone: str
    seed: int
    method: str
    final: dict
    run_id: Optional[str]
    checkpoint: Optional[str]
    overrides: list[str]
    # The cell's resolved config: a rerun skips the cell only when it would build the same one
    # (None: recorded by a ray-pinet that did not keep it; then not checked, and said so).
    config: Optional[dict] = None


def load_done(path: Path) -> dict[tuple, CellResult]:
    if not path.exists():
        return {}
    results = [CellResult(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return {(r.label, r.backbone, r.seed): r for r in results}
