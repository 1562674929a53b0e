"""benchmarks/reference_aucns.py at its ``--smoke`` size (60 users of ML-100K, 2 epochs), in-process:
both samplers run, the JSON has every metric at every cut-off, and the split is the documented one."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_file

REPO = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("reference_aucns", REPO / "benchmarks" / "reference_aucns.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("sampler,valid", [("auc_ns", "0"), ("rns", "0.1")])
def test_reference_aucns_smoke(tmp_path, sampler, valid):
    data = shared_file("ml-100k/u.data")
    script = load_script()
    out = tmp_path / "result.json"
    script.main(["--smoke", "--sampler", sampler, "--valid-share", valid, "--data", str(data), "--json", str(out)])
    result = json.loads(out.read_text())
    assert len(result["history"]) == 2
    rows = result["data"]["rows"]
    assert rows["test"] == round(0.2 * sum(rows.values()))  # 20 % of the rows, exactly
    assert (rows["valid"] > 0) == (valid != "0")
    expected = {"test_best", "last"} | ({"valid"} if valid != "0" else set())
    assert set(result["selections"]) == expected
    for sel in result["selections"].values():
        for m in ("p", "r", "f1", "ndcg", "ohr", "ocr", "uhr", "ucr"):
            for k in (5, 10, 20):
                assert 0.0 <= sel[f"{m}@{k}"] <= 1.0 and not math.isnan(sel[f"{m}@{k}"])
    assert result["published"]["ndcg@10"] == {"rns": 0.3698, "auc_ns": 0.4295}[sampler]


def test_split_is_seeded_and_per_row():
    data = shared_file("ml-100k/u.data")
    script = load_script()
    a = script.load_split(data, 0.2, 0.1, 2022, 60)
    b = script.load_split(data, 0.2, 0.1, 2022, 60)
    c = script.load_split(data, 0.2, 0.1, 7, 60)
    for name in ("train", "valid", "test"):
        assert all(x.equal(y) for x, y in zip(a.parts[name], b.parts[name]))
    assert not a.parts["test"][1].equal(c.parts["test"][1])
    pairs = [set(zip(*(t.tolist() for t in a.parts[n]))) for n in ("train", "valid", "test")]
    assert not (pairs[0] & pairs[1]) and not (pairs[0] & pairs[2]) and not (pairs[1] & pairs[2])
