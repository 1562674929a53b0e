"""Shared fixtures: one local Ray instance for the whole session, paths to the real datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAY_PINET_SHARED_DATA", REPO.parent / "shared" / "data"))
BUNDLED_DATA = REPO / "data"

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where torch sees a CUDA device (CI has none: they skip)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs CUDA: torch {torch.__version__} sees no CUDA device here")
    for item in gpu:
        item.add_marker(skip)


def shared_file(rel: str) -> Path:
    """A file under ../shared/data; the test is skipped (with the path) when it is absent."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"real dataset not found: {p} (set RAY_PINET_SHARED_DATA)")
    return p


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every test that needs Ray (start-up costs ~4 s)."""
    import ray

    # The commands' own start-up (ray_pinet.local_ray.start_ray: dashboard on 127.0.0.1 for the
    # State API that Train V2's placement-group cleaner polls, gloo on loopback, the State API
    # pinned to this instance and not the tests/submit cluster beside it), with 4 logical CPUs
    # (Train workers and Ray Data both scheduled on 2 cores, ray-notes §6), a smaller object
    # store and worker logs kept off the test output; address="local": a new instance even when
    # RAY_ADDRESS names a cluster.
    from ray_pinet.local_ray import start_ray

    start_ray(address="local", num_cpus=4, object_store_memory=1_500_000_000, log_to_driver=False)
    yield ray
    ray.shutdown()


DEV_PREPARE = REPO / "configs/prepare/ml-latest-small-dev.yaml"


def small_run_args(tmp: Path, uri: str, prepare: Path = DEV_PREPARE) -> list[str]:
    """--set flags of the end-to-end tests: by default a quarter of the bundled ml-latest-small's
    users (``DEV_PREPARE``: 170 whole users, same shape, a quarter of the cost per epoch) prepared
    into ``tmp``, a tiny SASRec, runs and the MLflow store under ``tmp``."""
    return [
        "--config", str(REPO / "configs/ml-latest-small.yaml"),
        "--set", f"data.path={tmp / 'prepared'}",
        "--set", f"data.prepare={prepare}",
        "--set", f"run.storage_path={tmp / 'runs'}", "--set", "run.progress=false",
        "--set", "model.dim=16", "--set", "model.num_blocks=1", "--set", f"tracking.tracking_uri={uri}",
    ]


def run_cli_in_repo(args: list[str]) -> int:
    """``ray-pinet ARGS`` in-process from the repo root (prepare configs write relative to it)."""
    from ray_pinet.cli import main

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return main(args)
    finally:
        os.chdir(cwd)


def wait_for_http(url: str, proc, log: Path, seconds: float, what: str) -> None:
    """Poll ``url`` until it answers; fail with the tail of ``log`` when ``proc`` exits first or
    ``seconds`` pass (``proc`` is killed then)."""
    import time
    import urllib.request

    deadline = time.time() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)


def stop_process(proc, timeout: float = 30) -> None:
    """terminate(), then kill() when it has not exited within ``timeout`` seconds."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
