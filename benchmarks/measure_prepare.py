"""Wall time and peak memory of a command together with every Ray process it starts.

    python benchmarks/measure_prepare.py -- ray-pinet prepare --config configs/prepare/beauty.yaml

Samples every ``--interval`` seconds the proportional set size (PSS, from /proc/PID/smaps_rollup, so
pages shared with the object store or between workers are not counted twice) of the command's
process tree (a local Ray instance started by the command's ``ray.init()`` is in it: GCS, raylet,
workers). ``--by-name`` also counts every other new process whose command line mentions ``ray`` (for
a command that connects to a cluster started elsewhere; other Ray jobs starting meanwhile would
count). Prints one JSON line: wall seconds, exit code, peak total PSS, peak driver PSS, peak number
of processes and the largest per-process peaks. Linux only; no psutil needed (``procmem.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procmem import run_measured  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--by-name", action="store_true", help="also count new processes named *ray*")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    m = run_measured(cmd, interval=args.interval, by_name=args.by_name, capture=False)
    summary = m.summary()
    summary["cmd"] = " ".join(cmd)
    print(json.dumps(summary), file=sys.stderr, flush=True)
    return m.rc


if __name__ == "__main__":
    sys.exit(main())
