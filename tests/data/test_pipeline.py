"""prepare() on hand-made logs: cleaning reports, leave-one-out, windows, negatives, determinism."""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow.parquet as pq
import pytest

from ray_pinet.data.pipeline import format_summary
from ray_pinet.data.prepared import load_meta
from ray_pinet.data.samples import window_bounds
from tests.data.helpers import filt, rows, run, write_csv

# Source order matters: u1 is written out of time order (C after D, F after G); u2 has a timestamp
# tie (X, Y at 10: source order keeps X first) and Z out of order; u3 is too short; u4 repeats P
# (an exact duplicate at ts 1, and again at ts 4).
LOG = [
    "u1,A,1", "u1,B,2", "u2,X,10", "u1,D,4", "u1,C,3", "u2,Y,10", "u3,H,1", "u1,E,5", "u2,Z,5",
    "u4,Q,2", "u4,P,1", "u4,P,1", "u1,G,7", "u1,F,6", "u3,I,2", "u4,R,3", "u2,W,20", "u4,P,4", "u4,S,5",
]
# item_idx by item id: A..G = 1..7, P=8, Q=9, R=10, S=11, W=12, X=13, Y=14, Z=15 (H, I leave with u3).
IDX = {c: i for i, c in enumerate("ABCDEFGPQRSWXYZ", start=1)}
# user_idx (prepared format 2): users in (crc32(id) % 2^16, id) order, computed here from the rule
# written in docs/design.md: u4 (slot 27641), u1 (40822), u2 (52940).
ORDER = sorted(["u1", "u2", "u4"], key=lambda u: (zlib.crc32(u.encode()) % 2**16, u))
UIDX = {u: i for i, u in enumerate(ORDER)}
POSITIVES = {"u1": "ABCDEFG", "u2": "XYZW", "u4": "PQRS"}


def seq(s: str) -> list[int]:
    return [IDX[c] for c in s]


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    d = tmp_path_factory.mktemp("handmade")
    return write_csv(d / "log.csv", "user_id,item_id,timestamp", LOG)


@pytest.fixture(scope="module")
def prepared(ray_cluster, log, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "p"
    res = run(log, out, samples={"max_len": 2, "train_negatives": 2}, strata={"mode": "min_count", "tau": 3})
    return out, res


def test_cleaning_report(prepared):
    out, res = prepared
    r = res.report
    assert r["source"]["rows_read"] == 19 and r["source"]["users_read"] == 4
    assert (r["out_of_order"]["rows"], r["out_of_order"]["users"]) == (5, 3)  # C, F; Z; Q's two P@1
    assert filt(r, "duplicates")["removed_rows"] == 1
    assert (filt(r, "min_history")["removed_rows"], filt(r, "min_history")["removed_users"]) == (2, 1)
    unseen = filt(r, "unseen_items")  # valid F, Y and test G, W, S never occur in training
    assert (unseen["valid_rows_unseen"], unseen["test_rows_unseen"], unseen["removed_test_rows"]) == (2, 3, 0)
    assert r["result"] == {
        "rows": 16, "users": 3, "items": 15, "train_rows": 4, "train_targets": 7, "valid_rows": 3,
        "test_rows": 3, "users_without_train_target": 0,
    }


def test_users_items_and_strata(prepared):
    out, res = prepared
    users = pq.read_table(out / "users.parquet").to_pylist()
    assert ORDER == ["u4", "u1", "u2"]
    assert users == [
        {"user_idx": 0, "user_id": "u4", "activeness": 3, "stratum": 1},
        {"user_idx": 1, "user_id": "u1", "activeness": 5, "stratum": 1},
        {"user_idx": 2, "user_id": "u2", "activeness": 2, "stratum": 0},
    ]
    items = pq.read_table(out / "items.parquet")
    assert items["item_id"].to_pylist() == list("ABCDEFGPQRSWXYZ")
    assert items["item_idx"].to_pylist() == list(range(1, 16))
    assert dict(zip(items["item_id"].to_pylist(), items["count"].to_pylist()))["P"] == 1  # u4 train: P Q R
    assert res.strata["priors"]["user_share"] == pytest.approx([1 / 3, 2 / 3])
    assert res.strata["priors"]["interaction_share"] == pytest.approx([2 / 10, 8 / 10])
    meta = load_meta(out)
    assert (meta.num_users, meta.num_items, meta.num_strata, meta.max_len) == (3, 15, 2, 2)
    assert meta.user_share == res.strata["priors"]["user_share"] and len(meta.split_files("train")) == 2


def test_leave_one_out_and_windows(prepared):
    out, _ = prepared
    train = rows(out, "train")
    # Sample ids follow user_idx: u4 [P Q R]; u1 train A B C D E, L = 2: windows end at E and C ->
    # [A B C], [C D E]; u2 [Z X].
    assert [(r["sample_id"], r["user_idx"], r["stratum"], r["seq"]) for r in train] == [
        (0, 0, 1, seq("PQR")), (1, 1, 1, seq("ABC")), (2, 1, 1, seq("CDE")), (3, 2, 0, seq("ZX")),
    ]
    valid, test = rows(out, "valid"), rows(out, "test")
    assert [(r["user_idx"], r["history"], r["target"], r["seen"]) for r in valid] == [
        (0, seq("QR"), IDX["P"], seq("PQR")),
        (1, seq("DE"), IDX["F"], seq("ABCDE")),
        (2, seq("ZX"), IDX["Y"], seq("XZ")),
    ]
    assert [(r["user_idx"], r["history"], r["target"], r["seen"]) for r in test] == [
        (0, seq("RP"), IDX["S"], seq("PQR")),
        (1, seq("EF"), IDX["G"], seq("ABCDEF")),
        (2, seq("XY"), IDX["W"], seq("XYZ")),
    ]
    assert [r["sample_id"] for r in valid] == [0, 1, 2] == [r["sample_id"] for r in test]


def test_negatives_avoid_every_positive(prepared):
    out, _ = prepared
    positives = {UIDX[u]: set(seq(items)) for u, items in POSITIVES.items()}
    for r in rows(out, "train"):
        assert len(r["neg"]) == 2 * (len(r["seq"]) - 1)
        assert not positives[r["user_idx"]] & set(r["neg"]) and all(1 <= n <= 15 for n in r["neg"])
    for split in ("valid", "test"):
        for r in rows(out, split):
            assert r["neg"] not in positives[r["user_idx"]] and 1 <= r["neg"] <= 15


def test_output_independent_of_buckets_and_window_last(ray_cluster, log, prepared, tmp_path):
    out, _ = prepared
    other = run(log, tmp_path / "b1", num_buckets=1, samples={"max_len": 2, "train_negatives": 2},
                strata={"mode": "min_count", "tau": 3})
    for split in ("train", "valid", "test"):
        assert rows(other.output, split) == rows(out, split)
    last = run(log, tmp_path / "last", samples={"max_len": 2, "train_negatives": 2, "window": "last"},
               strata={"mode": "min_count", "tau": 3})
    assert [r["seq"] for r in rows(last.output, "train")] == [seq("PQR"), seq("CDE"), seq("ZX")]
    # eval negatives do not depend on train_negatives (drawn first from the same stream)
    assert [r["neg"] for r in rows(last.output, "test")] == [r["neg"] for r in rows(out, "test")]


def test_pair_duplicates_unseen_drop_and_candidates(ray_cluster, log, tmp_path):
    res = run(log, tmp_path / "o", clean={"duplicates": "drop_pair", "unseen_items": "drop"},
              samples={"max_len": 2, "eval_candidates": 5}, strata={"mode": "quantiles", "k": 3})
    r = res.report
    assert filt(r, "duplicates")["removed_rows"] == 2  # P@1 twice -> once, P@4 (pair seen at 1)
    # u4 is now P Q R S: train P Q, valid R (unseen), test S (unseen); u1 F/G, u2 Y/W unseen too.
    unseen = filt(r, "unseen_items")
    assert (unseen["removed_valid_rows"], unseen["removed_test_rows"]) == (3, 3)
    assert (r["result"]["valid_rows"], r["result"]["test_rows"]) == (0, 0)
    assert pq.read_table(res.output / "test").num_rows == 0
    assert [s["users"] for s in res.strata["strata"]] == [1, 1, 1]


def test_candidates_exclude_positives(ray_cluster, log, tmp_path):
    res = run(log, tmp_path / "c", samples={"max_len": 2, "eval_candidates": 5},
              strata={"mode": "min_count", "tau": 3})
    positives = {UIDX[u]: set(seq(items)) for u, items in POSITIVES.items()}
    for r in rows(res.output, "test"):
        assert len(set(r["candidates"])) == 5 and not positives[r["user_idx"]] & set(r["candidates"])


def test_filters_behaviours_and_min_rating(ray_cluster, tmp_path):
    f = write_csv(tmp_path / "b.csv", "user_id,item_id,timestamp,rating,behavior", [
        "a,1,1,5,buy", "a,2,2,1,buy", "a,3,3,4,pv", "a,4,4,5,buy", "a,5,5,4,buy",
        "b,1,1,5,pv", "b,2,2,5,pv",  # b only clicks: gone with behaviors=[buy]
        "c,1,1,1,buy", "c,2,2,2,buy", "c,3,3,5,buy", "c,4,4,5,buy",  # c: two low ratings -> too short
        "d,1,1,2,buy",  # d: all rows below min_rating
        "e,1,1,5,buy", "e,2,2,5,buy", "e,3,3,5,buy",
    ])
    source = {"columns": {"rating": "rating", "behavior": "behavior"}, "behaviors": ["buy"]}
    res = run(f, tmp_path / "o", source=source,
              clean={"min_rating": 3}, strata={"q": 0.5})
    r = res.report
    assert (filt(r, "behaviors")["removed_rows"], filt(r, "behaviors")["removed_users"]) == (3, 1)
    assert (filt(r, "min_rating")["removed_rows"], filt(r, "min_rating")["removed_users"]) == (4, 1)
    assert (filt(r, "min_history")["removed_rows"], filt(r, "min_history")["removed_users"]) == (2, 1)
    assert (r["result"]["rows"], r["result"]["users"]) == (6, 2)  # a: 1 4 5, e: 1 2 3
    assert pq.read_table(res.output / "canonical").num_rows == 15  # canonical keeps every valid row
    assert pq.read_table(res.output / "users.parquet")["stratum"].to_pylist() == [0, 1]  # a=1 tie: a (after e by slot) is head
    printed = format_summary(res)
    assert "behaviors    ['buy']      removed          3 rows        1 users" in printed


def test_sample_users_keeps_whole_users_by_a_stable_hash(ray_cluster, tmp_path):
    import zlib

    users = [f"user{i}" for i in range(60)]
    lines = [f"{u},item{(7 * i + t) % 40},{t}" for i, u in enumerate(users) for t in range(1, 6)]
    f = write_csv(tmp_path / "s.csv", "user_id,item_id,timestamp", lines)
    # Different bucket counts: the sample must not depend on how users are partitioned.
    a = run(f, tmp_path / "a", clean={"sample_users": 0.3}, num_buckets=2)
    b = run(f, tmp_path / "b", clean={"sample_users": 0.3}, num_buckets=5)
    expected = sorted(u for u in users if zlib.crc32(b"sample:" + u.encode()) < 0.3 * 2**32)
    assert 5 <= len(expected) <= 35  # the hash spreads users (60 users, share 0.3)
    for res in (a, b):
        kept = sorted(pq.read_table(res.output / "users.parquet")["user_id"].to_pylist())
        assert kept == expected
        sample = filt(res.report, "sample_users")
        assert (sample["removed_users"], sample["removed_rows"]) == (60 - len(kept), 5 * (60 - len(kept)))
        assert res.report["result"]["rows"] == 5 * len(kept)  # whole users: every kept user's rows stay
    assert "sample_users 0.3          removed" in format_summary(a)
    with pytest.raises(Exception, match="sample_users must be in"):
        run(f, tmp_path / "c", clean={"sample_users": 0.0})


def test_window_bounds_cover_each_target_once():
    for a in range(0, 30):
        for L in (1, 2, 3, 7):
            user, w, start, end = window_bounds(np.array([a]), L, "all")
            targets = [t for s, e in zip(start, end) for t in range(s + 1, e + 1)]
            assert sorted(targets) == list(range(1, a)) and len(targets) == len(set(targets))
            assert all(e - s <= L for s, e in zip(start, end)) and list(w) == list(range(len(w)))


def test_generator_draws_rebuild_the_per_user_generator_stream(ray_cluster, log, prepared, tmp_path):
    """``samples.draws: generator`` (prepared data made before 2026-11-24): user u's validation and
    test negatives are the first two draws of default_rng([seed, NEGATIVES, u]) mapped onto the
    items u never touched; the default keyed draws differ but avoid positives just the same."""
    from ray_pinet.data.samples import NEGATIVES

    out, _ = prepared
    gen = run(log, tmp_path / "gen", samples={"max_len": 2, "train_negatives": 2, "draws": "generator"},
              strata={"mode": "min_count", "tau": 3})
    positives = {UIDX[u]: set(seq(items)) for u, items in POSITIVES.items()}
    for split, k in (("valid", 0), ("test", 1)):
        for r in rows(gen.output, split):
            free = [i for i in range(1, 16) if i not in positives[r["user_idx"]]]
            draw = np.random.default_rng([0, NEGATIVES, r["user_idx"]]).random(2)[k]
            assert r["neg"] == free[int(draw * len(free))]
    assert [r["seq"] for r in rows(gen.output, "train")] == [r["seq"] for r in rows(out, "train")]
    assert [r["neg"] for r in rows(gen.output, "train")] != [r["neg"] for r in rows(out, "train")]
