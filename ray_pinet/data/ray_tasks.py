"""The only Ray calls of the data layer: start Ray if needed, run one task per work item."""

from __future__ import annotations

import os
import pickle
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from ray_pinet.config_base import ConfigError
from ray_pinet.errors import DataError
from ray_pinet.local_ray import start_ray
from ray_pinet.outputs import write_file

# Runs of a task after its worker process died (killed, out of memory, node lost). An exception the
# task raises itself is never retried (retry_exceptions=False): bad input fails the same way every time.
TASK_RETRIES = 3
# Cancelled tasks get this long to stop before the error is raised, so none of them still writes
# into a folder the caller is about to remove.
_CANCEL_WAIT_S = 10.0


def ensure_ray() -> None:
    """Ray as every command starts it (``ray_pinet.local_ray.start_ray``), unless already running.

    A Train run that follows in the same process keeps this instance, so prepare must not start
    a smaller one of its own (issue 18: no dashboard, only the real cores, and the run hung)."""
    start_ray()


def _run_one(fn: Callable, done: Path | None, key: str, *args) -> tuple[Any, float, float]:
    """``fn(*args)`` with its wall and CPU time. With ``done``: the attempt is recorded first
    (``done/attempts/<key>.<pid>-<hex>``, counted as retries) and the result kept (``done/<key>.pkl``)."""
    if done is not None:
        (done / "attempts" / f"{key}.{os.getpid()}-{uuid.uuid4().hex[:8]}").touch()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if done is not None:
        write_file(done / f"{key}.pkl", pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL))
    return out, wall, cpu


def run_tasks(
    fn: Callable, arg_list: list[tuple], desc: str, progress: bool, timing: dict | None = None,
    done: Path | None = None, keep: Callable[[int, Any], Any] | None = None,
) -> list:
    """``fn(*args)`` as one 1-CPU Ray task per element; results in input order.

    A task whose worker died is retried (``TASK_RETRIES``). A DataError or ConfigError raised in
    a task is re-raised here unchanged, not retried (the other tasks are cancelled), so callers
    see the same error as in a single process.

    ``done`` (optional, a folder): task ``i``'s result is kept as ``done/<desc>-<i>.pkl`` once
    complete, and a task whose file is already there (from an earlier run that stopped) is not
    run: its result is loaded. ``fn``'s outputs must then be a pure function of its arguments,
    written atomically (``outputs.atomic_path``) before it returns.

    ``timing`` (optional) gets ``{desc: {"tasks", "task_wall_s_sum", "task_wall_s_max",
    "task_cpu_s_sum"}}`` over the tasks run, and with ``done`` also ``"reused"`` (results
    loaded) and ``"retried"`` (attempts beyond the first, i.e. after a worker died).

    ``keep`` (optional): ``keep(i, result)`` is called as each result arrives (or is loaded), in
    no particular order, and its return value is kept instead of the result: a caller folds large
    results as they come (the driver then never holds all of them), or deletes task ``i``'s inputs,
    which no rerun needs once its result is kept in ``done``.
    """
    import ray
    from ray.exceptions import RayTaskError
    from tqdm import tqdm

    ensure_ray()
    keys = [f"{desc}-{i:05d}" for i in range(len(arg_list))]
    results: list = [None] * len(arg_list)
    todo = list(range(len(arg_list)))
    if done is not None:
        (done / "attempts").mkdir(parents=True, exist_ok=True)
        for stale in (done / "attempts").glob(f"{desc}-*"):  # counts are of this run only
            stale.unlink()
        todo = [i for i in todo if not _load(done / f"{keys[i]}.pkl", results, i, keep)]
    # "DEFAULT" scheduling: inside a Tune trial the caller runs in the trial's placement group,
    # whose tiny bundle would otherwise capture (and refuse) these 1-CPU tasks.
    remote = ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=False,
                        scheduling_strategy="DEFAULT")(_run_one)
    # The arguments stay top-level: Ray resolves an ObjectRef argument only there.
    refs = [remote.remote(fn, done, keys[i], *arg_list[i]) for i in todo]
    where = dict(zip(refs, todo))
    pending = list(refs)
    with tqdm(total=len(arg_list), initial=len(arg_list) - len(todo), desc=desc, disable=not progress,
              leave=False) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                i = where[ready[0]]
                out, wall, cpu = ray.get(ready[0])
                results[i] = (keep(i, out) if keep else out, wall, cpu)
            except Exception as exc:  # a task's own error, or a worker lost beyond its retries
                _cancel(pending)
                cause = getattr(exc, "cause", None)
                if isinstance(exc, RayTaskError) and isinstance(cause, (DataError, ConfigError)):
                    raise cause from None
                raise
            bar.update(1)
    if timing is not None:
        walls, cpus = [results[i][1] for i in todo], [results[i][2] for i in todo]
        timing[desc] = {
            "tasks": len(todo),
            "task_wall_s_sum": round(sum(walls), 3),
            "task_wall_s_max": round(max(walls, default=0.0), 3),
            "task_cpu_s_sum": round(sum(cpus), 3),
        }
        if done is not None:
            attempts = sum(1 for _ in (done / "attempts").glob(f"{desc}-*"))
            timing[desc].update(reused=len(arg_list) - len(todo), retried=max(attempts - len(todo), 0))
    return [r[0] for r in results]


def _load(path: Path, results: list, i: int, keep: Callable | None) -> bool:
    """Put the kept result at ``path`` into ``results[i]``; False when there is none."""
    try:
        out = pickle.loads(path.read_bytes())
    except FileNotFoundError:
        return False
    results[i] = (keep(i, out) if keep else out, None, None)
    return True


def _cancel(refs: list) -> None:
    import ray

    for ref in refs:
        ray.cancel(ref)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=_CANCEL_WAIT_S)
