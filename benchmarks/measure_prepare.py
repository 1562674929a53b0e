"""Wall time and peak memory of a command together with every Ray process it starts.

    python benchmarks/measure_prepare.py -- ray-pinet prepare --config configs/prepare/beauty.yaml

Samples every ``--interval`` seconds the proportional set size (PSS, from /proc/PID/smaps_rollup, so
pages shared with the object store or between workers are not counted twice) of the command's
process tree (a local Ray instance started by the command's ``ray.init()`` is in it: GCS, raylet,
workers). ``--by-name`` also counts every other new process whose command line mentions ``ray`` (for
a command that connects to a cluster started elsewhere; other Ray jobs starting meanwhile would
count). Prints one JSON line: wall seconds, exit code, peak total PSS, peak driver PSS, peak number
of processes. Linux only; no psutil needed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _read(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _pss_kib(pid: int) -> int:
    for line in _read(pid, "smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _start_ticks(pid: int) -> int:
    stat = _read(pid, "stat")
    return int(stat.rsplit(")", 1)[1].split()[19]) if stat else 0


def _ppid(pid: int) -> int:
    stat = _read(pid, "stat")
    return int(stat.rsplit(")", 1)[1].split()[1]) if stat else 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--by-name", action="store_true", help="also count new processes named *ray*")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    before = set(_pids())
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak_total = peak_driver = peak_n = 0
    while proc.poll() is None:
        tree, total = {proc.pid}, 0
        pids = [p for p in _pids() if p not in before]
        changed = True
        while changed:  # descendants of the command
            changed = False
            for p in pids:
                if p not in tree and _ppid(p) in tree:
                    tree.add(p)
                    changed = True
        members = tree | ({p for p in pids if "ray" in _read(p, "cmdline")} if args.by_name else set())
        total = sum(_pss_kib(p) for p in members)
        peak_total = max(peak_total, total)
        peak_driver = max(peak_driver, _pss_kib(proc.pid))
        peak_n = max(peak_n, len(members))
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    print(json.dumps({
        "cmd": " ".join(cmd), "rc": proc.returncode, "wall_s": round(wall, 2),
        "peak_total_pss_mib": round(peak_total / 1024, 1),
        "peak_driver_pss_mib": round(peak_driver / 1024, 1),
        "peak_processes": peak_n,
    }), file=sys.stderr, flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
