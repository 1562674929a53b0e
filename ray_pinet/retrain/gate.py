"""The registration gate of a retrain and its drift report (pure functions, no Ray, no MLflow).

Gate: the candidate replaces the registered version only if, on the newest holdout, no stratum
(and not "all") loses more than ``tolerance`` (relative) on the gate metric. Both models are
scored by the same evaluation code on the same users, grouped by the *new* stratification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ray_pinet.evaluation.protocol import slice_names


@dataclass
class GateRow:
    slice: str
    incumbent: Optional[float]
    candidate: float
    change: Optional[float]  # relative: (candidate - incumbent) / incumbent
    ok: bool
    users: int = 0
    # 95% paired-bootstrap interval of ``change`` over the slice's users (per-user metrics only):
    # shows whether a rejection is more than the noise of a small slice. Informational.
    ci95: Optional[tuple[float, float]] = None


@dataclass
class GateResult:
    metric: str
    tolerance: float
    rows: list[GateRow] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def reasons(self) -> list[str]:
        return [f"{r.slice} {self.metric} {r.candidate:.4f} vs registered {r.incumbent:.4f} "
                f"({100 * r.change:+.2f}% < -{100 * self.tolerance:.2f}%)" for r in self.rows if not r.ok]

    def to_dict(self) -> dict:
        return {"metric": self.metric, "tolerance": self.tolerance, "accepted": self.accepted,
                "reasons": self.reasons, "rows": [r.__dict__ for r in self.rows]}


def gate(incumbent: Optional[dict[str, float]], candidate: dict[str, float], num_strata: int,
         metric: str, tolerance: float, intervals: Optional[dict] = None) -> GateResult:
    """``incumbent`` / ``candidate``: evaluate() outputs ("<slice>/<metric>"). No incumbent (the
    first training) passes. ``intervals``: slice -> 95% interval of the change (paired_intervals)."""
    out = GateResult(metric, tolerance)
    for s in slice_names(num_strata):
        c = candidate[f"{s}/{metric}"]
        users = int(candidate.get(f"{s}/users", 0))
        i = None if incumbent is None else incumbent.get(f"{s}/{metric}")
        if i is None:
            out.rows.append(GateRow(s, None, c, None, True, users))
            continue
        change = (c - i) / i if i > 0 else (0.0 if c >= i else -1.0)
        out.rows.append(GateRow(s, i, c, change, change >= -tolerance, users, (intervals or {}).get(s)))
    return out


def drift(old: Optional[dict], new: dict) -> dict:
    """Per-stratum shares and thresholds of the incumbent's data (``old`` strata.json) against
    the candidate's (``new``)."""
    def rows(strata: Optional[dict]) -> dict:
        if not strata:
            return {}
        return {s["name"]: {k: s.get(k) for k in ("users", "interactions", "user_share", "interaction_share",
                                                   "min_activeness", "max_activeness")}
                for s in strata["strata"]}

    o, n = rows(old), rows(new)
    strata = []
    for name, nv in n.items():
        ov = o.get(name, {})
        strata.append({"stratum": name, **{f"new_{k}": v for k, v in nv.items()},
                       **{f"old_{k}": ov.get(k) for k in nv},
                       "user_share_change": None if ov.get("user_share") is None
                       else nv["user_share"] - ov["user_share"]})
    return {"thresholds": {"old": (old or {}).get("thresholds"), "new": new.get("thresholds")},
            "mode": new.get("mode"), "strata": strata,
            "users": {"old": _total(old, "users"), "new": _total(new, "users")},
            "interactions": {"old": _total(old, "interactions"), "new": _total(new, "interactions")}}


def _total(strata: Optional[dict], key: str) -> Optional[int]:
    return None if not strata else int(sum(s[key] for s in strata["strata"]))


def report_markdown(summary: dict) -> str:
    """drift.md: what changed in the data and what the gate decided."""
    g, d = summary["gate"], summary["drift"]
    lines = [f"# ray-pinet retrain through {summary['through']}", "",
             f"Incumbent: {summary['incumbent'] or 'none (first training)'}; new partitions: "
             f"{', '.join(summary['new_partitions']) or 'none'}.", "",
             f"Decision: **{'registered ' + summary['registered'] if g['accepted'] else 'rejected, registered version kept'}**"
             f" (gate: no slice may lose more than {100 * g['tolerance']:.2f}% {g['metric']} on the newest holdout).", ""]
    for r in g["reasons"]:
        lines.append(f"* regression: {r}")
    lines += ["", f"## {g['metric']} on the newest holdout (test split of the new data, new strata)", "",
              "| slice | users | registered | candidate | change | 95% interval of the change | ok |",
              "|---|---|---|---|---|---|---|"]
    for r in g["rows"]:
        inc = "-" if r["incumbent"] is None else f"{r['incumbent']:.4f}"
        ch = "-" if r["change"] is None else f"{100 * r['change']:+.2f}%"
        ci = "-" if not r.get("ci95") else f"{100 * r['ci95'][0]:+.1f}% .. {100 * r['ci95'][1]:+.1f}%"
        lines.append(f"| {r['slice']} | {r.get('users', '-')} | {inc} | {r['candidate']:.4f} | {ch} | {ci} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    lines += ["", "## Activeness drift", "",
              f"Thresholds: {_thresholds(d['thresholds']['old'])} -> {_thresholds(d['thresholds']['new'])}; users "
              f"{d['users']['old']} -> {d['users']['new']}; interactions {d['interactions']['old']} -> "
              f"{d['interactions']['new']}.", "",
              "| stratum | users | user share | interactions | interaction share | activeness range |",
              "|---|---|---|---|---|---|"]
    for s in d["strata"]:
        def pair(k, fmt="{}"):
            o, n = s.get(f"old_{k}"), s.get(f"new_{k}")
            return ("-" if o is None else fmt.format(o)) + " -> " + fmt.format(n)
        lines.append(f"| {s['stratum']} | {pair('users')} | {pair('user_share', '{:.3f}')} | "
                     f"{pair('interactions')} | {pair('interaction_share', '{:.3f}')} | "
                     f"{_range(s, 'old')} -> {_range(s, 'new')} |")
    v = summary.get("vocabulary")
    if v:
        lines += ["", f"Items: {v['old_items']} -> {v['new_items']} ({v['added']} new, {v['dropped']} gone)."]
    return "\n".join(lines) + "\n"


def _range(s: dict, which: str) -> str:
    lo, hi = s.get(f"{which}_min_activeness"), s.get(f"{which}_max_activeness")
    return "-" if lo is None else f"{lo}..{hi}"


def _thresholds(t: Optional[dict]) -> str:
    """The numbers of a strata.json ``thresholds`` (its prose ``rule`` left out)."""
    return "-" if not t else ", ".join(f"{k}={v}" for k, v in t.items() if k != "rule")
