"""Every benchmark script runs at its ``--smoke`` size, so the scripts cannot rot.

Structure and correctness only, never timings (the suite runs on busy 2-core boxes): the result
files exist with their columns, pandas and ray-pinet prepare agree count for count and value for
value, GA's all-reduce gives DDP's gradient, the throughput table has the plain loop and a Ray
Train row with its time split. Each script runs as a subprocess: it starts (and stops) its own
processes and Ray instance, beside the suite's.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_smoke(script: str, tmp_path: Path, *extra: str) -> tuple[list[dict], dict]:
    """Run ``benchmarks/<script>.py --smoke``; return (the CSV rows, the JSON result)."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--smoke", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out / f"{script}.csv") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((out / f"{script}.json").read_text())


def test_data_pipeline_smoke_pandas_and_ray_pinet_agree(tmp_path):
    rows, result = run_smoke("data_pipeline", tmp_path, "--work-dir", str(tmp_path / "work"))
    assert list(rows[0]) == result["columns"]
    assert [r["impl"] for r in rows] == ["pandas", "ray-pinet"]
    assert all(r["status"] == "ok" for r in rows), rows
    full = result["rows"]
    assert all(r["counts_match"] is True and r["content_match"] is True for r in full), full
    counts = full[0]["counts"]
    assert counts["rows_read"] == 20_000 and counts["users"] > 0
    assert sum(counts["strata_users"]) == counts["users"]
    assert counts["train_targets"] > counts["train_rows"] > 0
    for r in full:  # memory of the whole tree was sampled, Ray's workers included
        assert r["peak_total_mib"] >= r["peak_driver_mib"] > 0
    assert full[1]["processes"] > 1 and full[1]["phases_s"].keys() >= {"ingest", "clean", "samples"}


def test_allreduce_smoke_ga_equals_ddp(tmp_path):
    rows, result = run_smoke("allreduce", tmp_path)
    assert list(rows[0]) == result["columns"]
    (row,) = result["rows"]
    assert abs(row["params"] - 100_000) <= 64  # one embedding row of width 64
    assert row["grads_equal"] is True and row["grad_max_rel_err"] < 1e-5
    assert row["ga_step_ms"] > 0 and row["ddp_step_ms"] > 0 and row["ratio_ga_ddp"] > 0


@pytest.mark.slow
def test_train_throughput_smoke_plain_and_ray_train(tmp_path):
    rows, result = run_smoke("train_throughput", tmp_path, "--work-dir", str(tmp_path / "work"))
    assert list(rows[0]) == result["columns"]
    plain, packed, ray_row = result["rows"]
    assert (plain["impl"], packed["impl"], ray_row["impl"], ray_row["method"], ray_row["workers"]) == (
        "plain-padded", "plain-packed", "ray-train", "joint", 1)
    for r in (plain, packed, ray_row):
        assert r["positions_per_s"] > 0 and r["step_ms"] > 0
        assert all(f"{p}_ms" in r for p in ("data", "forward", "backward", "allreduce", "optimizer"))
    assert ray_row["vs_plain"] > 0 and ray_row["forward_ms"] > 0 and ray_row["backward_ms"] > 0


def test_train_ingest_smoke_ranks_read_their_blocks(tmp_path):
    """benchmarks/train_ingest.py: 2 ranks read, build and batch their own blocks, which tile the
    training set (the script checks the sum, this checks the per-rank record)."""
    out = tmp_path / "ingest.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_ingest.py"), "--smoke-test", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ranks = result["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["train_samples"] == 300
    assert [r["local_samples"] for r in ranks] == [150, 150]
    assert all(r["local_positions"] > 0 and r["peak_rss_mib"] > 0 and r["data_s"] > 0 for r in ranks)

