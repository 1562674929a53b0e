"""``ray-pinet submit``: run a command as a Ray Job, stream its logs, return its outcome.

All Ray Jobs SDK calls of the project live here. The job's working directory is uploaded
(``runtime_env.working_dir``) without the big local outputs (``DEFAULT_EXCLUDES``; Ray's upload limit is
512 MiB, and the directory's ``.gitignore`` is respected as well). The bundled ``data/`` is kept, so configs
with repo-relative paths work in the job.

No ``pip`` section by default: the cluster's Python environment (the image or the virtual environment
``ray start`` runs from) is expected to have ray-pinet's dependencies already, and the entrypoint's ``python``
is the first one on the cluster's ``PATH``. ``--requirements FILE`` adds a ``pip`` runtime env (installed per
job, slow).

Submission ids are idempotent: a job whose id already exists is not submitted again. A running or pending one
is attached to (its logs are tailed); a finished one is reported as it ended (use a new id to rerun).

Auth: our clusters run with token auth on (``RAY_AUTH_MODE=token``). The SDK sends a token by itself only when
this process has ``RAY_AUTH_MODE=token`` (it then reads ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``); ``submit`` sends the same token in its own reachability check, and ``RAY_AUTH_TOKEN``
/ the file named by ``RAY_AUTH_TOKEN_PATH`` whenever one is set, whatever the local auth mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shlex
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# gitignore-style patterns relative to the working dir; a leading "/" anchors at its root.
DEFAULT_EXCLUDES = [
    ".venv", ".git", "/runs", "/mlruns", "/prepared", "/reports", "/artifacts",
    "*.db", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info",
]
# Environment forwarded from the submitting shell into the job (when set).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI",)
FORWARDED_ENV_PREFIX = "RAY_PINET_"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LOG_TAIL_LINES = 50


class SubmitError(RuntimeError):
    """The job could not be submitted / followed (bad address, bad arguments, server error)."""


@dataclass
class JobOutcome:
    submission_id: str
    status: str                      # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    exit_code: Optional[int]         # the driver's exit code (JobDetails.driver_exit_code)
    message: str
    logs_tail: str                   # the last LOG_TAIL_LINES lines of the job's output
    address: str = ""
    attached: bool = False           # the id existed: followed / reported, not resubmitted
    interrupted: bool = False        # Ctrl-C while following
    waited: bool = True              # False with wait=False (--no-wait)

    @property
    def cli_exit_code(self) -> int:
        """SUCCEEDED -> 0, FAILED -> the driver's exit code (or 1), STOPPED -> 1, Ctrl-C -> 130,
        not waited for (--no-wait) -> 0."""
        if self.interrupted:
            return 130
        if self.status == "SUCCEEDED":
            return 0
        if self.status == "FAILED":
            code = self.exit_code
            if code is None or code == 0:
                return 1
            return 128 - code if code < 0 else min(code, 255)  # killed by signal N -> 128 + N
        return 1 if self.status == "STOPPED" or self.waited else 0

    def status_line(self) -> str:
        code = "unknown" if self.exit_code is None else str(self.exit_code)
        return f"job {self.submission_id}: {self.status} (exit {code})"


def resolve_address(address: Optional[str]) -> str:
    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    return address.rstrip("/")


def auth_headers() -> dict:
    """The ``Authorization`` header the SDK would send (module docstring, "Auth"), for the
    reachability check in ``connect``."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and not path and os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        default = Path.home() / ".ray" / "auth_token"
        path = str(default) if default.is_file() else None
    if not token and path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise SubmitError(f"cannot read RAY_AUTH_TOKEN_PATH={path}: {exc}") from exc
    return {"Authorization": f"Bearer {token}"} if token else {}


def build_runtime_env(working_dir: str, requirements: Union[Sequence[str], str, None],
                      env: dict, excludes: Sequence[str] = ()) -> dict:
    wd = Path(working_dir).expanduser().resolve()
    if not wd.is_dir():
        raise SubmitError(f"working dir {working_dir} is not a directory")
    env_vars = {k: v for k, v in os.environ.items()
                if k in FORWARDED_ENV or k.startswith(FORWARDED_ENV_PREFIX)}
    env_vars.update({str(k): str(v) for k, v in (env or {}).items()})
    runtime_env: dict = {"working_dir": str(wd), "excludes": DEFAULT_EXCLUDES + list(excludes or []),
                         "env_vars": env_vars}
    if requirements:
        if isinstance(requirements, str):
            req = Path(requirements).expanduser().resolve()
            if not req.is_file():
                raise SubmitError(f"requirements file {requirements} not found")
            runtime_env["pip"] = str(req)
        else:
            runtime_env["pip"] = list(requirements)
    return runtime_env


def new_submission_id() -> str:
    return f"ray-pinet-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def _explicit_address() -> Iterator[None]:
    """The SDK replaces any address by ``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS``; the
    address resolved here (argument first) must win, so they are hidden while it connects."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: Optional[str] = None, connect_timeout: float = 10.0):
    """A ``JobSubmissionClient`` for ``address``; ``SubmitError`` naming it when unreachable."""
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    headers = auth_headers()
    if address.startswith(("http://", "https://")):
        # Fail fast (the SDK's own requests have no timeout) with the address in the message.
        import requests

        try:
            r = requests.get(f"{address}/api/version", headers=headers, timeout=(connect_timeout, 30))
        except requests.exceptions.RequestException as exc:
            raise SubmitError(f"cannot reach the Ray dashboard / job server at {address}: "
                              f"{type(exc).__name__}: {exc}") from exc
        if r.status_code in (401, 403):
            raise SubmitError(f"the Ray cluster at {address} refused the request ({r.status_code}): "
                              "token auth is on; give this shell the cluster's token "
                              "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or RAY_AUTH_MODE=token "
                              "with ~/.ray/auth_token)")
        if r.status_code != 200:
            raise SubmitError(f"{address} does not look like a Ray job server "
                              f"(GET /api/version -> {r.status_code})")
    try:
        with _explicit_address():
            return JobSubmissionClient(address, headers=headers or None)
    except Exception as exc:  # ConnectionError, AuthenticationError, version errors
        raise SubmitError(f"cannot connect to the Ray job server at {address}: {exc}") from exc


def _status(client, submission_id: str):
    """The job's JobDetails, or None when no job has this id."""
    try:
        return client.get_job_info(submission_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            return None
        raise


class _Printer:
    """Writes log chunks to stdout as they come and keeps the last lines and the char count."""

    def __init__(self) -> None:
        self.chars = 0
        self.tail: deque = deque(maxlen=LOG_TAIL_LINES)
        self._partial = ""

    def write(self, chunk: str) -> None:
        if not chunk:
            return
        sys.stdout.write(chunk)
        sys.stdout.flush()
        self.chars += len(chunk)
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        self.tail.extend(lines)

    def text(self) -> str:
        return "\n".join(list(self.tail) + ([self._partial] if self._partial else []))


async def _tail(client, submission_id: str, printer: _Printer) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        printer.write(chunk)


def _follow(client, submission_id: str, printer: _Printer, poll_s: float = 1.0):
    """Stream the logs until the job ends, then poll until its status is terminal."""
    try:
        asyncio.run(_tail(client, submission_id, printer))
    except (KeyboardInterrupt, asyncio.CancelledError):
        raise KeyboardInterrupt from None
    except Exception as exc:  # websocket trouble: fall back to polling, print the rest at the end
        print(f"[ray-pinet submit] log streaming stopped ({type(exc).__name__}: {exc}); "
              "waiting for the job to finish", file=sys.stderr)
    while True:
        info = client.get_job_info(submission_id)
        if str(info.status) in TERMINAL:
            break
        time.sleep(poll_s)
    try:  # anything the stream did not deliver
        logs = client.get_job_logs(submission_id) or ""
        if len(logs) > printer.chars:
            printer.write(logs[printer.chars:])
    except Exception:
        pass
    return info


def _outcome(info, submission_id: str, address: str, printer: Optional[_Printer] = None,
             logs: str = "", **kw) -> JobOutcome:
    tail = printer.text() if printer is not None else "\n".join(logs.splitlines()[-LOG_TAIL_LINES:])
    return JobOutcome(submission_id=submission_id, status=str(info.status),
                      exit_code=getattr(info, "driver_exit_code", None),
                      message=info.message or "", logs_tail=tail, address=address, **kw)


def submit(entrypoint: Sequence[str], address: Optional[str] = None, working_dir: str = ".",
           requirements: Union[Sequence[str], str, None] = None, env: Optional[dict] = None,
           submission_id: Optional[str] = None, wait: bool = True, excludes: Sequence[str] = (),
           stop_on_interrupt: bool = False, connect_timeout: float = 10.0) -> JobOutcome:
    """Submit ``entrypoint`` (argv list, joined with ``shlex.join``) as a Ray Job and follow it.

    With ``wait`` the job's logs are printed as they come and the call returns when the job
    has ended; on Ctrl-C the job keeps running (or is stopped with ``stop_on_interrupt``) and
    the outcome has ``interrupted=True``.
    """
    if not entrypoint:
        raise SubmitError("no entrypoint given")
    address = resolve_address(address)
    runtime_env = build_runtime_env(working_dir, requirements, env or {}, excludes)
    uri = runtime_env["env_vars"].get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("sqlite:///", "file:")) and not uri.startswith(("sqlite:////", "file:///")):
        print(f"[ray-pinet submit] warning: MLFLOW_TRACKING_URI={uri} is relative: it resolves in "
              "the job's temporary copy of the working dir", file=sys.stderr)
    client = connect(address, connect_timeout)
    sid = submission_id or new_submission_id()

    info = _status(client, sid) if submission_id else None
    attached = info is not None
    if not attached:
        try:
            client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env=runtime_env,
                              submission_id=sid)
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise SubmitError(f"job submission to {address} failed: {exc}") from exc
            attached = True  # submitted by someone else in between
        except ValueError as exc:  # runtime env validation (e.g. a too-big working dir)
            raise SubmitError(f"job submission to {address} failed: {exc}") from exc
        info = client.get_job_info(sid)

    if attached and str(info.status) in TERMINAL:
        print(f"job {sid} already exists and has finished ({info.status}); not resubmitted "
              "(use a new --submission-id to run it again)")
        logs = ""
        with contextlib.suppress(Exception):
            logs = client.get_job_logs(sid) or ""
        return _outcome(info, sid, address, logs=logs, attached=True)
    if attached:
        print(f"job {sid} already exists ({info.status}): following it instead of resubmitting")
    else:
        print(f"submitted job {sid} to {address}")
    sys.stdout.flush()
    if not wait:
        print(f"follow it: ray job logs --follow {sid} --address {address}\n"
              f"stop it:   ray job stop {sid} --address {address}")
        return _outcome(info, sid, address, attached=attached, waited=False)

    printer = _Printer()
    try:
        info = _follow(client, sid, printer)
    except KeyboardInterrupt:
        print()
        if stop_on_interrupt:
            print(f"interrupted: stopping job {sid} ...", flush=True)
            info = _stop_and_wait(client, sid)
        else:
            print(f"interrupted: job {sid} keeps running on the cluster.\n"
                  f"  follow it: ray job logs --follow {sid} --address {address}\n"
                  f"  stop it:   ray job stop {sid} --address {address}", flush=True)
            info = client.get_job_info(sid)
        return _outcome(info, sid, address, printer, attached=attached, interrupted=True)
    return _outcome(info, sid, address, printer, attached=attached)


def _stop_and_wait(client, sid: str, timeout_s: float = 60.0):
    client.stop_job(sid)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            info = client.get_job_info(sid)
            if str(info.status) in TERMINAL:
                return info
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    return client.get_job_info(sid)


def add_submit_args(p) -> None:
    import argparse

    p.add_argument("--address", default=None,
                   help=f"Ray job server (dashboard) URL; default $RAY_ADDRESS, else {DEFAULT_ADDRESS}")
    p.add_argument("--working-dir", default=".",
                   help="directory uploaded as the job's working dir (default .); big local outputs "
                        "(.venv, runs/, mlruns/, prepared/, reports/, *.db) are excluded")
    p.add_argument("--requirements", default=None, metavar="FILE",
                   help="pip requirements installed for the job (default: none, the cluster already "
                        "has ray-pinet's dependencies)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job (repeatable); MLFLOW_TRACKING_URI and "
                        "RAY_PINET_* are forwarded from this shell when set")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="extra gitignore-style pattern left out of the upload (repeatable)")
    p.add_argument("--submission-id", default=None,
                   help="job id (default ray-pinet-<time>-<random>); an existing running id is "
                        "followed, a finished one reported, not rerun")
    p.add_argument("--no-wait", action="store_true", help="submit, print the id and return")
    p.add_argument("--stop-on-interrupt", action="store_true",
                   help="Ctrl-C stops the job (default: it keeps running on the cluster)")
    p.add_argument("entrypoint", nargs=argparse.REMAINDER,
                   help="-- COMMAND ...: the job's command, e.g. -- python jobs/train.py --smoke-test")


def run_submit_cli(args) -> int:
    entrypoint = list(args.entrypoint or [])
    if entrypoint[:1] == ["--"]:
        entrypoint = entrypoint[1:]
    if not entrypoint:
        print("ray-pinet submit: missing entrypoint: ray-pinet submit [OPTIONS] -- COMMAND [ARGS...]\n"
              "  e.g. ray-pinet submit -- python jobs/train.py --smoke-test", file=sys.stderr)
        return 2
    env = {}
    for kv in args.env:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            print(f"ray-pinet submit: --env expects KEY=VALUE, got {kv!r}", file=sys.stderr)
            return 2
        env[key] = value
    try:
        out = submit(entrypoint, address=args.address, working_dir=args.working_dir,
                     requirements=args.requirements, env=env, submission_id=args.submission_id,
                     wait=not args.no_wait, excludes=args.exclude,
                     stop_on_interrupt=args.stop_on_interrupt)
    except SubmitError as exc:
        print(f"ray-pinet submit: {exc}", file=sys.stderr)
        return 1
    if out.waited or out.status in TERMINAL:
        print(out.status_line())
        if out.status == "FAILED" and out.exit_code is None and out.message:
            # no driver exit code: the entrypoint never ran (e.g. the runtime env failed)
            print("  " + "\n  ".join(out.message.splitlines()[:20]))
    return out.cli_exit_code
