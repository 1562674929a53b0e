"""A real S3-compatible server on 127.0.0.1 for the object-storage tests: moto's server mode
(the ``moto[server]`` test extra), started once per session, with fake credentials in the
standard AWS_* environment variables and one bucket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from ray_pinet.local_ray import free_local_port
from tests.conftest import stop_process

BUCKET = "ray-pinet-test"
_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The endpoint URL of a moto S3 server holding the empty bucket ``BUCKET``; AWS_* and
    RAY_PINET_SCRATCH (local staging and caches under the session's tmp) set while it runs."""
    # moto[server] is a declared test extra (pip install -e '.[test]'): a missing one fails here,
    # it is never skipped, so CI cannot pass without running the object-storage tests.
    import moto.server  # noqa: F401
    import pyarrow.fs as pafs

    port = free_local_port(0)
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {**_ENV, "AWS_ENDPOINT_URL": endpoint,
           "RAY_PINET_SCRATCH": str(tmp_path_factory.mktemp("scratch"))}
    saved = {k: os.environ.get(k) for k in (*env, "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN")}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        for k in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN"):
            os.environ.pop(k, None)
        os.environ.update(env)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                          secret_key="testing", region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_process(proc, timeout=10)
