"""``ray-pinet submit`` against a real ``ray start --head`` cluster of its own: the smoke train
runs as a Ray Job (working dir uploaded, prepare + train + MLflow registration inside the job), a
failing job's driver exit code comes back as the CLI's exit code, a bad address fails fast.

The cluster is separate from the session's ``ray_cluster`` (tests/conftest.py) that may run in
this same pytest process: its own temp dir and ports (none of Ray's defaults), started with
``ray start --head --block`` in a process group of its own, and stopped by signalling that group
and killing the processes that belong to it (``ray stop`` would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ray_pinet.cli import main
from tests.conftest import DEV_PREPARE, REPO

pytestmark = pytest.mark.slow

RAY_DEFAULT_PORTS = {6379, 8265, 10001, 8076, 8077, 52365, 44217, 44227}


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    with ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < n:
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
            if p not in RAY_DEFAULT_PORTS:
                ports.append(p)
        return ports


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _worker_port_range(size: int = 100) -> tuple[int, int]:
    """A free range below the ephemeral ports (32768+) and above Ray's default 10002-19999."""
    for _ in range(50):
        lo = random.randrange(20000, 32000 - size)
        if all(_port_free(p) for p in range(lo, lo + size)):
            return lo, lo + size - 1
    raise RuntimeError("no free worker port range")


def _pids_of_cluster(temp_dir: str, gcs_port: int) -> list[int]:
    """Processes of this cluster: the temp dir in their command line (raylet, GCS, dashboard,
    workers) or its GCS port in their RAY_ADDRESS (job drivers; Ray advertises the host's IP)."""
    me, found = os.getpid(), []
    own_address = re.compile(rb"(^|\0)RAY_ADDRESS=[^\0]*:%d\0" % gcs_port)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmd or own_address.search(env):
            found.append(int(d.name))
    return found


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def cluster_token(tmp_path_factory) -> Path:
    """The file holding this cluster's token (owner-only), as `ray get-auth-token --generate`
    makes ~/.ray/auth_token; the user's own ~/.ray is left alone."""
    path = tmp_path_factory.mktemp("auth") / "auth_token"
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32))
    return path


@pytest.fixture(scope="module")
def submit_cluster(cluster_token):
    """``ray start --head`` on free, non-default ports with token auth on (RAY_AUTH_MODE=token,
    the token in ``cluster_token``), as the README's local cluster; yields the job server URL."""
    import requests

    temp_dir = f"/tmp/rp-submit-{os.getpid()}"
    shutil.rmtree(temp_dir, ignore_errors=True)
    (gcs, dash, client_srv, agent_listen, agent_grpc, metrics, rt_env, node_mgr,
     obj_mgr) = _free_ports(9)
    wlo, whi = _worker_port_range()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update({
        # Token auth on: GCS, raylet and the job server refuse any process without the token,
        # and the job's driver and workers inherit it from the node.
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster_token),
        # the job's `python` is the first on the cluster's PATH: this virtual environment's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "GLOO_SOCKET_IFNAME": "lo", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        # SIGTERM to `ray start --block` otherwise drains the node for up to 30 s first
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    })
    ray_bin = str(Path(sys.executable).parent / "ray")
    cmd = [
        ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
        "--num-cpus=4", "--object-store-memory=800000000", f"--temp-dir={temp_dir}",
        f"--ray-client-server-port={client_srv}", f"--dashboard-agent-listen-port={agent_listen}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={node_mgr}",
        f"--object-manager-port={obj_mgr}", f"--min-worker-port={wlo}", f"--max-worker-port={whi}",
        "--disable-usage-stats",
    ]
    os.makedirs(temp_dir, exist_ok=True)
    log = open(f"{temp_dir}/ray-start.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=temp_dir,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {proc.returncode}: "
                                   + Path(f"{temp_dir}/ray-start.log").read_text()[-3000:])
            try:
                r = requests.get(f"{address}/api/jobs/", timeout=(2, 10),
                                 headers={"Authorization": f"Bearer {cluster_token.read_text()}"})
                r.raise_for_status()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        # SIGTERM to `ray start --block` shuts its node down; then the whole process group,
        # then any straggler of this cluster (workers and drivers live in other sessions).
        _stop_cluster(proc, temp_dir, gcs)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_cluster(proc: subprocess.Popen, temp_dir: str, gcs_port: int) -> None:
    """SIGTERM to `ray start --block` (it stops its node: raylet first, then GCS, dashboard ...),
    then SIGKILL to its process group and to any process of this cluster still alive."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while (left := _pids_of_cluster(temp_dir, gcs_port)) and time.monotonic() < deadline:
        _kill(left, signal.SIGTERM if time.monotonic() < deadline - 5 else signal.SIGKILL)
        time.sleep(0.5)
    _kill(_pids_of_cluster(temp_dir, gcs_port), signal.SIGKILL)


@pytest.fixture
def client_env(monkeypatch, cluster_token):
    """The submitting side: token auth with the cluster's token, no inherited cluster address /
    MLflow."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster_token))
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(k, raising=False)


def test_cluster_refuses_a_client_without_its_token(submit_cluster, client_env, monkeypatch, capsys,
                                                    tmp_path):
    """Token auth stays on: the job server answers nothing to a client without the token or with
    another one, and ``submit`` says so in one line (issue 18: the README's cluster ran with
    RAY_AUTH_MODE=disabled, open to any process that reached it)."""
    (tmp_path / "wd").mkdir()
    (tmp_path / "other_token").write_text(secrets.token_hex(32))
    cmd = ["submit", "--address", submit_cluster, "--working-dir", str(tmp_path / "wd"), "--no-wait",
           "--", "python", "-c", "print(1)"]
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    assert main(cmd) == 1
    assert "refused the request (401)" in capsys.readouterr().err
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "other_token"))
    assert main(cmd) == 1
    assert "refused the request (403)" in capsys.readouterr().err


def test_bad_address_fails_fast_and_names_it(client_env, capsys):
    (port,) = _free_ports(1)  # nothing listens there
    addr = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    rc = main(["submit", "--address", addr, "--working-dir", str(REPO), "--", "python", "-c", "print(1)"])
    assert rc != 0
    assert time.monotonic() - t0 < 15
    assert addr in capsys.readouterr().err


def test_failing_job_returns_driver_exit_code(submit_cluster, client_env, capsys, tmp_path):
    # a tiny working dir: this job needs no code from the repo
    (tmp_path / "wd").mkdir()
    sid = f"rp-fail-{os.getpid()}-{random.randrange(10**6)}"
    args = ["submit", "--address", submit_cluster, "--working-dir", str(tmp_path / "wd"),
            "--submission-id", sid, "--", "python", "-c", "import sys; print('boom'); sys.exit(3)"]
    assert main(args) == 3  # JobDetails.driver_exit_code
    out = capsys.readouterr().out
    assert "boom" in out
    assert f"job {sid}: FAILED (exit 3)" in out
    # resubmitting a finished id does not rerun it: the old outcome comes back
    assert main(args) == 3
    out = capsys.readouterr().out
    assert "already exists and has finished (FAILED)" in out and "boom" not in out


def test_smoke_train_job_registers_a_model(submit_cluster, client_env, capsys, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main([
        "submit", "--address", submit_cluster, "--working-dir", str(REPO),
        # Ray's State API (Train's placement group cleaner) in the job's workers otherwise finds
        # this cluster and the session's ray_cluster on one host and refuses to pick one
        "--env", f"RAY_API_SERVER_ADDRESS={submit_cluster}", "--",
        "python", "jobs/train.py", "--smoke-test", "--config", "configs/ml-latest-small.yaml",
        "--set", f"data.path={tmp_path / 'prepared'}",
        "--set", f"data.prepare={DEV_PREPARE}",
        "--set", f"run.storage_path={tmp_path / 'runs'}", "--set", "run.progress=false",
        "--set", f"tracking.tracking_uri={uri}", "--set", "tracking.register_as=submit-model",
        # the job machinery is under test, not training: one joint epoch instead of 2 + 1 (pinet)
        "--method", "joint", "--set", "optim.max_epochs=1",
    ])
    out = capsys.readouterr().out
    assert rc == 0, out[-5000:]
    assert "test metrics per stratum" in out
    assert "registered: models:/submit-model/1" in out
    assert "SUCCEEDED (exit 0)" in out
    mv = MlflowClient(uri).get_model_version("submit-model", "1")
    assert "dataset" in mv.tags
    # the path to served recommendations, as a job too: the first registration took @champion
    assert "registered: models:/submit-model/1 (@champion)" in out
    rc = main(["submit", "--address", submit_cluster, "--working-dir", str(REPO),
               "--env", f"RAY_API_SERVER_ADDRESS={submit_cluster}", "--",
               "python", "jobs/recommend.py", "--model", "models:/submit-model@champion", "--tracking-uri", uri,
               "--output", str(tmp_path / "recs"), "--k", "5", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out[-5000:]
    summary = json.loads((tmp_path / "recs" / "_summary.json").read_text())
    assert summary["users_scored"] > 100 and summary["k"] == 5
    recs = pq.read_table(tmp_path / "recs")
    assert recs.num_rows == summary["users_scored"] and all(len(v) == 5 for v in recs.column("item_ids").to_pylist())
