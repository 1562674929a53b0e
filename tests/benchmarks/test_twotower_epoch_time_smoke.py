"""benchmarks/twotower_epoch_time.py at its ``--smoke`` size: every method is timed each round and
the table holds the ratio to TwoBP."""

from __future__ import annotations

import importlib.util
import json
import sys

from tests.conftest import REPO, shared_file


def test_twotower_epoch_time_smoke(tmp_path):
    data = shared_file("ml-100k/u.data")
    spec = importlib.util.spec_from_file_location("twotower_epoch_time", REPO / "benchmarks" / "twotower_epoch_time.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    rows = module.main(["--smoke", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
                        "--set", f"data.source.path={data}"])
    assert [r["method"] for r in rows] == ["onebp", "twobp", "bpr"]
    assert all(r["rounds"] == 2 and r["median_s"] > 0 for r in rows)
    assert next(r for r in rows if r["method"] == "twobp")["vs_twobp"] == 1.0
    saved = json.loads((tmp_path / "out" / "twotower_epoch_time.json").read_text())
    assert len(saved["seconds"]["onebp"]) == 2
