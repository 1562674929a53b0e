"""The one place a ray-pinet process starts Ray (or joins the cluster ``RAY_ADDRESS`` names).

Every command goes through ``start_ray``, whichever of them runs first in the process: ``train``
on a folder without prepared data prepares first, and Ray then keeps the instance that prepare
started. Two start-ups with different settings once meant that a first run got Ray without the
dashboard and with only the machine's cores; the Train run that followed starved Ray Data of CPUs
(2 workers on 2 cores hung) or flooded the console with State API warnings (issue 18).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Ray Data bars from every worker interleave into noise (the workers print one line per epoch
# instead); the V2 migration warnings are about APIs the project does not use.
WORKER_ENV = {"RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# Ray Train's controller acts on the workers' reports, and sees a run end, once per poll of its workers:
# every 2 s by default (Ray 2.60), which several polls per fit turn into seconds. On one machine a poll is
# a local call, and a missed poll only carries over (a worker is declared dead after 10 minutes of them):
# polling every 0.25 s took a `train --smoke-test --method joint` here from 63.9 s to 54.0 s. Clusters
# keep Ray's default; a value in the environment wins.
LOCAL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


def local_cpus() -> int:
    """Logical CPUs a local instance advertises: at least 4, twice the cores on bigger boxes.

    Train workers and the controller hold CPU reservations; with only the real cores advertised,
    two 1-CPU workers on a 2-core box leave any other task a budget of zero: Ray Data's read
    tasks hung that way while they fed the workers (ray-notes §6). The workers now read their own
    blocks (training/shards.py); the headroom stays for whatever else a job schedules beside
    its workers. The work itself is still bounded by the real cores.
    """
    return max(4, 2 * (os.cpu_count() or 1))


def start_ray(**overrides: Any) -> None:
    """``ray.init`` for ray-pinet, unless Ray is already initialised in this process.

    With ``RAY_ADDRESS`` set: join that cluster (gloo uses the nodes' own interface there). Otherwise a new
    local instance: ``local_cpus()`` logical CPUs, the dashboard on 127.0.0.1 (a free port, 8265 when free),
    gloo over loopback, workers able to import ray_pinet from an uninstalled checkout. ``overrides`` replace
    or add ``ray.init`` keywords (the tests' object store size and ``log_to_driver``, a benchmark's CPU
    count); ``runtime_env`` env_vars given there are added to the defaults; ``address="local"`` starts a local
    instance even when ``RAY_ADDRESS`` is set (the test suite's).
    """
    import ray

    if ray.is_initialized():
        return
    extra_env = dict((overrides.pop("runtime_env", None) or {}).get("env_vars", {}))
    if os.environ.get("RAY_ADDRESS") and "address" not in overrides:
        # Keys already in our environment came with the job's runtime_env, and Ray refuses a
        # driver runtime_env that sets them again. GLOO_SOCKET_IFNAME is the nodes' business
        # (cluster/ manifests set it when gloo's own choice is wrong), never loopback here.
        env = {k: v for k, v in {**WORKER_ENV, **extra_env}.items() if k not in os.environ}
        ray.init(runtime_env={"env_vars": env}, **overrides)
        return
    kwargs: dict[str, Any] = {
        # "local": always a new instance. Without it ray.init joins a `ray start` cluster running
        # on this host, with loopback gloo and a dashboard port it rejects.
        "address": "local", "num_cpus": local_cpus(),
        # The dashboard serves the State API that Train V2's PlacementGroupCleaner polls (without
        # it: "Failed to query Ray Train Controller actor state" every few seconds and no
        # clean-up of orphaned placement groups) and the Ray dashboard users expect; loopback only.
        "include_dashboard": True, "dashboard_host": "127.0.0.1",
    }
    kwargs.update(overrides)
    env = {**WORKER_ENV, **{k: v for k, v in LOCAL_ENV.items() if k not in os.environ}}
    # Workers must import ray_pinet even when it runs from a checkout that is not installed.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    # One machine: gloo over loopback (its default interface lookup fails in containers).
    env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    if not kwargs["include_dashboard"]:
        env.update(extra_env)
        ray.init(runtime_env={"env_vars": env}, **kwargs)
        return
    chosen = "dashboard_port" not in kwargs
    for attempt in range(2):
        if chosen:
            # 8265 when free; on a retry whatever free port the OS picks.
            kwargs["dashboard_port"] = free_local_port(8265 if attempt == 0 else 0)
        # The cleaner finds the State API by auto-detection, which with a second Ray instance on
        # the machine picks the other one, does not find our controller there and removes our
        # workers' placement group (seen: a retrain beside a `ray start --head` cluster died with
        # "placement group was removed"); naming our dashboard pins it to ours.
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{kwargs['dashboard_port']}"
        try:
            ray.init(runtime_env={"env_vars": {**env, **extra_env}}, **kwargs)
            return
        except Exception as exc:
            # Two instances starting at once both find 8265 free, and the second dashboard
            # fails to bind (after a minute): start again on another port.
            if not chosen or attempt == 1 or "dashboard" not in str(exc):
                raise
            ray.shutdown()


def free_local_port(preferred: int) -> int:
    """``preferred`` when it is free on 127.0.0.1, else a free port the OS picks."""
    import socket

    for candidate in (preferred, 0):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free TCP port on 127.0.0.1")
