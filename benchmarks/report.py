"""Shared output of the benchmark scripts: the machine they ran on, and one table written three
ways (printed Markdown, ``<name>.csv``, ``<name>.json`` with the machine and the arguments).

Every benchmark records the load average at its start: on a shared box a busy CPU explains a
slow number, and a reader must be able to see that from the result file alone.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence


def machine_info() -> dict[str, Any]:
    """CPU, memory, library versions and the current load (1/5/15-minute averages)."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
    }
    try:
        with open("/proc/cpuinfo") as f:
            models = (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
            info["cpu_model"] = next(models, "?")
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    for mod in ("torch", "ray", "pandas", "pyarrow", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def parse_count(text: str) -> int:
    """``1e6`` / ``2000000`` / ``2_000_000`` -> int (argparse ``type=``)."""
    return int(float(text.replace("_", "")))


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    out_dir: str | Path, name: str, rows: list[dict], columns: Sequence[str], meta: dict[str, Any]
) -> str:
    """Write ``name.csv`` (``columns`` only) and ``name.json`` (every field, plus ``meta``);
    return the Markdown table (also printed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps({**meta, "columns": list(columns), "rows": rows}, indent=1,
                                                 default=str))
    table = markdown_table(rows, columns)
    print(table, flush=True)
    return table
