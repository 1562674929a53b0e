"""MLflow: one run per training run, found again by name so a rerun resumes the same run.

Default store: a SQLite database beside the Ray Train storage (MLflow 3 rejects the old
``./mlruns`` file store); ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` override it.
The driver creates the run and logs params / config / artifacts / the model; rank 0 of the
workers logs per-epoch metrics into the same run id (``worker.py``).
"""

from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from ray_pinet import storage_uri
from ray_pinet.checkpoint_io import save_weights
from ray_pinet.config_base import ConfigError, flatten

RUN_NAME_TAG = "ray_pinet.run_name"
# The served model's weights as plain data, beside the pickled served model: what `retrain` warm
# starts from (read with torch.load(weights_only=True), so no project class is unpickled). A dict
# {format, config (TrainConfig as a dict), meta (RunMeta fields), model (RecModel state dict),
# use_plugins}: ``training.trainer.rebuild_model`` builds the model from it.
MODEL_STATE_ARTIFACT = "model_state/state.pt"
MODEL_STATE_FORMAT = "ray-pinet-model-state/1"


def filter_literal(value: str) -> str:
    """``value`` as a string literal of an MLflow filter string. MLflow has no escape sequence: it
    strips the enclosing quotes and compares the rest verbatim, so a value is enclosed in the
    quote character it does not contain (pasting it unquoted, a single quote in a model name
    broke the filter, and the error read as "no such model")."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ConfigError(f"{value!r} holds both quote characters, which MLflow's search filters cannot "
                      "express: choose a model / run name without one of them")


def resolve_tracking_uri(explicit: Optional[str], storage_path: str) -> str:
    explicit = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        return explicit
    # SQLite cannot live in object storage: with a URI storage_path the default store is the
    # default storage_path's own, runs/mlflow.db under the working directory (README "Object storage").
    root = Path("runs" if storage_uri.is_remote(storage_path) else storage_uri.local_path(storage_path))
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


@functools.lru_cache(maxsize=16)
def _client(uri: str):
    # one client per URI: the workers' per-epoch logging goes through log_metrics
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # Artifacts beside the database, not in ./mlruns of whatever directory we run from.
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_or_resume_run(uri: str, experiment: str, run_name: str, config: dict[str, Any],
                        tags: Optional[dict[str, str]] = None, parent_run_id: Optional[str] = None,
                        fresh: bool = False, free: tuple[str, ...] = ()) -> tuple[str, bool]:
    """(run_id, resumed). A run tagged with ``run_name`` that did not finish is resumed when its
    params are this ``config``'s (keys under a ``free`` dotted prefix may differ, keys only one
    side has are not compared); otherwise, or with ``fresh``, a new run is created: a resumed
    run keeps the params it was created with, which must be what trains in it."""
    client = _client(uri)
    exp_id = experiment_id(uri, experiment)
    found = _latest_run(client, exp_id, run_name)
    params = {k[:250]: str(v)[:6000] for k, v in flatten(config).items()}
    if found and found[0].info.status != "FINISHED" and not fresh:
        old = found[0].data.params
        if all(old[k] == v for k, v in params.items()
               if k in old and not any(k == f or k.startswith(f + ".") for f in free)):
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id, True
    all_tags = {RUN_NAME_TAG: run_name, "mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(params), 90):
        client.log_batch(run_id, params=params[i : i + 90])
    client.log_text(run_id, json.dumps(config, indent=2, sort_keys=True), "config.json")
    return run_id, False


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    import time

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k.replace("@", "_at_"), float(v), ts, step) for k, v in metrics.items()]
    client = _client(uri)
    for i in range(0, len(batch), 900):
        client.log_batch(run_id, metrics=batch[i : i + 900])


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: Optional[str] = None) -> None:
    _client(uri).log_artifact(run_id, str(path), artifact_path)


@contextmanager
def failed_on_error(uri: Optional[str], run_id: Optional[str]):
    """The run is marked FAILED when the body raises (the exception goes on); nothing without a run."""
    try:
        yield
    except BaseException:
        if uri and run_id:
            finish_run(uri, run_id, status="FAILED")
        raise


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


def log_model_state(uri: str, run_id: str, config: dict, meta: dict, model_state: dict,
                    use_plugins: bool) -> None:
    """Log a model's weights as plain data to ``MODEL_STATE_ARTIFACT`` of ``run_id``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / Path(MODEL_STATE_ARTIFACT).name
        save_weights({"format": MODEL_STATE_FORMAT, "config": config, "meta": meta, "model": model_state,
                      "use_plugins": bool(use_plugins)}, f)
        _client(uri).log_artifact(run_id, str(f), str(Path(MODEL_STATE_ARTIFACT).parent))


def find_run(uri: str, experiment: str, run_name: str) -> Optional[str]:
    """The id of the latest run tagged with ``run_name`` (None if there is none)."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = _latest_run(client, exp.experiment_id, run_name)
    return found[0].info.run_id if found else None


def _latest_run(client, exp_id: str, run_name: str) -> list:
    return client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = {filter_literal(run_name)}",
                              order_by=["attributes.start_time DESC"], max_results=1)
