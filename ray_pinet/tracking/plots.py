"""PNG plots logged with every run: per-stratum metrics and the activeness histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import matplotlib

from ray_pinet.evaluation.protocol import slice_names

matplotlib.use("Agg")  # headless: runs on workers and CI without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_stratum_curves(history: list[dict], slices: Sequence[str], k: int, path: str | Path) -> Path:
    """Validation NDCG@k / HR@k per stratum over training epochs (stage 1 and 2)."""
    rows = [h for h in history if any(key.startswith("val/") for key in h)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, (f"ndcg@{k}", f"hr@{k}")):
        for name in slices:
            ys = [h.get(f"val/{name}/{metric}") for h in rows]
            xs = [i for i, y in enumerate(ys) if y is not None]
            ax.plot(xs, [ys[i] for i in xs], marker=".", label=name)
        stage2 = [i for i, h in enumerate(rows) if h.get("stage") == 2.0]
        if stage2:
            ax.axvline(stage2[0] - 0.5, color="grey", ls="--", lw=1)
            ax.text(stage2[0], ax.get_ylim()[1], " stage 2", va="top", fontsize=8, color="grey")
        ax.set_xlabel("evaluation (epoch)")
        ax.set_ylabel(f"validation {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("per-stratum validation metrics")
    return _save(fig, path)


def plot_final_bars(final: dict, slices: Sequence[str], k: int, path: str | Path) -> Path:
    """Test metrics per stratum as grouped bars."""
    metrics = [f"ndcg@{k}", f"hr@{k}", "auc", "gauc"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4))
    for ax, m in zip(axes, metrics):
        vals = [final.get(f"test/{s}/{m}", np.nan) for s in slices]
        ax.bar(list(slices), vals, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2"][: len(slices)])
        ax.set_title(f"test {m}")
        for i, v in enumerate(vals):
            if np.isfinite(v):
                ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    return _save(fig, path)


def plot_activeness(activeness: np.ndarray, stratum: np.ndarray, path: str | Path,
                    title: Optional[str] = None) -> Path:
    """Histogram of per-user activeness (log x), coloured by stratum."""
    fig, ax = plt.subplots(figsize=(7, 4))
    a = np.asarray(activeness, dtype=float)
    bins = np.unique(np.logspace(0, np.log10(max(a.max(), 2)), 40).round())
    for s in np.unique(stratum):
        ax.hist(a[stratum == s], bins=bins, alpha=0.7, label=f"stratum {int(s)} ({int((stratum == s).sum())} users)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training events per user (activeness)")
    ax.set_ylabel("users")
    ax.set_title(title or "user activeness")
    ax.legend()
    return _save(fig, path)


def plot_retrain(gate: dict, drift: dict, path: str | Path) -> Path:
    """Retrain at a glance: the gate metric per slice (registered vs candidate) and the user
    share of every stratum before and after the new data."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    rows = gate["rows"]
    x = np.arange(len(rows))
    inc = [np.nan if r["incumbent"] is None else r["incumbent"] for r in rows]
    a.bar(x - 0.2, inc, 0.4, label="registered", color="#8c8c8c")
    a.bar(x + 0.2, [r["candidate"] for r in rows], 0.4, label="candidate",
          color=["#55a868" if r["ok"] else "#c44e52" for r in rows])
    a.set_xticks(x, [r["slice"] for r in rows])
    a.set_title(f"newest holdout {gate['metric']}")
    a.legend(fontsize=8)
    strata = drift["strata"]
    y = np.arange(len(strata))
    b.bar(y - 0.2, [np.nan if s["old_user_share"] is None else s["old_user_share"] for s in strata], 0.4,
          label="before", color="#8c8c8c")
    b.bar(y + 0.2, [s["new_user_share"] for s in strata], 0.4, label="after", color="#4c72b0")
    b.set_xticks(y, [s["stratum"] for s in strata])
    b.set_title("user share per stratum")
    b.legend(fontsize=8)
    return _save(fig, path)


def plot_twotower_curves(history: list[dict], num_strata: int, path: str | Path, k: int = 10) -> Path:
    """Two-tower runs: training loss and test (and validation) NDCG@k per stratum over epochs."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([h["epoch"] for h in history], [h["train/loss"] for h in history])
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("training loss")
    axes[0].grid(alpha=0.3)
    for split, ls in (("test", "-"), ("valid", "--")):
        for name in slice_names(num_strata):
            key = f"{split}/{name}/ndcg@{k}"
            pts = [(h["epoch"], h[key]) for h in history if key in h]
            if pts:
                axes[1].plot(*zip(*pts), ls=ls, label=f"{split} {name}")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel(f"NDCG@{k}")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return _save(fig, path)
