"""The compare report's statistics and files, on hand-made cell results (no training)."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from ray_pinet.compare.grid import CellResult, build_cells, parse_variant
from ray_pinet.compare.report import paired_p, summary, long_table, write_report
from ray_pinet.kinds.sequence import CHANGE_METRICS, METRICS
from ray_pinet.config_base import ConfigError


def cell(label, seed, tail, head):
    final = {}
    for s, v in (("tail", tail), ("head", head), ("all", (4 * tail + head) / 5)):
        final.update({f"test/{s}/ndcg@10": v, f"test/{s}/hr@10": 2 * v, f"test/{s}/auc": 0.5 + v,
                      f"test/{s}/gauc": 0.5 + v, f"test/{s}/users": 10.0})
    return CellResult(label, "sasrec", seed, label, final, None, None, [])


RESULTS = [cell("joint", s, t, h) for s, t, h in ((0, .050, .070), (1, .052, .071), (2, .049, .069))] + \
          [cell("pinet", s, t, h) for s, t, h in ((0, .055, .070), (1, .058, .072), (2, .054, .069))]


def test_summary_means_changes_and_paired_t_test():
    summ = summary(long_table(RESULTS, METRICS)).set_index(["label", "slice", "metric"])
    row = summ.loc[("pinet", "tail", "ndcg@10")]
    assert row["mean"] == pytest.approx((.055 + .058 + .054) / 3)
    assert row["std"] == pytest.approx(stats.tstd([.055, .058, .054]))
    joint_mean = (.050 + .052 + .049) / 3
    assert row["change"] == pytest.approx(row["mean"] / joint_mean - 1)
    assert row["p"] == pytest.approx(stats.ttest_rel([.055, .058, .054], [.050, .052, .049]).pvalue)
    assert row["p"] < 0.05
    assert math.isnan(summ.loc[("joint", "tail", "ndcg@10")]["p"])
    assert math.isnan(paired_p([1.0], [0.5]))  # one seed: no test
    assert math.isnan(paired_p([1.0, 2.0], [0.5, 1.5]))  # constant difference: t undefined


def test_write_report_files(tmp_path):
    files = write_report(RESULTS, tmp_path, "demo", "ray-pinet compare --demo", metrics=METRICS,
                         change_metrics=CHANGE_METRICS)
    md = files["report.md"].read_text()
    assert "| pinet | sasrec | 3 |" in md
    assert f"{100 * (.167 / .151 - 1):+.1f}%*" in md  # tail ndcg change of pinet, significant
    assert "<table" in files["report.html"].read_text()
    assert files["ndcg.png"].stat().st_size > 1000
    assert len(files["results.csv"].read_text().splitlines()) == 1 + 6 * 3 * 4


def test_variants_and_cells():
    c = parse_variant("pinet-uniform=pinet:ga.prior=uniform,stage2.enabled=false")
    assert (c.label, c.method, c.overrides) == ("pinet-uniform", "pinet", ["ga.prior=uniform", "stage2.enabled=false"])
    cells = build_cells(["pinet", "separate"], ["p2=pinet:ga.alpha=0.5"])
    assert [x.label for x in cells] == ["joint", "pinet", "separate", "p2"]
    with pytest.raises(ConfigError, match="method"):
        parse_variant("x=nope:a=b")
    with pytest.raises(ConfigError, match="duplicate"):
        build_cells(["pinet"], ["pinet=pinet:ga.alpha=1"])


def test_stage1_rows_only_where_stage1_is_not_joint():
    from ray_pinet.compare.report import with_stage1_rows

    joint = cell("joint", 0, .05, .07)
    same = cell("pinet", 0, .06, .07)
    same.final.update({"stage1_" + k: v for k, v in joint.final.items()})
    other = cell("pinet-us", 0, .06, .07)
    other.final.update({"stage1_" + k: v * 0.9 for k, v in joint.final.items()})
    rows = with_stage1_rows([joint, same, other])
    assert [r.label for r in rows] == ["joint", "pinet", "pinet-us", "pinet-us/no-plugins"]
    assert rows[-1].final["test/tail/ndcg@10"] == pytest.approx(.045)


def test_change_uses_only_the_seeds_both_cells_have():
    """A grid still running has fewer seeds for later cells: the change must be paired."""
    partial = [r for r in RESULTS if not (r.label == "pinet" and r.seed == 2)]
    summ = summary(long_table(partial, METRICS)).set_index(["label", "slice", "metric"])
    row = summ.loc[("pinet", "tail", "ndcg@10")]
    assert row["change"] == pytest.approx(((.055 + .058) / 2) / ((.050 + .052) / 2) - 1)
    assert row["n"] == 2


def test_a_grid_extended_by_a_second_command_reports_both(tmp_path):
    first = "ray-pinet compare --methods joint pinet --seeds 0 1 2"
    second = "ray-pinet compare --methods joint separate --seeds 0 1 2"
    files = write_report(RESULTS, tmp_path, "grid", first + "\n" + second, metrics=METRICS,
                         change_metrics=CHANGE_METRICS)
    md = files["report.md"].read_text()
    assert f"`{first}`" in md and f"`{second}`" in md
    assert files["report.html"].read_text().count("<code>") == 2


def test_twotower_report_is_measured_against_its_reference(tmp_path):
    rows = [CellResult(lab, "mf", s, lab, {"test/all/ndcg@10": v, "test/all/ohr@10": 0.6, "test/all/p@10": v,
                                           "test/all/r@10": v, "test/all/users": 9.0}, None, None, [])
            for lab, vals in (("twobp", (.40, .41)), ("onebp", (.42, .44))) for s, v in enumerate(vals)]
    from ray_pinet.kinds.twotower import CHANGE_METRICS as TWOTOWER_CHANGE_METRICS, METRICS as TWOTOWER_METRICS

    md = write_report(rows, tmp_path, "tt", "cmd", reference="twobp", metrics=TWOTOWER_METRICS,
                      change_metrics=TWOTOWER_CHANGE_METRICS)["report.md"].read_text()
    assert "Change against twobp (NDCG@10, OHR@10)" in md
    assert "| onebp | mf | +" in md and "against `twobp`" in md
