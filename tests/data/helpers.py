"""Small helpers for the data tests: write hand-made logs, run prepare, read outputs."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from ray_pinet.config_base import from_dict
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.pipeline import prepare


def write_csv(path: Path, header: str | None, rows: list[str]) -> Path:
    lines = ([header] if header else []) + rows
    path.write_text("\n".join(lines) + "\n")
    return path


def run(path: Path, out: Path, **sections) -> object:
    """prepare() on a generic CSV (user_id,item_id,timestamp[,rating,behavior]) with overrides."""
    cfg = {"source": {"format": "csv", "path": str(path)}, "output": str(out), "num_buckets": 2}
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return prepare(from_dict(PrepareConfig, cfg), progress=False)


def rows(out: Path, split: str) -> list[dict]:
    return sorted(pq.read_table(out / split).to_pylist(), key=lambda r: r["sample_id"])


def filt(report: dict, name: str) -> dict:
    return next(f for f in report["filters"] if f["filter"] == name)
