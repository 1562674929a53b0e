"""The model a retrain starts from (the *incumbent*) and its move to a newer item vocabulary.

A newer log brings new items and re-indexes the old ones (items.parquet is rebuilt by ``prepare``), so an
incumbent's item-indexed weights (``RecModel.ITEM_AXES``) are re-ordered by item id: rows of items both
vocabularies know are copied, rows of new items keep the fresh (seeded) initialisation of the candidate model.
Every other weight is copied as is and must have the same shape (same model config).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from ray_pinet.checkpoint_io import RefusedCheckpoint, load_weights, save_weights
from ray_pinet.outputs import replaced_dir
from ray_pinet.tracking.mlflow_utils import MODEL_STATE_ARTIFACT
from ray_pinet.tracking.registry import RegistryError, champion, model_versions, registry_failure
from ray_pinet.training.checkpoint import STATE_FILE, load_state
from ray_pinet.training.sequence_outputs import rebuild_model

VOCAB_ARTIFACT = "vocab/items.parquet"


@dataclass
class Incumbent:
    """A trained model with the vocabulary it was trained on."""

    model: torch.nn.Module  # RecModel, eval mode
    item_ids: np.ndarray  # item_ids[i] = raw id of item index i (index 0 = padding, "")
    strata: dict  # strata.json of its training data
    through: Optional[str]  # last partition date it was trained on (None: unknown)
    source: str  # where it came from, for reports
    version: Optional[str] = None  # registered version, when it came from the registry
    run_id: Optional[str] = None


def item_ids(items_parquet: str | Path) -> np.ndarray:
    """Raw item ids by item index (index 0 = padding) from a prepared items.parquet."""
    t = pq.read_table(items_parquet, columns=["item_idx", "item_id"])
    idx = t.column("item_idx").to_numpy()
    ids = np.empty(int(idx.max()) + 1 if len(idx) else 1, dtype=object)
    ids[:] = ""
    ids[idx] = np.asarray(t.column("item_id").to_pylist(), dtype=object)
    return ids


@dataclass
class RemapStats:
    old_items: int
    new_items: int
    kept: int  # items of the new vocabulary the incumbent knows
    added: int  # items it does not know (fresh rows)
    dropped: int  # items of the old vocabulary absent from the new one

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def remap_state(old: dict[str, torch.Tensor], old_ids: np.ndarray, template: dict[str, torch.Tensor],
                new_ids: np.ndarray, item_axes: dict[str, int]) -> tuple[dict[str, torch.Tensor], RemapStats, np.ndarray]:
    """``old`` (indexed by ``old_ids``) moved onto ``new_ids``; ``template`` is a freshly
    initialised state of the new-vocabulary model (supplies the new items' rows). Also returns
    the mask of new item indices the old vocabulary knows (padding included)."""
    pos = {iid: i for i, iid in enumerate(old_ids) if i > 0}
    src = np.array([pos.get(iid, -1) if j > 0 else 0 for j, iid in enumerate(new_ids)], dtype=np.int64)
    known = src >= 0
    known[0] = True  # padding row
    out = {}
    for name, t in template.items():
        if name not in old:
            raise ValueError(f"incumbent has no weight {name!r}: it was trained with another model config")
        o = old[name]
        if name in item_axes:
            ax = item_axes[name]
            if o.dim() != t.dim() or [n for i, n in enumerate(o.shape) if i != ax] != \
                    [n for i, n in enumerate(t.shape) if i != ax]:
                raise ValueError(f"incumbent weight {name!r} has shape {tuple(o.shape)}, the candidate "
                                 f"model {tuple(t.shape)} (item axis aside): same model config needed")
            if o.shape[ax] != len(old_ids) or t.shape[ax] != len(new_ids):
                raise ValueError(f"{name}: item axis {ax} has {o.shape[ax]} / {t.shape[ax]} rows, "
                                 f"vocabularies have {len(old_ids)} / {len(new_ids)}")
            new = t.clone()
            sel = torch.as_tensor(np.nonzero(known)[0])
            new.index_copy_(ax, sel, o.index_select(ax, torch.as_tensor(src[known])))
            out[name] = new
        else:
            if o.shape != t.shape:
                raise ValueError(f"incumbent weight {name!r} has shape {tuple(o.shape)}, the candidate "
                                 f"model {tuple(t.shape)}: same model config needed for a warm start")
            out[name] = o.clone()
    extra = set(old) - set(template)
    if extra:
        raise ValueError(f"incumbent has weights the candidate model lacks: {sorted(extra)[:5]}")
    kept = int(known[1:].sum())
    stats = RemapStats(old_items=len(old_ids) - 1, new_items=len(new_ids) - 1, kept=kept,
                       added=len(new_ids) - 1 - kept, dropped=len(old_ids) - 1 - kept)
    return out, stats, known


class KnownItemsOnly(torch.nn.Module):
    """An incumbent scoring a newer vocabulary: items it never saw get score -inf (in production
    it cannot recommend them), their history positions read as padding."""

    def __init__(self, model: torch.nn.Module, known: np.ndarray):
        super().__init__()
        self.model = model
        self.register_buffer("unknown", torch.as_tensor(~known))
        self.use_plugins = getattr(model, "use_plugins", False)

    def predict(self, history, stratum=None, candidates=None):
        history = history.masked_fill(self.unknown[history], 0)
        scores = self.model.predict(history, stratum, candidates)
        mask = self.unknown[None, :] if candidates is None else self.unknown[candidates]
        return scores.masked_fill(mask, -torch.inf)


def on_vocabulary(inc: Incumbent, new_ids: np.ndarray,
                  template_model: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, torch.Tensor], RemapStats]:
    """The incumbent moved onto ``new_ids``: (a scoring model that masks the items it does not
    know, the remapped state — also the candidate's warm start —, the remap counts).
    ``template_model`` is a freshly initialised model of the new vocabulary; it is loaded in place."""
    state, stats, known = remap_state(inc.model.state_dict(), inc.item_ids, template_model.state_dict(),
                                      new_ids, template_model.ITEM_AXES)
    template_model.load_state_dict(state)
    template_model.use_plugins = getattr(inc.model, "use_plugins", False)
    template_model.eval()
    return KnownItemsOnly(template_model, known).eval(), state, stats


def from_checkpoint(checkpoint_dir: str) -> Incumbent:
    """A finished run's checkpoint directory (state.pt); the vocabulary is its data's items.parquet."""
    snap = load_state(checkpoint_dir)
    model, cfg, meta = rebuild_model(snap)
    data = Path(cfg.data.path)
    if not (data / "items.parquet").exists():
        raise FileNotFoundError(f"checkpoint {checkpoint_dir} was trained on {data}, which has no "
                                f"items.parquet any more: the item vocabulary is needed to warm-start")
    marker = data / "partitions.json"
    through = json.loads(marker.read_text())["through"] if marker.exists() else None
    return Incumbent(model, item_ids(data / "items.parquet"), meta.strata, through, f"checkpoint {checkpoint_dir}")


def from_registry(uri: str, model_name: str) -> Optional[Incumbent]:
    """The serving version of a registered model, ``@champion`` (the latest version when no
    version holds the alias: a registry written before aliases); None only when the registry has
    no model of that name (or no version of it). A registry it cannot read is a
    ``RegistryError``, never "no incumbent" (that would register the candidate ungated).

    The model is rebuilt from the run's plain weights artifact (``MODEL_STATE_ARTIFACT``), read
    with ``weights_only=True``: the pickled served model is never loaded, so a tampered version
    runs nothing (``RefusedCheckpoint``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    versions = model_versions(uri, model_name)
    if not versions:
        return None
    # the version URI, not the alias: the alias moves, a report must name what it compared with
    mv = champion(uri, model_name) or max(versions, key=lambda v: int(v.version))
    where = f"models:/{model_name}/{mv.version}"
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for key, artifact in (("vocab", VOCAB_ARTIFACT), ("strata", "data/strata.json"),
                              ("state", MODEL_STATE_ARTIFACT)):
            try:
                files[key] = mlflow.artifacts.download_artifacts(
                    run_id=mv.run_id, artifact_path=artifact, dst_path=tmp, tracking_uri=uri)
            except (MlflowException, OSError) as exc:
                missing = isinstance(exc, OSError) or exc.error_code == "RESOURCE_DOES_NOT_EXIST"
                if not missing:
                    raise registry_failure(uri, model_name, exc, "download from") from exc
                raise RegistryError(
                    f"{where} (run {mv.run_id}) has no {artifact} artifact: it was logged by an older "
                    "ray-pinet (or is a per-stratum ensemble); warm-start with --checkpoint") from exc
        ids = item_ids(files["vocab"])
        strata = json.loads(Path(files["strata"]).read_text())
        label = f"{where} {MODEL_STATE_ARTIFACT}"
        snap = load_weights(files["state"], label=label)
    if not isinstance(snap, dict) or not {"config", "meta", "model"} <= set(snap):
        raise RefusedCheckpoint("not a ray-pinet model state (a dict with config, meta and model)", file=label)
    model, _, _ = rebuild_model(snap)
    return Incumbent(model, ids, strata, mv.tags.get("data.through"), where,
                     version=str(mv.version), run_id=mv.run_id)


def write_warm_checkpoint(state: dict, cfg_dict: dict, meta: dict, where: str | Path) -> str:
    """A checkpoint directory that ``run.warm_start`` accepts: the remapped weights with the
    candidate's own config and data (warm_start reads the backbone part)."""
    with replaced_dir(where) as new:  # a failed write leaves the previous warm start whole
        save_weights({"config": cfg_dict, "meta": meta, "model": state, "engine": {"stage": 3}},
                     os.path.join(new, STATE_FILE))
    return str(where)
