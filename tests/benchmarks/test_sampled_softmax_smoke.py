"""benchmarks/sampled_softmax.py at its ``--smoke`` size: full softmax and sampled softmax (with
and without in-batch negatives, dense and row-sparse item exchange) each train their fixed steps
through run_epoch, and the table holds positions/s and the ratio to full softmax; then one row-sparse
run on 2 spawned gloo ranks. Structure only, never timings."""

from __future__ import annotations

from tests.benchmarks.test_benchmarks_smoke import run_smoke


def test_sampled_softmax_smoke(tmp_path):
    rows, result = run_smoke("sampled_softmax", tmp_path, "--in-batch", "--exchange", "dense", "rows")
    assert list(rows[0]) == result["columns"]
    full = result["rows"]
    assert [(r["loss"], r["negatives"], r["in_batch"], r["exchange"]) for r in full] == [
        ("ce", None, None, "dense"), ("sampled_softmax", 64, False, "dense"), ("sampled_softmax", 64, True, "dense"),
        ("sampled_softmax", 64, False, "rows"), ("sampled_softmax", 64, True, "rows")]
    # the same windows for every loss; every run trained its steps
    assert len({r["positions"] for r in full}) == 1 and full[0]["positions"] > 0
    assert all(r["steps"] == 2 and r["positions_per_s"] > 0 and r["backward_ms"] > 0 for r in full)
    assert full[0]["vs_ce"] == 1.0 and all(r["vs_ce"] > 0 for r in full)
    assert (tmp_path / "out" / "sampled_softmax.md").read_text().count("| sampled_softmax |") == 4


def test_sampled_softmax_smoke_row_exchange_on_two_gloo_ranks(tmp_path):
    _, result = run_smoke("sampled_softmax", tmp_path, "--no-ce", "--exchange", "rows", "--workers", "2")
    (row,) = result["rows"]
    assert (row["exchange"], row["workers"], row["steps"]) == ("rows", 2, 2)
    assert row["positions"] > 0 and row["allreduce_ms"] > 0
