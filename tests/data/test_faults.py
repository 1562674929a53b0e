"""Faults in ``prepare`` (issue 21, item 4): a worker killed mid-task, a driver killed mid-run, bad
input, a process killed while writing a file.

Every fault is real: SIGKILL of the real Ray worker or driver process (found through the attempt
files that ``run_tasks`` writes for its report), real files, the session's local Ray. The output
after a fault is compared table by table with a clean prepare of the same input.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_pinet.config_base import from_dict
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.pipeline import prepare
from ray_pinet.data.ray_tasks import run_tasks
from ray_pinet.errors import DataError
from ray_pinet.outputs import partial_dir
from tests.conftest import BUNDLED_DATA, REPO

BUCKETS = 4
PHASES = {"ingest": 1, "clean": BUCKETS, "unseen": BUCKETS, "samples": BUCKETS}


@pytest.fixture(scope="module")
def ratings(tmp_path_factory) -> Path:
    """A copy of the bundled ml-latest-small ratings (100,836 rows, 610 users)."""
    path = tmp_path_factory.mktemp("input") / "ratings.csv"
    path.write_bytes((BUNDLED_DATA / "ml-latest-small" / "ratings.csv").read_bytes())
    return path


def _config(ratings: Path, out: Path, **overrides) -> PrepareConfig:
    return from_dict(PrepareConfig, {"source": {"format": "movielens_csv", "path": str(ratings)},
                                     "output": str(out), "num_buckets": BUCKETS, **overrides})


def _cli_args(ratings: Path, out: Path) -> list[str]:
    """The same prepare as ``_config`` as ``ray-pinet prepare`` arguments."""
    return ["prepare", "--source", "movielens_csv", "--path", str(ratings), "--output", str(out),
            "--set", f"num_buckets={BUCKETS}", "--no-progress"]


@pytest.fixture(scope="module")
def reference(ray_cluster, ratings, tmp_path_factory) -> Path:
    """A prepare that nothing disturbed."""
    out = tmp_path_factory.mktemp("reference") / "out"
    prepare(_config(ratings, out), progress=False)
    return out


def _assert_same_output(got: Path, want: Path) -> None:
    """Same files; every Parquet table equal; JSON equal but for where it was written, when and
    how (report.json ``tasks``/``timings_s``, prepare_config.json ``output``)."""
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files(got) == files(want)
    for name in files(want):
        if name.endswith(".parquet"):
            assert pq.read_table(got / name).equals(pq.read_table(want / name)), name
            continue
        a, b = json.loads((got / name).read_text()), json.loads((want / name).read_text())
        for doc in (a, b):
            for key in {"report.json": ("tasks", "timings_s"), "prepare_config.json": ("output",)}.get(name, ()):
                doc.pop(key)
        assert a == b, name


def _attempts(out: Path) -> list[tuple[str, int]]:
    """(task key, worker pid) of each task attempt recorded so far (``run_tasks``)."""
    folder = partial_dir(out) / "_work" / "done" / "attempts"
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return [(n.split(".")[0], int(n.split(".")[1].split("-")[0])) for n in names]


def _kill_if_running(pid: int, result: Path) -> bool:
    """SIGKILL the worker ``pid`` if its task is still running: stopped first (SIGSTOP), so that
    the check that the task has not kept its ``result`` yet cannot go stale before the kill."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return False
    if result.exists():  # that task is done; the worker may be running another one already
        os.kill(pid, signal.SIGCONT)
        return False
    os.kill(pid, signal.SIGKILL)
    return True


def test_a_worker_killed_mid_task_is_retried_and_the_output_is_unchanged(ratings, reference, tmp_path):
    out = tmp_path / "out"
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = prepare(_config(ratings, out), progress=False)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test thread below
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed, looked = None, set()
    while thread.is_alive() and killed is None:
        for key, pid in _attempts(out):
            if (key, pid) not in looked:
                looked.add((key, pid))
                if _kill_if_running(pid, partial_dir(out) / "_work" / "done" / f"{key}.pkl"):
                    killed = key
                    break
        time.sleep(0.002)
    thread.join(timeout=600)
    if "error" in box:
        raise box["error"]
    assert killed, f"no task was caught running (attempts seen: {sorted(looked)})"
    tasks = box["result"].report["tasks"]
    phase = killed.split("-")[0]
    assert tasks[phase]["retried"] == 1, tasks
    assert all(t["reused"] == 0 for t in tasks.values())
    _assert_same_output(out, reference)
    assert not partial_dir(out).exists()


@pytest.fixture(scope="module")
def killed(ray_cluster, ratings, tmp_path_factory):
    """``ray-pinet prepare`` in its own process (and its own local Ray), killed as a whole once
    the clean phase is done: a crash between phases, with the samples phase under way or not
    started. Returns the output, a copy of the unfinished run's folder as the kill left it, and
    how many samples tasks had finished."""
    tmp = tmp_path_factory.mktemp("killed")
    out, done = tmp / "out", partial_dir(tmp / "out") / "_work" / "done"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp / "killed.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "ray_pinet.cli", *_cli_args(ratings, out)], cwd=REPO,
                                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(done.glob("clean-*.pkl"))) < BUCKETS:
            assert proc.poll() is None, f"prepare ended before it was killed:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no clean phase after 300 s:\n{log.read_text()}"
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGSTOP)  # the driver and its Ray, frozen
        assert not out.exists(), "prepare had finished: nothing was interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_workers(out)
    samples_done = len(list(done.glob("samples-*.pkl")))
    assert samples_done < BUCKETS
    snapshot = tmp / "snapshot"
    shutil.copytree(partial_dir(out), snapshot, symlinks=True)
    return out, snapshot, samples_done


def _kill_workers(out: Path) -> None:
    """SIGKILL the Ray workers that ran tasks for ``out``, and wait until they are gone: each is
    in a process group of its own and outlives its killed raylet for a moment, enough to finish
    writing a file."""
    while alive := [pid for _, pid in _attempts(out) if _alive(pid)]:
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie (dead, not yet reaped by its new parent) writes nothing


def _restore(killed) -> Path:
    """The unfinished run's folder as the kill left it; the output absent."""
    out, snapshot, _ = killed
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(partial_dir(out), ignore_errors=True)
    shutil.copytree(snapshot, partial_dir(out), symlinks=True)
    return out


def test_a_rerun_after_the_driver_was_killed_reuses_the_finished_buckets(killed, ratings, reference, capsys):
    out, snapshot, samples_done = killed
    _restore(killed)
    capsys.readouterr()
    result = prepare(_config(ratings, out), progress=False)
    captured = capsys.readouterr()
    assert f"resuming the unfinished run in {partial_dir(out)}" in captured.err
    reused = {phase: (t["reused"], t["tasks"]) for phase, t in result.report["tasks"].items()}
    # ml-latest-small has items seen only as evaluation targets: the round that counts them runs
    # between clean and samples (the kill came before or during it).
    unseen_done = len(list((snapshot / "_work" / "done").glob("unseen-*.pkl")))
    assert reused == {"ingest": (1, 0), "clean": (BUCKETS, 0), "unseen": (unseen_done, BUCKETS - unseen_done),
                      "samples": (samples_done, BUCKETS - samples_done)}
    assert f"kept results of an unfinished run: 1/1 ingest, {BUCKETS}/{BUCKETS} clean" in captured.out
    _assert_same_output(out, reference)
    assert not partial_dir(out).exists()


@pytest.mark.parametrize("change", ["config", "input files"])
def test_an_unfinished_run_of_other_inputs_is_discarded_with_a_note(change, killed, ratings, capsys):
    out = _restore(killed)
    cfg, mtime = _config(ratings, out), ratings.stat().st_mtime_ns
    if change == "config":
        cfg = _config(ratings, out, seed=1)
    else:
        os.utime(ratings, ns=(mtime + 10**9, mtime + 10**9))  # same bytes, but the file was touched
    try:
        capsys.readouterr()
        result = prepare(cfg, progress=False)
    finally:
        os.utime(ratings, ns=(mtime, mtime))
    assert f"discarded the unfinished run in {partial_dir(out)}: {change} changed" in capsys.readouterr().err
    assert all(t["reused"] == 0 and t["tasks"] == PHASES[p] for p, t in result.report["tasks"].items())
    assert set(result.report["tasks"]) == set(PHASES)


def _bad_row(path: str) -> None:
    raise DataError("empty 'item_id'", file=path, column="item_id", row=3, value="")


def test_a_data_error_is_not_retried_and_surfaces_unchanged(ray_cluster, tmp_path):
    with pytest.raises(DataError) as exc:
        run_tasks(_bad_row, [("log.csv",)], "check", False, done=tmp_path)
    assert str(exc.value) == "empty 'item_id' [file: log.csv, column: item_id, row: 3, value: '']"
    assert len(list((tmp_path / "attempts").glob("check-00000.*"))) == 1  # one attempt, no retry
    assert not (tmp_path / "check-00000.pkl").exists()


def test_bad_input_in_prepare_removes_the_unfinished_run(ray_cluster, tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,timestamp\n" + "".join(f"u{u},i{j},{100 + j}\n" for u in range(3)
                                                           for j in range(4)) + "u9,,1600000000\n")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"empty 'item_id'") as exc:
        prepare(from_dict(PrepareConfig, {"source": {"format": "csv", "path": str(log)}, "output": str(out),
                                          "num_buckets": 2}), progress=False)
    assert (exc.value.file, exc.value.column, exc.value.row) == (str(log), "item_id", 14)
    assert not out.exists() and not partial_dir(out).exists()  # a rerun could not reuse anything


_WRITE_AND_DIE = """
import os, signal, sys
import pyarrow as pa, pyarrow.parquet as pq
from ray_pinet.outputs import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    with pq.ParquetWriter(tmp, pa.schema([("x", pa.int64())])) as w:
        w.write_table(pa.table({"x": list(range(1000))}))
        os.kill(os.getpid(), signal.SIGKILL)  # before the file is complete
"""


def test_a_process_killed_while_writing_leaves_no_half_file(tmp_path):
    target = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"x": [7]}), target)
    before = target.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _WRITE_AND_DIE, str(target)], cwd=REPO, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == before  # the old file, whole
    left = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(left) == 1 and left[0].startswith(".part-00000.parquet.") and left[0].endswith(".tmp")
    assert pq.read_table(tmp_path).num_rows == 1  # a folder read skips the hidden temporary file


def test_two_runs_for_one_output_take_turns(tmp_path):
    """The unfinished-run folder is locked: a second run for the same output waits for the first
    to swap its folder in, then starts on a fresh one (the first run's work is not mixed in)."""
    from ray_pinet.outputs import resumable_dir

    target, events = tmp_path / "out", []

    def run(name: str, hold_s: float) -> None:
        with resumable_dir(target, {"run": "same"}) as part:
            events.append((name, "in", sorted(p.name for p in part.path.iterdir() if p.name != ".state.json")))
            (part.path / name).write_text(name)
            time.sleep(hold_s)
            events.append((name, "out"))

    first = threading.Thread(target=run, args=("a", 1.0))
    first.start()
    while not events:
        time.sleep(0.01)
    second = threading.Thread(target=run, args=("b", 0.0))
    second.start()
    first.join(), second.join()
    assert events == [("a", "in", []), ("a", "out"), ("b", "in", []), ("b", "out")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "b").exists()
