"""The sweep report: every trial (values, how far it ran, feasibility, objective, per-stratum
validation and test metrics), the best trial against the untuned defaults, and a plot of the
objective per trial over iterations."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ray_pinet.tuning.space import TuneSpace


def status(t: dict) -> str:
    if t.get("error"):
        return "error"
    return "finished" if t["finished"] else "stopped early"


def _slices(trials: list[dict]) -> list[str]:
    names = {k.split("/")[1] for t in trials for k in t["metrics"]
             if k.startswith("final_val/") and k.endswith("/users")}
    order = ["tail", "head"]
    return [s for s in order if s in names] + sorted(names - set(order) - {"all"}) + (["all"] if "all" in names else [])


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def write_report(summary: dict, space: TuneSpace, out: Path) -> list[Path]:
    trials = summary["trials"]
    k_metric = space.objective.metric
    slices = _slices(trials) or ["tail", "head", "all"]
    keys = sorted({k for t in trials for k in t["values"]})
    # trials.csv: one row per trial, every searched value and every last-reported number.
    csv_path = out / "trials.csv"
    num_keys = sorted({k for t in trials for k in t["metrics"]})
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", "status", "feasible", "objective", "iterations"] + keys + num_keys)
        for t in trials:
            w.writerow([t["trial_id"], status(t), t["feasible"], t["objective"], t["iterations"]]
                       + [json.dumps(t["values"].get(k)) for k in keys]
                       + [t["metrics"].get(k) for k in num_keys])

    def metric(t: dict, prefix: str, s: str) -> str:
        m = t["metrics"]
        if prefix == "final_val" and not any(k.startswith("final_val/") for k in m):
            prefix = "val"  # stopped early: its last validation report
        if s in ("tail", "head") and f"{prefix}/{s}/users" not in m:
            # K > 2 buckets: tail / head are the least / most active bucket (as in the objective)
            buckets = sorted(int(k.split("/")[1][1:]) for k in m
                             if k.startswith(f"{prefix}/s") and k.endswith("/users") and k.split("/")[1][1:].isdigit())
            if buckets:
                s = f"s{buckets[0] if s == 'tail' else buckets[-1]}"
        key = f"{prefix}/{s}/{k_metric}@10" if k_metric in ("ndcg", "hr") else f"{prefix}/{s}/{k_metric}"
        return _fmt(m.get(key))

    lines = [f"# ray-pinet tune: {summary['name']}", "",
             f"Objective: {space.objective.measure} of validation {space.objective.slice} {k_metric}"
             f" against the reference joint run on the same users; other strata must keep >= reference"
             f" x (1 - {space.objective.guard_tolerance}). Infeasible trials are listed, never chosen."
             " Test metrics are shown, never used to choose. With K > 2 buckets, tail / head are the"
             " least / most active bucket.", "",
             "## Trials", "",
             "| trial | " + " | ".join(keys) + " | status | iters | feasible | objective | "
             + " | ".join(f"val {s}" for s in slices) + " | " + " | ".join(f"test {s}" for s in slices) + " |",
             "|---" * (len(keys) + 5 + 2 * len(slices)) + "|"]
    for t in sorted(trials, key=lambda t: -t["objective"] if t["objective"] == t["objective"] else 1e9):
        lines.append(
            f"| {t['trial_id']} | " + " | ".join(_fmt(t["values"].get(k)) for k in keys)
            + f" | {status(t)} | {t['iterations']} | {'yes' if t['feasible'] else 'no'} | "
            + f"{t['objective']:+.4f} | "
            + " | ".join(metric(t, "final_val", s) for s in slices) + " | "
            + " | ".join(metric(t, "test", s) if t["finished"] else "-" for s in slices) + " |")
    best, defaults = summary.get("best"), summary.get("defaults")
    lines += ["", "## Best trial", ""]
    if best is None:
        lines.append("No finished trial met the guard: nothing was registered.")
    else:
        lines.append(f"Trial `{best['trial_id']}`: " + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in best["values"].items()))
        if summary.get("registered"):
            r = summary["registered"]
            lines.append(f"\nRegistered as `{r['uri']}` (MLflow Model Registry).")
        rows = [("best", best)] + ([("defaults", defaults)] if defaults else [])
        lines += ["", "| run | " + " | ".join(f"val {s} {k_metric}" for s in slices) + " | "
                  + " | ".join(f"test {s} {k_metric}" for s in slices) + " | objective |",
                  "|---" * (2 * len(slices) + 2) + "|"]
        for label, t in rows:
            lines.append(f"| {label} ({t['trial_id']}) | " + " | ".join(metric(t, "final_val", s) for s in slices)
                         + " | " + " | ".join(metric(t, "test", s) for s in slices) + f" | {t['objective']:+.4f} |")
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    files = [md, csv_path]
    png = out / "objective.png"
    if _plot(trials, png):
        files.append(png)
    return files


def _plot(trials: list[dict], path: Path) -> bool:
    curves = [(t["trial_id"], t.get("curve") or []) for t in trials]
    if not any(c for _, c in curves):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for tid, c in curves:
        if c:
            x, y = zip(*c)
            ax.plot(x, y, marker="o", ms=3, label=tid)
    ax.set_xlabel("iteration (validation report)")
    ax.set_ylabel("objective")
    ax.set_title("objective per trial (ASHA stops the lower curves early)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
