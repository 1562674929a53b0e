"""The only Ray calls of the data layer: start Ray if needed, run one task per work item."""

from __future__ import annotations

import time
from typing import Any, Callable

from ray_pinet.config_base import ConfigError
from ray_pinet.errors import DataError


def ensure_ray() -> None:
    """Ray as every command starts it (``ray_pinet.local_ray.start_ray``), unless already running.

    A Train run that follows in the same process keeps this instance, so prepare must not start
    a smaller one of its own (issue 18: no dashboard, only the real cores, and the run hung)."""
    from ray_pinet.local_ray import start_ray

    start_ray()


def _timed(fn: Callable, *args) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def run_tasks(
    fn: Callable, arg_list: list[tuple], desc: str, progress: bool, timing: dict | None = None
) -> list:
    """``fn(*args)`` as one 1-CPU Ray task per element; results in input order.

    A DataError or ConfigError raised in a task is re-raised here unchanged (the other tasks are
    cancelled), so callers see the same error as in a single process. ``timing`` (optional) gets
    ``{desc: {"tasks", "task_wall_s_sum", "task_wall_s_max", "task_cpu_s_sum"}}``.
    """
    import ray
    from ray.exceptions import RayTaskError
    from tqdm import tqdm

    ensure_ray()
    # "DEFAULT" scheduling: inside a Tune trial the caller runs in the trial's placement group,
    # whose tiny bundle would otherwise capture (and refuse) these 1-CPU tasks.
    remote = ray.remote(num_cpus=1, max_retries=0, scheduling_strategy="DEFAULT")(_timed)
    refs = [remote.remote(fn, *args) for args in arg_list]
    where = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, disable=not progress, leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                results[where[done[0]]] = ray.get(done[0])
            except RayTaskError as exc:
                for ref in pending:
                    ray.cancel(ref)
                cause = getattr(exc, "cause", None)
                if isinstance(cause, (DataError, ConfigError)):
                    raise cause from None
                raise
            bar.update(1)
    if timing is not None:
        walls, cpus = [r[1] for r in results], [r[2] for r in results]
        timing[desc] = {
            "tasks": len(results),
            "task_wall_s_sum": round(sum(walls), 3),
            "task_wall_s_max": round(max(walls, default=0.0), 3),
            "task_cpu_s_sum": round(sum(cpus), 3),
        }
    return [r[0] for r in results]
