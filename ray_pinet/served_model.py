"""The served model on raw ids: an MLflow pyfunc logged as *code* (MLflow's "models from code").

MLflow copies this file into the logged model and runs it when the model is loaded, so the
serving environment needs torch, numpy, pandas, pyarrow and mlflow, and nothing of ray-pinet: no
project class is pickled. Keep it that way: only third-party imports here.

Artifacts (written by ``ray_pinet.serving.log_served_pyfunc``):
  program  the exported scoring graph (``torch.export``, serving.export_scoring): Long[B, 1 + L]
           (column 0 the stratum, -1 = unknown user; then the last L item indices, left-padded
           with 0) -> Float[B, M + 1] scores over item indices (column 0, padding, is -inf)
  items    items.parquet of the prepared data: item_idx 1..M, item_id
  users    user_id, stratum, history (the last L item indices, oldest first), seen (every
           distinct item index the user has interacted with)

Request: a DataFrame with ``user_id`` (string, may be missing or null) and/or ``items`` (the
user's recent raw item ids, oldest first; may be missing, null or empty); param ``k`` (default
``model_config["k"]``). Rules:
  * a known user has a stratum, a stored history and seen items; an unknown user (or none
    given) is scored with stratum -1, which the graph routes to the unseen stratum (the tail
    plugin by default);
  * ``items``, when given, is the history (the caller knows the latest events); unknown item ids
    are dropped and counted in ``unknown_items``; otherwise the stored history is used;
  * excluded from the answer: the known user's seen items and the request's own items.
Answer: one row per request row: user_id, known_user, unknown_items, item_ids (top k, best
first), scores.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import torch


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


class RawIdRecommender(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import pyarrow.parquet as pq

        cfg = context.model_config or {}
        self.k = int(cfg.get("k", 10))
        self.max_len = int(cfg["max_len"])
        self.program = torch.export.load(context.artifacts["program"]).module()
        items = pq.read_table(context.artifacts["items"], columns=["item_idx", "item_id"]).to_pandas()
        items = items.sort_values("item_idx")
        self.item_ids = np.concatenate([[""], items["item_id"].astype(str).to_numpy()])  # index = item_idx
        self.item_index = pd.Index(items["item_id"].astype(str))
        self.item_idx = items["item_idx"].to_numpy(np.int64)
        users = pq.read_table(context.artifacts["users"]).to_pandas()
        self.user_index = pd.Index(users["user_id"].astype(str))
        self.user_stratum = users["stratum"].to_numpy(np.int64)
        self.user_history = users["history"].to_numpy()
        self.user_seen = users["seen"].to_numpy()

    def _encode(self, raw) -> tuple[np.ndarray, int]:
        """Raw item ids -> item indices (unknown ones dropped) and how many were dropped."""
        raw = [str(i) for i in raw]
        pos = self.item_index.get_indexer(raw)
        return self.item_idx[pos[pos >= 0]], int((pos < 0).sum())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        k = int((params or {}).get("k", self.k))
        n = len(model_input)
        users = model_input["user_id"] if "user_id" in model_input else pd.Series([None] * n)
        given = model_input["items"] if "items" in model_input else pd.Series([None] * n)
        x = np.zeros((n, 1 + self.max_len), dtype=np.int64)
        x[:, 0] = -1
        excluded, known, unknown = [], np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
        out_users = []
        for r in range(n):
            uid = None if _is_missing(users.iloc[r]) else str(users.iloc[r])
            out_users.append(uid)
            row = self.user_index.get_loc(uid) if uid is not None and uid in self.user_index else -1
            history = np.zeros(0, dtype=np.int64)
            skip = []
            if row >= 0:
                known[r] = True
                x[r, 0] = self.user_stratum[row]
                history = np.asarray(self.user_history[row], dtype=np.int64)
                skip.append(np.asarray(self.user_seen[row], dtype=np.int64))
            raw = given.iloc[r]
            if not _is_missing(raw) and len(raw) > 0:
                history, unknown[r] = self._encode(raw)
                skip.append(history)
            history = history[-self.max_len:]
            if len(history):
                x[r, 1 + self.max_len - len(history):] = history
            excluded.append(np.concatenate(skip) if skip else np.zeros(0, dtype=np.int64))
        with torch.no_grad():
            scores = self.program(torch.from_numpy(x)).float()
        for r, items in enumerate(excluded):
            if len(items):
                scores[r, torch.from_numpy(items)] = -torch.inf
        top = torch.topk(scores, min(k, scores.shape[1] - 1), dim=1)
        result = []
        for r in range(n):
            keep = torch.isfinite(top.values[r])  # fewer than k items left unseen: shorter list
            idx = top.indices[r][keep].numpy()
            result.append({"user_id": out_users[r], "known_user": bool(known[r]), "unknown_items": int(unknown[r]),
                           "item_ids": self.item_ids[idx].tolist(),
                           "scores": top.values[r][keep].numpy().astype(float).tolist()})
        return pd.DataFrame(result)


mlflow.models.set_model(RawIdRecommender())
