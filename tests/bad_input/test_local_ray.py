"""Issue 18 finding 7: local Ray starts the same way whichever command runs first in a process.

``train`` on a folder without prepared data prepares first; prepare used to start Ray itself
(no dashboard, only the machine's cores) and the trainer kept that instance. With two 1-CPU
training workers on a 2-core box Ray Data's read tasks then never got a CPU ("Cluster resources
are not enough ... may hang forever"), and without the dashboard Train's placement-group cleaner
printed "Failed to query Ray Train Controller actor state" every few seconds.

The end-to-end check runs the CLI in a fresh process (no Ray started yet), as a user does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, small_run_args

STATE_API_WARNING = "Failed to query Ray Train Controller actor state"
STARVED_WARNING = "Cluster resources are not enough"


PROBE = """
import json, urllib.request
import ray
from ray_pinet.data.ray_tasks import ensure_ray
ensure_ray()  # what `prepare` (and so `train` on a folder without prepared data) calls first
env = ray.get_runtime_context().runtime_env.get("env_vars", {})
api = env.get("RAY_API_SERVER_ADDRESS")
status = urllib.request.urlopen(api + "/api/gcs_healthz", timeout=10).status if api else None
print(json.dumps({"cpus": ray.cluster_resources().get("CPU"), "env": env, "dashboard": status}))
"""


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_")) and k != "GLOO_SOCKET_IFNAME"}
    # This checkout's code, not whatever ray_pinet the interpreter would find first.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return env


def test_prepare_starts_ray_as_train_does():
    """A fresh process whose first Ray user is the data layer gets the trainer's instance: the
    logical CPUs that leave Ray Data a budget beside the Train workers, the dashboard (State API)
    on 127.0.0.1 named to the workers, gloo on loopback, this checkout importable, and the Train
    controller's short local poll interval."""
    import json

    from ray_pinet.local_ray import local_cpus

    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=_clean_env(), capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["cpus"] == local_cpus() >= 4, got
    assert got["dashboard"] == 200, got
    assert got["env"]["RAY_API_SERVER_ADDRESS"].startswith("http://127.0.0.1:"), got
    assert got["env"]["GLOO_SOCKET_IFNAME"] == "lo", got
    assert str(REPO) in got["env"]["PYTHONPATH"].split(os.pathsep), got
    assert got["env"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.25", got  # Train's controller polls often


@pytest.mark.slow
def test_train_with_two_workers_preparing_first_finishes_without_warnings(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "ray_pinet.cli", "train", *small_run_args(tmp_path, uri),
           "--set", "run.name=first-run", "--set", "method=joint",
           "--set", "run.num_workers=2", "--set", "optim.max_epochs=1", "--set", "eval.every=1"]
    assert not (tmp_path / "prepared").exists()  # train must prepare first
    env = _clean_env()
    # Its own session: on a timeout the whole tree (raylet, GCS, workers) is ended with it.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    t0 = time.perf_counter()
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"train did not finish in 240 s (hung?); last output:\n{out[-4000:]}")
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, out[-4000:]
    assert "joint — test metrics per stratum" in out, out[-4000:]
    assert (tmp_path / "prepared" / "strata.json").is_file()
    assert STATE_API_WARNING not in out, f"{out.count(STATE_API_WARNING)} State API warnings"
    assert STARVED_WARNING not in out, out[-4000:]
    print(f"wall {wall:.1f} s")
