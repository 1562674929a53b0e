"""Wall time and peak memory of a command's whole process tree, from /proc (Linux, no psutil).

Memory is the proportional set size (PSS, ``/proc/PID/smaps_rollup``): a page shared by n
processes (the Ray object store, copy-on-write pages of forked workers) counts 1/n in each, so
the sum over a tree is the memory the tree really holds. The tree is the command and every
descendant started after it, which includes a local Ray instance started by the command's
``ray.init()`` (GCS, raylet, workers are its children and grandchildren).

A memory guard protects other work on the machine: when MemAvailable falls below
``guard_mib`` the measured tree is killed (its own process group first, then every member by
pid) and the result says so, instead of the kernel's OOM killer choosing a victim elsewhere.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field


def list_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _read(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def pss_kib(pid: int) -> int:
    for line in _read(pid, "smaps_rollup").splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def parent_pid(pid: int) -> int:
    stat = _read(pid, "stat")
    return int(stat.rsplit(")", 1)[1].split()[1]) if stat else 0


def process_label(pid: int) -> str:
    """A short name: Ray workers rename themselves (``ray::IDLE``, ``ray::_timed``); others by argv[0]."""
    argv = _read(pid, "cmdline").split("\0")
    first = argv[0] if argv and argv[0] else _read(pid, "comm").strip()
    if first.startswith("ray::"):
        return first.split()[0]
    return os.path.basename(first.split()[0]) if first else "?"


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


@dataclass
class Measured:
    """What ``run_measured`` saw. Memory in MiB; ``processes``: the largest peaks, one per pid."""

    cmd: list[str]
    rc: int
    wall_s: float
    peak_total_pss_mib: float
    peak_driver_pss_mib: float
    peak_processes: int
    killed_by_guard: bool = False
    stdout: str = ""
    stderr: str = ""
    processes: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        out = asdict(self)
        del out["stdout"], out["stderr"]
        return out


def _descendants(root: int, candidates: list[int]) -> set[int]:
    tree, changed = {root}, True
    parents = {p: parent_pid(p) for p in candidates}
    while changed:
        changed = False
        for p, pp in parents.items():
            if p not in tree and pp in tree:
                tree.add(p)
                changed = True
    return tree


def run_measured(
    cmd: list[str],
    interval: float = 0.2,
    by_name: bool = False,
    guard_mib: float = 0.0,
    env: dict | None = None,
    cwd: str | None = None,
    capture: bool = True,
    top: int = 32,
) -> Measured:
    """Run ``cmd`` to completion, sampling the PSS of its tree every ``interval`` seconds.

    ``by_name`` also counts new processes whose command line mentions ``ray`` (a command that
    joins a cluster started elsewhere). ``guard_mib`` > 0 enables the memory guard.
    """
    before = set(list_pids())
    t0 = time.perf_counter()
    out_f = subprocess.PIPE if capture else None  # not captured: the child writes to our stdout/stderr
    # Own session: the guard can kill this tree as a group without touching anything else.
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out_f, stderr=out_f, text=True,
                            start_new_session=True)
    stdout_chunks: list[str] = []
    stderr_chunks: list[str] = []
    if capture:  # drain pipes in threads so a chatty child never blocks on a full pipe
        import threading

        def drain(stream, sink):
            for line in stream:
                sink.append(line)

        threads = [threading.Thread(target=drain, args=(proc.stdout, stdout_chunks), daemon=True),
                   threading.Thread(target=drain, args=(proc.stderr, stderr_chunks), daemon=True)]
        for t in threads:
            t.start()
    peak_total = peak_driver = peak_n = 0
    peaks: dict[int, tuple[str, int]] = {}
    members: set[int] = {proc.pid}
    killed = False
    while proc.poll() is None:
        new = [p for p in list_pids() if p not in before]
        members = _descendants(proc.pid, new)
        if by_name:
            members |= {p for p in new if "ray" in _read(p, "cmdline")}
        sizes = {p: pss_kib(p) for p in members}
        for p, kib in sizes.items():
            if kib > peaks.get(p, ("", -1))[1]:
                peaks[p] = (process_label(p), kib)
        peak_total = max(peak_total, sum(sizes.values()))
        peak_driver = max(peak_driver, sizes.get(proc.pid, 0))
        peak_n = max(peak_n, len(members))
        if guard_mib > 0 and mem_available_mib() < guard_mib:
            killed = True
            _kill_tree(proc, members)
            break
        time.sleep(interval)
    proc.wait()
    wall = time.perf_counter() - t0
    try:  # anything the command left running in its own session (e.g. a half-started raylet)
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    if capture:
        for t in threads:
            t.join(timeout=5)
    biggest = sorted(peaks.items(), key=lambda kv: -kv[1][1])[:top]
    return Measured(
        cmd=list(cmd), rc=proc.returncode, wall_s=round(wall, 3),
        peak_total_pss_mib=round(peak_total / 1024, 1), peak_driver_pss_mib=round(peak_driver / 1024, 1),
        peak_processes=peak_n, killed_by_guard=killed,
        stdout="".join(stdout_chunks), stderr="".join(stderr_chunks),
        processes=[{"pid": p, "name": name, "peak_pss_mib": round(kib / 1024, 1)}
                   for p, (name, kib) in biggest],
    )


def _kill_tree(proc: subprocess.Popen, members: set[int]) -> None:
    """SIGKILL the measured command's process group, then each tree member we saw (by pid)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    for p in members:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
