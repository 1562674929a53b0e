"""``ray-pinet recommend``: a registered model -> the top-k raw item ids of every user, as Parquet.

The batch scoring every retraining pipeline ends with. The model's own artifacts give everything
(``serving.log_served_pyfunc``): the exported scoring graph, the vocabulary and each user's
stratum, latest history and seen items. Ray Data streams the user table through ``Scorer``
actors (``map_batches``; ``--actors`` of them, each with ``--gpus-per-actor`` GPUs, scoring on
the GPU when it has one) and writes the result in files of at least ``--rows-per-file`` users. Masking is evaluation's (``evaluation.protocol.mask_seen_``): the padding item and every
item the user has seen are never recommended.

Output columns: user_id, stratum, item_ids (list<string>, best first), scores (list<float>).
Users without any history (neither a validation nor a test row) are skipped and counted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_pinet.config import TrainConfig
from ray_pinet.config_base import ConfigError
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.pipeline import prepare
from ray_pinet.evaluation.protocol import mask_seen_
from ray_pinet.local_ray import start_ray
from ray_pinet.models.registry import build_model
from ray_pinet.serving import ScoringModule, log_served_pyfunc, serving_users
from ray_pinet.training.batches import _left_pad, _list_column


@dataclass
class RecommendOptions:
    model_uri: str  # runs:/..., models:/NAME@champion, models:/NAME/3
    output: str
    data: Optional[str] = None  # a prepared folder whose users to score (default: the model's own)
    k: int = 10
    batch_size: int = 1024
    actors: int = 1
    gpus_per_actor: float = 0.0
    rows_per_file: int = 1_000_000
    tracking_uri: Optional[str] = None

    def __post_init__(self) -> None:
        if self.k < 1 or self.batch_size < 1 or self.actors < 1 or self.rows_per_file < 1:
            raise ConfigError("k, batch_size, actors and rows_per_file must be >= 1")
        if self.gpus_per_actor < 0:
            raise ConfigError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")


def model_files(model_uri: str, tracking_uri: Optional[str] = None) -> dict:
    """Local copies of a served model's artifacts: program, items, users; and its max_len."""
    import mlflow
    import yaml

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    found = {name: sorted(local.rglob(name)) for name in ("scoring.pt2", "items.parquet", "users.parquet")}
    missing = [n for n, f in found.items() if not f]
    if missing:
        raise ConfigError(f"{model_uri} lacks {missing}: not a served model of this ray-pinet (log it again)")
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    config = mlmodel.get("flavors", {}).get("python_function", {}).get("config") or mlmodel.get("model_config") or {}
    if "max_len" not in config or "num_strata" not in config:
        raise ConfigError(f"{model_uri}: its MLmodel has no model_config max_len / num_strata (log it again)")
    return {"program": found["scoring.pt2"][0], "items": found["items.parquet"][0],
            "users": found["users.parquet"][0], "max_len": int(config["max_len"]),
            "num_strata": int(config["num_strata"])}


class Scorer:
    """A Ray Data actor: loads the exported graph once, scores batches of users."""

    def __init__(self, program: str, items: str, max_len: int, k: int):
        import torch

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.program = torch.export.load(program).module().to(self.device)
        ids = pq.read_table(items, columns=["item_idx", "item_id"]).sort_by("item_idx")
        self.item_ids = np.concatenate([[""], ids.column("item_id").to_numpy(zero_copy_only=False).astype(str)])
        self.max_len, self.k = max_len, k

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_users(self.program, batch, self.item_ids, self.max_len, self.k, self.device)


def users_of(data: str, model_items: Path, max_len: int, num_strata: int) -> tuple[pa.Table, int]:
    """The serving user table of a prepared folder (``serving.serving_users``) in the model's
    item indices: items are matched by raw id; items the model does not know are dropped from
    histories and seen lists and counted (returned). Its strata must be the model's count."""
    import pyarrow.compute as pc

    root = Path(data)
    strata = json.loads((root / "strata.json").read_text())["num_strata"]
    if strata != num_strata:
        raise ConfigError(f"--data {root} has {strata} strata, the model has {num_strata}: prepare it with the "
                          "model's stratification")
    users = serving_users(root, max_len)
    theirs = pq.read_table(root / "items.parquet", columns=["item_idx", "item_id"])
    ours = pq.read_table(model_items, columns=["item_idx", "item_id"])
    lookup = pc.index_in(theirs.column("item_id"), value_set=ours.column("item_id")).to_numpy(zero_copy_only=False)
    to_model = np.full(int(pc.max(theirs.column("item_idx")).as_py() or 0) + 1, -1, dtype=np.int64)
    ours_idx = ours.column("item_idx").to_numpy()
    known = ~np.isnan(lookup.astype(float))
    to_model[theirs.column("item_idx").to_numpy()[known]] = ours_idx[lookup[known].astype(np.int64)]
    dropped = 0
    for name in ("history", "seen"):
        col = users.column(name).combine_chunks()
        values = to_model[col.values.to_numpy()]
        keep = values >= 0
        if name == "history":
            dropped = int((~keep).sum())
        row = np.repeat(np.arange(len(col)), np.diff(col.offsets.to_numpy()))
        counts = np.bincount(row[keep], minlength=len(col))
        new = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32)),
                                       pa.array(values[keep].astype(np.int32)))
        users = users.set_column(users.schema.get_field_index(name), name, new)
    return users, dropped


def score_users(program, users: pa.Table, item_ids: np.ndarray, max_len: int, k: int, device=None) -> pa.Table:
    """Top-k of each row of a serving user table (user_id, stratum, history, seen)."""
    import torch

    device = device or torch.device("cpu")
    n = users.num_rows
    vals, offs = _list_column(users, "history")
    x = np.zeros((n, 1 + max_len), dtype=np.int64)
    x[:, 0] = users.column("stratum").to_numpy()
    x[:, 1:] = _left_pad(vals, offs, max_len)
    seen, soffs = _list_column(users, "seen")
    seen_rows = np.repeat(np.arange(n), np.diff(soffs))
    with torch.no_grad():
        scores = program(torch.from_numpy(x).to(device)).float()
        mask_seen_(scores, torch.from_numpy(seen_rows).to(device), torch.from_numpy(seen).to(device))
        top = torch.topk(scores, min(k, scores.shape[1] - 1), dim=1)
    values, idx = top.values.cpu().numpy(), top.indices.cpu().numpy()
    keep = np.isfinite(values)  # fewer than k unseen items: a shorter list
    counts = keep.sum(1)
    flat_ids, flat_scores = item_ids[idx[keep]], values[keep].astype(np.float32)
    off = np.r_[0, np.cumsum(counts)].astype(np.int32)
    return pa.table({
        "user_id": users.column("user_id"),
        "stratum": users.column("stratum"),
        "item_ids": pa.ListArray.from_arrays(pa.array(off), pa.array(flat_ids, pa.string())),
        "scores": pa.ListArray.from_arrays(pa.array(off), pa.array(flat_scores, pa.float32())),
    })


def recommend(opts: RecommendOptions, progress: bool = True) -> dict:
    """Score every user of the model's user table; returns the counts and timings, also written
    to ``<output>/_summary.json``."""
    import ray.data

    files = model_files(opts.model_uri, opts.tracking_uri)
    users = pq.read_table(files["users"])
    unknown_items = 0
    if opts.data:  # fresh data scored with this model: its users, in the model's item indices
        users, unknown_items = users_of(opts.data, files["items"], files["max_len"], files["num_strata"])
    has_history = pa.compute.greater(pa.compute.list_value_length(users.column("history")), 0)
    scored = users.filter(has_history)
    skipped = users.num_rows - scored.num_rows
    out = Path(opts.output)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--output {out} is not empty: give a new folder (nothing is overwritten)")
    start_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    t0 = time.perf_counter()
    ds = ray.data.from_arrow(scored).repartition(max(1, -(-scored.num_rows // opts.batch_size)))
    ds = ds.map_batches(
        Scorer, fn_constructor_kwargs={"program": str(files["program"]), "items": str(files["items"]),
                                       "max_len": files["max_len"], "k": opts.k},
        batch_size=opts.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=opts.actors),
        num_gpus=opts.gpus_per_actor or None)
    ds.write_parquet(str(out), min_rows_per_file=min(opts.rows_per_file, max(scored.num_rows, 1)))
    seconds = time.perf_counter() - t0
    written = sum(pq.read_metadata(f).num_rows for f in out.glob("*.parquet"))
    if written != scored.num_rows:
        raise RuntimeError(f"recommend wrote {written} users of {scored.num_rows}: output {out} is incomplete")
    summary = {"model": opts.model_uri, "data": opts.data or "the model's own users", "output": str(out),
               "k": opts.k, "users": users.num_rows, "users_scored": written, "users_skipped": {"no history": skipped},
               "history_items_unknown_to_the_model": unknown_items,
               "seconds": round(seconds, 3), "users_per_s": round(written / max(seconds, 1e-9), 1),
               "actors": opts.actors, "gpus_per_actor": opts.gpus_per_actor}
    (out / "_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _smoke_model(tmp: Path) -> tuple[str, str]:
    """(tracking uri, model uri) of a tiny untrained served model on the bundled data."""
    import mlflow
    import torch

    repo = Path(__file__).resolve().parents[1]
    data = tmp / "prepared"
    prepare(PrepareConfig.from_yaml(repo / "configs/prepare/ml-latest-small-dev.yaml",
                                    [f"source.path={repo / 'data/ml-latest-small/ratings.csv'}", f"output={data}"]),
            progress=False)
    train = TrainConfig.from_dict({"model": {"dim": 16, "num_blocks": 1, "max_len": 50}})
    torch.manual_seed(0)
    num_items = pq.read_metadata(data / "items.parquet").num_rows
    model = build_model(train.model, num_items, 2, train.stage2.plugin).eval()
    model.use_plugins = True
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(experiment_id=mlflow.set_experiment("recommend-smoke").experiment_id) as run:
        pass
    log_served_pyfunc(uri, run.info.run_id, ScoringModule(model, 0), 50, data, registered_model_name="smoke")
    return uri, "models:/smoke/1"


def run_recommend(args) -> int:
    import tempfile

    tmp = None
    model, tracking, output = args.model, args.tracking_uri, args.output
    if args.smoke_test:
        tmp = Path(tempfile.mkdtemp(prefix="ray-pinet-recommend-smoke-"))
        if not model:
            tracking, model = _smoke_model(tmp)
        output = output or str(tmp / "recommendations")
    if not model or not output:
        raise ConfigError("--model and --output are required (or --smoke-test)")
    summary = recommend(RecommendOptions(model_uri=model, output=output, data=args.data, k=args.k,
                                         batch_size=args.batch_size,
                                         actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                                         rows_per_file=args.rows_per_file, tracking_uri=tracking),
                        progress=not args.no_progress)
    print(json.dumps(summary, indent=2))
    if tmp is not None and not args.output:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0
