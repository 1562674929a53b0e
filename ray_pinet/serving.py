"""The served form of a trained model.

``ScoringModule``: one tensor in, catalogue scores out. Its input is a single int64 matrix: column 0 is the
user's stratum (-1 = unknown user -> routed to ``unseen_stratum``, the tail plugin by default), columns 1..L
are the last L items (item indices, oldest first, left-padded with 0). Output: float32 [B, M+1] scores over
the catalogue (column 0, the padding item, is -inf).

What ray-pinet logs to MLflow and registers is not this module but ``served_model.py``
(``log_served_pyfunc``): an MLflow pyfunc on raw ids carrying ``export_scoring``'s graph of the module
(``torch.export``: the plugins route by a gather, no data-dependent control flow). ``load_program`` gets the
graph back for callers that hold item indices.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ray_pinet.data.prepared import by_user_idx, read_split


class ScoringModule(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, unseen_stratum: int = 0):
        super().__init__()
        self.model = model
        self.unseen_stratum = int(unseen_stratum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x).to(torch.int64)
        # No data-dependent Python control flow on this path (``export``): unknown users by
        # torch.where, the padding column by a constant mask.
        stratum = torch.where(x[:, 0] < 0, self.unseen_stratum, x[:, 0])
        history = x[:, 1:]
        with torch.no_grad():
            scores = self.model.predict(history, stratum if self.model.use_plugins else None, None)
        pad = torch.zeros_like(scores[:1])
        pad[:, 0] = -torch.inf
        return scores + pad


def static_routing(model: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """Set every plugin module of ``model`` to route rows with a gather (``layers.route``):
    the form that ``torch.export`` traces. Returns ``model``."""
    for m in model.modules():
        if hasattr(m, "static_routing"):
            m.static_routing = on
    return model


def export_scoring(module: ScoringModule, max_len: int):
    """``torch.export`` of a ScoringModule (eval mode, static routing) for any batch size:
    an ``ExportedProgram`` taking Long[B, 1 + max_len], returning Float[B, M+1]. Raises when the
    model's scoring path cannot be traced (DIN: candidates only, no full catalogue)."""
    from torch.export import Dim, export

    module.eval()
    static_routing(module.model)
    example = torch.zeros((2, 1 + max_len), dtype=torch.int64)
    example[:, 0] = torch.tensor([0, -1])
    example[:, -3:] = torch.tensor([[1, 2, 3], [3, 2, 1]])
    with torch.no_grad():
        return export(module, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=1 << 20)},))


def serving_users(path, max_len: int):
    """The user table the served model carries (``served_model.py``): user_id, stratum, history
    (the user's last ``max_len`` item indices, oldest first: the test split's history and target,
    or the validation split's for a user without a test row) and seen (every distinct item index
    up to that point). Users with neither row keep their stratum and an empty history."""
    root = Path(path)
    users = pq.read_table(root / "users.parquet", columns=["user_idx", "user_id", "stratum"])
    stratum = by_user_idx(users, "stratum", root / "users.parquet").astype(np.int8)
    n = len(stratum)
    history: list = [[] for _ in range(n)]
    seen: list = [[] for _ in range(n)]
    for split in ("valid", "test"):  # test last: it overrides the validation row
        t = read_split(root, split).select(["user_idx", "history", "target", "seen"]).to_pydict()
        for u, h, y, s in zip(t["user_idx"], t["history"], t["target"], t["seen"]):
            history[u] = (h + [y])[-max_len:]
            seen[u] = sorted(set(s) | {y})
    return pa.table({"user_id": users.column("user_id"), "stratum": pa.array(stratum, pa.int8()),
                     "history": pa.array(history, pa.list_(pa.int32())),
                     "seen": pa.array(seen, pa.list_(pa.int32()))})


def log_served_pyfunc(uri: str, run_id: str, module: ScoringModule, max_len: int, data_path,
                      registered_model_name=None, k: int = 10) -> str:
    """Log the served model of ``run_id`` as ``model``: ``served_model.py`` (an MLflow pyfunc
    logged as code, nothing pickled) with the exported scoring graph, the item vocabulary and the
    serving user table (``serving_users``) as artifacts. Returns the model URI."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    root = Path(data_path)
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "scoring.pt2"
        torch.export.save(export_scoring(module, max_len), program)
        users = Path(tmp) / "users.parquet"
        table = serving_users(root, max_len)
        pq.write_table(table, users)
        # a copy: in a restratified view items.parquet is a link out of the folder, which MLflow
        # refuses to log ("resolved path is outside the artifact directory")
        vocab = Path(tmp) / "items.parquet"
        shutil.copyfile(root / "items.parquet", vocab)
        items = pq.read_table(vocab, columns=["item_id"]).column("item_id")
        example = pd.DataFrame({"user_id": [table.column("user_id")[0].as_py(), "an unknown user"],
                                "items": [[], [items[0].as_py(), "an unknown item"]]})
        # Both columns optional (a user id, recent items, or both), k a request parameter.
        signature = ModelSignature(
            inputs=Schema([ColSpec("string", "user_id", required=False),
                           ColSpec(Array("string"), "items", required=False)]),
            params=ParamSchema([ParamSpec("k", "long", k)]))
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(Path(__file__).with_name("served_model.py")),
                artifacts={"program": str(program), "items": str(vocab), "users": str(users)},
                model_config={"k": k, "max_len": max_len, "num_strata": int(module.model.num_strata)},
                input_example=example, signature=signature,
                registered_model_name=registered_model_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}",
                                  "pandas", "numpy", "pyarrow"],
            )
    # start_run(run_id) ends the run as FINISHED on exit; the caller decides the final status.
    return info.model_uri


def load_program(model_uri: str):
    """The index-level scoring graph of a served model (``runs:/.../model``, ``models:/...``):
    a callable Long[B, 1 + L] -> Float[B, M + 1], for callers that hold item indices (batch
    scoring, evaluation). The raw-id interface is ``mlflow.pyfunc.load_model(model_uri)``."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    found = sorted(local.rglob("scoring.pt2"))
    if not found:
        raise FileNotFoundError(f"{model_uri} holds no scoring.pt2: it was logged by an older ray-pinet "
                                "(a pickled ScoringModule): log it again with this version")
    return torch.export.load(found[0]).module()
