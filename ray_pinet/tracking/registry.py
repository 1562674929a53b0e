"""MLflow Model Registry: register a run's served model with the tags a reader needs to know what it was
trained on (dataset, stratification and its statistics, the objective it won on), and mark the version that
serves with the alias ``@champion`` (MLflow's convention): the first training, a Tune winner and a retrain
candidate that passes the gate take it; a rejected candidate is registered without it. ``retrain`` warm-starts
from and gates against ``models:/NAME@champion``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ray_pinet.config_base import ConfigError
from ray_pinet.tracking.mlflow_utils import filter_literal

CHAMPION = "champion"


class RegistryError(ConfigError):
    """The model registry could not be read or written (unreachable, refused, or a registered
    version ray-pinet cannot use). Never read as "no registered model": that would register a
    candidate as a first training, past the gate."""


def registry_failure(uri: str, model_name: str, exc: BaseException, doing: str = "read") -> RegistryError:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return RegistryError(f"could not {doing} the model registry at {uri} for model {model_name!r}: {text[:400]}")


def _ask(uri: str, model_name: str, call, missing: tuple[str, ...] = ()):
    """``call()``; None on an MlflowException coded ``missing``; any other error a RegistryError."""
    from mlflow.exceptions import MlflowException

    try:
        return call()
    except MlflowException as exc:
        if exc.error_code in missing:
            return None
        raise registry_failure(uri, model_name, exc) from exc
    except Exception as exc:  # connection errors that MLflow did not wrap
        raise registry_failure(uri, model_name, exc) from exc


def model_versions(uri: str, model_name: str) -> Optional[list]:
    """Every version of the registered model ``model_name``; None when the registry has no model
    of that name or it has no version. Any other registry error is a ``RegistryError``."""
    from mlflow.tracking import MlflowClient

    literal = filter_literal(model_name)  # a name no filter can express fails before any request
    client = MlflowClient(tracking_uri=uri)
    if _ask(uri, model_name, lambda: client.get_registered_model(model_name),
            ("RESOURCE_DOES_NOT_EXIST",)) is None:
        return None
    found = _ask(uri, model_name, lambda: client.search_model_versions(f"name={literal}"))
    return [v for v in found if v.name == model_name] or None


def stratum_tags(data_path: Optional[str]) -> dict[str, str]:
    """Tags describing the stratification of a prepared-data directory (its strata.json)."""
    if not data_path or not (Path(data_path) / "strata.json").exists():
        return {}
    strata = json.loads((Path(data_path) / "strata.json").read_text())
    tags = {"dataset": Path(data_path).name, "strata.mode": str(strata["mode"]),
            "strata.num_strata": str(strata["num_strata"]),
            "strata.thresholds": json.dumps(strata.get("thresholds", {}), sort_keys=True)}
    for s in strata["strata"]:
        tags[f"strata.{s['name']}"] = json.dumps(
            {k: s[k] for k in ("users", "interactions", "user_share", "interaction_share",
                               "min_activeness", "max_activeness") if k in s}, sort_keys=True)
    return tags


def champion(uri: str, model_name: str):
    """The version of ``model_name`` that holds ``@champion``; None when no version does (no
    model, or one registered before aliases). Other registry errors are a ``RegistryError``."""
    from mlflow.tracking import MlflowClient

    return _ask(uri, model_name,
                lambda: MlflowClient(tracking_uri=uri).get_model_version_by_alias(model_name, CHAMPION),
                ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"))


def register_run(uri: str, run_id: str, model_name: str, tags: dict[str, str],
                 data_path: Optional[str], make_champion: Optional[bool] = None) -> dict:
    """Register ``runs:/<run_id>/model`` as a new version of ``model_name`` with ``tags`` plus the
    stratification tags of ``data_path``. Idempotent: a rerun (resumed sweep, resubmitted job)
    finds the version it registered before instead of adding another. ``make_champion``: True
    moves ``@champion`` to this version, False leaves the alias where it is, None (a plain
    training) gives it the alias only when no version holds it yet (the first training).
    Returns name, version, models:/ URI (by version), champion (bool) and tags."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    existing = [v for v in model_versions(uri, model_name) or [] if v.run_id == run_id]
    tags = {"source_run": run_id, **tags, **stratum_tags(data_path)}
    if existing:
        mv = existing[0]
    else:
        mlflow.set_tracking_uri(uri)
        mv = mlflow.register_model(f"runs:/{run_id}/model", model_name, tags=tags)
    for k, v in tags.items():
        client.set_model_version_tag(model_name, mv.version, k, v)
    if make_champion is None:
        make_champion = champion(uri, model_name) is None
    if make_champion:
        client.set_registered_model_alias(model_name, CHAMPION, mv.version)
    current = champion(uri, model_name)
    return {"name": model_name, "version": str(mv.version), "uri": f"models:/{model_name}/{mv.version}",
            "champion": current is not None and str(current.version) == str(mv.version), "tags": tags}


def register_best(uri: str, run_id: str, model_name: str, sweep: str, trial_dir: str,
                  objective: float, data_path: Optional[str]) -> dict:
    """A sweep's winner: registered with the sweep name and its objective value."""
    out = register_run(uri, run_id, model_name, {"sweep": sweep, "objective": f"{objective:.6g}"}, data_path,
                       make_champion=True)
    return {**out, "sweep_dir": trial_dir}
