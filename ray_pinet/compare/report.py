"""The compare report: mean ± std over seeds, change against ``joint``, paired tests, a plot.

Statistics. For each cell, slice and metric the seeds' test values give mean ± sample std. The change against
joint is the relative difference of the means. Significance is a paired two-sided t-test over seeds (cell and
joint share the seed, hence the data order and the initialisation), scipy's ``ttest_rel``; with fewer than 2
paired seeds, or identical values, p is reported as "-". 3 seeds give 2 degrees of freedom: only large,
consistent changes reach p < 0.05.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ray_pinet.compare.cells import CellResult
from ray_pinet.outputs import write_file


def slices_of(results: Sequence[CellResult]) -> list[str]:
    names = [k.split("/")[1] for k in results[0].final if k.startswith("test/") and k.endswith("/users")]
    return [n for n in names if n != "all"] + ["all"]


def long_table(results: Sequence[CellResult], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per (label, backbone, seed, slice, metric) with the test value."""
    rows = []
    for r in results:
        for s in slices_of(results):
            for m in metrics:
                v = r.final.get(f"test/{s}/{m}")
                if v is not None:
                    rows.append({"label": r.label, "backbone": r.backbone, "seed": r.seed,
                                 "slice": s, "metric": m, "value": float(v)})
    return pd.DataFrame(rows)


def paired_p(a: Sequence[float], b: Sequence[float]) -> float:
    if len(a) < 2 or len(a) != len(b):
        return math.nan
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if np.allclose(d, d[0]) and d.std() == 0:  # constant difference: t undefined
        return math.nan
    import warnings

    from scipy.stats import ttest_rel

    with warnings.catch_warnings():  # near-identical differences: scipy warns, p is still defined
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_rel(a, b).pvalue)


def summary(df: pd.DataFrame, reference: str = "joint") -> pd.DataFrame:
    """One row per (label, backbone, slice, metric): mean, std, n, change vs reference, p."""
    out = []
    for (label, backbone, sl, metric), g in df.groupby(["label", "backbone", "slice", "metric"], sort=False):
        ref = df[(df.label == reference) & (df.backbone == backbone) & (df.slice == sl) & (df.metric == metric)]
        paired = g.merge(ref[["seed", "value"]], on="seed", suffixes=("", "_ref"))
        # the change is measured on the seeds both have (a grid still running has fewer)
        mean = g.value.mean()
        ref_mean = paired.value_ref.mean() if len(paired) else math.nan
        paired_mean = paired.value.mean() if len(paired) else math.nan
        out.append({
            "label": label, "backbone": backbone, "slice": sl, "metric": metric,
            "mean": mean, "std": g.value.std(ddof=1) if len(g) > 1 else math.nan, "n": len(g),
            "change": (paired_mean - ref_mean) / ref_mean if ref_mean else math.nan,
            "p": math.nan if label == reference else paired_p(paired.value.tolist(), paired.value_ref.tolist()),
        })
    return pd.DataFrame(out)


def markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("-" if (isinstance(v, float) and math.isnan(v)) else str(v) for v in row) + " |")
    return "\n".join(lines)


def _fmt_ms(mean: float, std: float) -> str:
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _fmt_change(change: float, p: float) -> str:
    if math.isnan(change):
        return "-"
    star = "*" if not math.isnan(p) and p < 0.05 else ""
    return f"{100 * change:+.1f}%{star}" + ("" if math.isnan(p) else f" (p={p:.3f})")


def tables(summ: pd.DataFrame, slices: Sequence[str], labels: Sequence[str], metrics: Sequence[str],
           change_metrics: Sequence[str]) -> dict[str, pd.DataFrame]:
    """``absolute``: mean ± std per slice/metric; ``change``: relative change vs the reference and p."""
    absolute, change = [], []
    for backbone in summ.backbone.unique():
        for label in labels:
            sub = summ[(summ.label == label) & (summ.backbone == backbone)]
            if sub.empty:
                continue
            a = {"method": label, "backbone": backbone, "seeds": int(sub.n.max())}
            c = {"method": label, "backbone": backbone}
            for sl in slices:
                for m in metrics:
                    row = sub[(sub.slice == sl) & (sub.metric == m)]
                    if row.empty:
                        continue
                    row = row.iloc[0]
                    a[f"{sl} {m}"] = _fmt_ms(row["mean"], row["std"])
                    if m in change_metrics:
                        c[f"{sl} {m}"] = _fmt_change(row["change"], row["p"])
            absolute.append(a)
            change.append(c)
    return {"absolute": pd.DataFrame(absolute), "change": pd.DataFrame(change)}


def plot(summ: pd.DataFrame, slices: Sequence[str], labels: Sequence[str], path, metric: str = "ndcg@10") -> None:
    """The bar chart, saved to ``path`` (a file name or a binary file object)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones = list(summ.backbone.unique())
    fig, axes = plt.subplots(1, len(backbones), figsize=(1.6 + 1.4 * len(labels) * len(slices) / 2, 3.6),
                             squeeze=False)
    width = 0.8 / max(len(labels), 1)
    for ax, backbone in zip(axes[0], backbones):
        for i, label in enumerate(labels):
            sub = summ[(summ.label == label) & (summ.backbone == backbone) & (summ.metric == metric)]
            means = [float(sub[sub.slice == s]["mean"].iloc[0]) if (sub.slice == s).any() else 0.0 for s in slices]
            stds = [float(np.nan_to_num(sub[sub.slice == s]["std"].iloc[0])) if (sub.slice == s).any() else 0.0
                    for s in slices]
            ax.bar(np.arange(len(slices)) + i * width - 0.4 + width / 2, means, width, yerr=stds, capsize=2,
                   label=label)
        ax.set_xticks(np.arange(len(slices)), slices)
        ax.set_ylabel(f"test {metric}")
        ax.set_title(backbone)
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120, format="png")
    finally:
        plt.close(fig)


def with_stage1_rows(results: Sequence[CellResult]) -> list[CellResult]:
    """Add a "<label>/no-plugins" row for every pinet cell whose stage-1 backbone (its
    ``stage1_test/*`` scores, plugins bypassed) is not joint's own: the plugins-off ablation
    comes for free. (With a joint-equivalent stage 1 it would repeat the joint row.)"""
    joint = {(r.backbone, r.seed): r.final for r in results if r.label == "joint"}
    out = list(results)
    for r in results:
        s1 = {"test/" + k[len("stage1_test/"):]: v for k, v in r.final.items() if k.startswith("stage1_test/")}
        if not s1 or r.label == "joint":
            continue
        ref = joint.get((r.backbone, r.seed), {})
        if all(ref.get(k) == v for k, v in s1.items()):
            continue
        out.append(CellResult(f"{r.label}/no-plugins", r.backbone, r.seed, r.method, s1, r.run_id, None, r.overrides))
    return out


def write_report(results: Sequence[CellResult], output: Path, title: str, command: str, *,
                 metrics: Sequence[str], change_metrics: Sequence[str], reference: str = "joint") -> dict[str, Path]:
    """report.md, report.html, results.csv (every seed), summary.csv and ndcg.png in ``output``;
    changes are measured against the ``reference`` cell (joint; twobp in two-tower grids).

    Every file is made in memory first and then written atomically (``write_file``), so a report
    that fails (a plot that cannot be drawn, a bad cell) leaves the previous one as it was; the
    folder itself is not replaced: it also holds the grid's cells.jsonl and command.txt."""
    import io

    results = with_stage1_rows(results)
    df = long_table(results, metrics)
    summ = summary(df, reference)
    slices = slices_of(results)
    labels = list(dict.fromkeys(r.label for r in results))
    t = tables(summ, slices, labels, metrics, change_metrics)
    png = io.BytesIO()
    plot(summ, slices, labels, png)
    seeds = sorted({r.seed for r in results})
    note = (f"Test split; mean ± std over seeds {seeds}; models selected on validation only. "
            f"Change = relative difference of the means against `{reference}` (same backbone); "
            "p = paired two-sided t-test over seeds; * = p < 0.05.")
    change_title = f"Change against {reference} ({', '.join(m.upper() for m in change_metrics)})"
    commands = [c for c in command.splitlines() if c.strip()]
    md = [f"# {title}", "", *[f"`{c}`" + ("  " if i < len(commands) - 1 else "") for i, c in enumerate(commands)],
          "", note, "", "## Test metrics", "",
          markdown(t["absolute"]), "", f"## {change_title}", "",
          markdown(t["change"]), "", "![NDCG@10 per slice](ndcg.png)", ""]
    html = [f"<html><head><meta charset='utf-8'><title>{title}</title></head><body>",
            f"<h1>{title}</h1>" + "".join(f"<p><code>{c}</code></p>" for c in commands) + f"<p>{note}</p>",
            "<h2>Test metrics</h2>", t["absolute"].to_html(index=False),
            f"<h2>{change_title}</h2>", t["change"].to_html(index=False),
            "<img src='ndcg.png'></body></html>"]
    files = {"results.csv": df.to_csv(index=False), "summary.csv": summ.to_csv(index=False),
             "ndcg.png": png.getvalue(), "report.md": "\n".join(md), "report.html": "\n".join(html)}
    for name, data in files.items():  # the two reports last: they show the rest
        write_file(output / name, data)
    return {n: output / n for n in ("report.md", "report.html", "results.csv", "summary.csv", "ndcg.png")}
