"""MLflow Model Registry: register a run's served model with the tags a reader needs to know
what it was trained on (dataset, stratification and its statistics, the objective it won on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


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


def register_run(uri: str, run_id: str, model_name: str, tags: dict[str, str],
                 data_path: Optional[str]) -> dict:
    """Register ``runs:/<run_id>/model`` as a new version of ``model_name`` with ``tags`` plus the
    stratification tags of ``data_path``. Idempotent: a rerun (resumed sweep, resubmitted job)
    finds the version it registered before instead of adding another. Returns name, version,
    models:/ URI and tags."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        existing = client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'")
    except Exception:  # the registered model does not exist yet
        existing = []
    tags = {"source_run": run_id, **tags, **stratum_tags(data_path)}
    if existing:
        mv = existing[0]
    else:
        mlflow.set_tracking_uri(uri)
        mv = mlflow.register_model(f"runs:/{run_id}/model", model_name, tags=tags)
    for k, v in tags.items():
        client.set_model_version_tag(model_name, mv.version, k, v)
    return {"name": model_name, "version": str(mv.version), "uri": f"models:/{model_name}/{mv.version}",
            "tags": tags}


def register_best(uri: str, run_id: str, model_name: str, sweep: str, trial_dir: str,
                  objective: float, data_path: Optional[str]) -> dict:
    """A sweep's winner: registered with the sweep name and its objective value."""
    out = register_run(uri, run_id, model_name, {"sweep": sweep, "objective": f"{objective:.6g}"}, data_path)
    return {**out, "sweep_dir": trial_dir}
