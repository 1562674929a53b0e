"""Driver side of ``ray-pinet train``: prepared data -> TorchTrainer.fit -> MLflow run.

Relaunching with the same ``run.name`` and ``run.storage_path`` resumes: Ray Train V2 hands the
latest checkpoint of that run to the workers (``ray.train.get_checkpoint``), and the MLflow
run tagged with that name is reopened.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from ray_pinet.config import TrainConfig
from ray_pinet.config_base import to_dict
from ray_pinet.evaluation.protocol import slice_names
from ray_pinet.local_ray import start_ray
from ray_pinet.storage_uri import check_reachable, local_or_uri, run_storage, same_place, uri_of
from ray_pinet.training.engine import RunMeta
from ray_pinet.training.worker import STATE_FILE, load_state, train_func

SPLITS = ("train", "valid", "test")


@dataclass
class FitResult:
    config: Any  # TrainConfig (TwoTowerConfig for `ray-pinet twotower` runs)
    final: dict[str, float]
    history: list[dict]
    checkpoint_path: Optional[str]
    run_id: Optional[str] = None
    tracking_uri: Optional[str] = None
    model_uri: Optional[str] = None
    meta: Optional[RunMeta] = None
    extra: dict[str, Any] = field(default_factory=dict)


PREPARED_FILES = ("prepare_config.json", "strata.json", "report.json", "users.parquet", "items.parquet")
# Prepare settings that do not change the prepared data: where it is written, and the number of
# user buckets the work is split into (the output is the same for any, tests/data/test_pipeline.py).
PREPARE_FREE = ("output", "num_buckets")


def missing_prepared(path: Path) -> list[str]:
    """What a complete ``prepare`` output has and ``path`` lacks (docs/design.md's contract)."""
    missing = [f for f in PREPARED_FILES if not (path / f).is_file()]
    return missing + [f"{s}/*.parquet" for s in SPLITS if not any((path / s).glob("*.parquet"))]


def _prepare_config_of(cfg: TrainConfig, path: Path):
    """``data.prepare`` resolved as ``train`` runs it (output = data.path)."""
    from ray_pinet.config_base import ConfigError, apply_overrides, from_dict, load_yaml
    from ray_pinet.data.config import PrepareConfig

    try:
        return from_dict(PrepareConfig, apply_overrides(load_yaml(cfg.data.prepare), [f"output={path}"]))
    except ConfigError as exc:
        raise ConfigError(f"data.prepare={cfg.data.prepare!r}: {exc}") from None


def ensure_prepared(cfg: TrainConfig, progress: bool = True) -> Path:
    """The prepared-data directory, running ``prepare`` first when it is missing (or empty).

    A folder that is there is checked, never silently reused or rewritten: a partial ``prepare``
    output is refused with what it lacks, and with ``data.prepare`` set, data prepared with other
    settings (any key but ``PREPARE_FREE``) is refused with the differing keys, as ``twotower``
    refuses stale pair data."""
    from ray_pinet import storage_uri
    from ray_pinet.config_base import ConfigError, config_diff, format_diff, from_dict
    from ray_pinet.data.config import PrepareConfig
    from ray_pinet.errors import DataError

    if storage_uri.is_remote(cfg.data.path):
        # A remote folder is prepared (uploaded) when empty, then read from a local copy that
        # is checked like a local folder (docs/design.md "Object storage").
        uri = storage_uri.local_or_uri(cfg.data.path)
        if not storage_uri.has_files(uri, "data.path"):
            if not cfg.data.prepare:
                raise ConfigError(f"data.path={uri!r}: no prepared data there: run `ray-pinet prepare` "
                                  "first, or set data.prepare to a prepare config so that train prepares it")
            storage_uri.prepare_output(_prepare_config_of(cfg, uri), progress=progress)
        local = storage_uri.local_copy(uri, "data.path")
        try:
            return ensure_prepared(replace(cfg, data=replace(cfg.data, path=str(local))), progress)
        except DataError as exc:  # errors name the URI, not its local copy
            raise DataError(exc.reason.replace(str(local), uri), file=(exc.file or "").replace(str(local), uri),
                            column=exc.column, row=exc.row, value=exc.value) from None
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(str(local), uri), key=exc.key) from None
    path = Path(storage_uri.local_path(cfg.data.path))
    if not path.is_dir() or not any(path.iterdir()):
        if not cfg.data.prepare:
            raise ConfigError(f"data.path={str(path)!r}: no prepared data there: run `ray-pinet prepare` "
                              "first, or set data.prepare to a prepare config so that train prepares it")
        from ray_pinet.data.pipeline import prepare

        prepare(_prepare_config_of(cfg, path), progress=progress)
        return path
    missing = missing_prepared(path)
    if missing:
        how = (f"`ray-pinet prepare --config {cfg.data.prepare} --output {path}`" if cfg.data.prepare
               else "`ray-pinet prepare` with its config")
        raise DataError(f"data.path is not a complete prepared folder (an interrupted or partial "
                        f"prepare?): it lacks {', '.join(missing)}; prepare it again with {how}",
                        file=str(path))
    if cfg.data.prepare:
        want = to_dict(_prepare_config_of(cfg, path))
        have = _read_json(path / "prepare_config.json")
        try:  # keys added to PrepareConfig since the folder was made take their defaults
            have = to_dict(from_dict(PrepareConfig, have))
        except ConfigError:
            pass  # compared as stored: the keys it no longer has are listed as differences
        diffs = config_diff(have, want, free=PREPARE_FREE)
        if diffs:
            listed = format_diff(diffs, template="{key}: prepared {old!r}, asked {new!r}")
            raise ConfigError(
                f"data.path={str(path)!r} holds data prepared with other settings than data.prepare="
                f"{cfg.data.prepare!r} ({listed}): "
                "set data.path to a new directory, or prepare this one again with "
                f"`ray-pinet prepare --config {cfg.data.prepare} --output {path}`")
    return path


def _read_json(path: Path) -> dict:
    from ray_pinet.errors import DataError

    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError("prepared data file missing: prepare the folder again", file=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"prepared data file is not valid JSON ({exc}): prepare the folder again",
                        file=str(path)) from None


def load_run_meta(path: Path) -> RunMeta:
    from ray_pinet.data.prepared import check_format
    from ray_pinet.errors import DataError

    check_format(path)
    strata = _read_json(path / "strata.json")
    pconf = _read_json(path / "prepare_config.json")
    try:
        items = pq.ParquetFile(path / "items.parquet").metadata.num_rows
        n_train = sum(pq.ParquetFile(f).metadata.num_rows for f in sorted((path / "train").glob("*.parquet")))
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"prepared data is unreadable ({exc}): prepare the folder again",
                        file=str(path)) from None
    try:
        return RunMeta(
            num_items=int(items),
            num_strata=int(strata["num_strata"]),
            num_train_samples=int(n_train),
            user_share=[float(x) for x in strata["priors"]["user_share"]],
            interaction_share=[float(x) for x in strata["priors"]["interaction_share"]],
            train_negatives=int(pconf["samples"]["train_negatives"]),
            strata=strata,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"prepared data lacks an entry ({exc!r}) that prepare writes: prepare the folder "
                        "again", file=str(path / "strata.json")) from None


def _check_compatible(cfg: TrainConfig, meta: RunMeta, path: Path) -> None:
    """Settings that only the data can check, refused on the driver before Ray Train starts."""
    from ray_pinet.config_base import ConfigError

    samples = _read_json(path / "prepare_config.json").get("samples", {})
    L = int(samples.get("max_len", -1))
    if cfg.model.max_len != L:
        raise ConfigError(f"model.max_len={cfg.model.max_len} but {path} was prepared with "
                          f"samples.max_len={L}: set model.max_len to it, or prepare the data again "
                          "with that max_len")
    if cfg.eval.candidates and int(samples.get("eval_candidates", 0)) < cfg.eval.candidates:
        raise ConfigError(
            f"eval.candidates={cfg.eval.candidates} but {path} holds "
            f"{samples.get('eval_candidates', 0)} sampled candidates per row: lower eval.candidates "
            "(0 ranks the full catalogue), or prepare with samples.eval_candidates >= it"
        )
    K = meta.num_strata
    names = slice_names(K)
    if cfg.eval.select_slice not in names:
        raise ConfigError(f"eval.select_slice={cfg.eval.select_slice!r}: the data at {path} has the "
                          f"slices {names}")
    bad = [s for s in cfg.data.train_strata or [] if s >= K]
    if bad:
        raise ConfigError(f"data.train_strata {bad}: the data at {path} has {K} strata (0..{K - 1})")
    if cfg.stage2.unseen_stratum >= K:
        raise ConfigError(f"stage2.unseen_stratum={cfg.stage2.unseen_stratum}: the data at {path} has "
                          f"{K} strata (0..{K - 1})")


def check_init_from(cfg: TrainConfig, meta: RunMeta, key: str = "init_from") -> None:
    """run.init_from / run.warm_start must be a finished checkpoint of the same model on the
    same data."""
    from ray_pinet import storage_uri
    from ray_pinet.config_base import ConfigError

    where = getattr(cfg.run, key)
    if not storage_uri.exists(storage_uri.join(where, STATE_FILE), f"run.{key}"):
        raise ConfigError(f"run.{key}={where!r}: no {STATE_FILE} there (a checkpoint directory of a "
                          "finished run holds one)")
    snap = load_state(where)
    other = TrainConfig.from_dict(snap["config"])
    if other.model != cfg.model:
        raise ConfigError(f"run.{key}={where!r} holds model {other.model}, this run has {cfg.model}")
    if not same_place(other.data.path, cfg.data.path) or snap["meta"]["num_items"] != meta.num_items:
        raise ConfigError(f"run.{key}={where!r} was trained on {other.data.path}, "
                          f"this run reads {cfg.data.path}")
    if snap["engine"].get("stage", 1) != 3:
        raise ConfigError(f"run.{key}={where!r} is not a finished run (stage "
                          f"{snap['engine'].get('stage')}): finish or resume it first")


def absolute_checkpoint_paths(cfg: TrainConfig) -> TrainConfig:
    """``run.init_from`` / ``run.warm_start`` as absolute paths: the driver checks them relative
    to its working directory, but Ray Train workers run in directories of their own."""
    paths = {k: local_or_uri(v) for k in ("init_from", "warm_start")
             if (v := getattr(cfg.run, k))}
    return replace(cfg, run=replace(cfg.run, **paths)) if paths else cfg


def fit(
    cfg: TrainConfig,
    progress: Optional[bool] = None,
    parent_run_id: Optional[str] = None,
    tags: Optional[dict[str, str]] = None,
    base_checkpoint: Optional[str] = None,
    callbacks: Optional[list] = None,
    fresh: bool = False,
) -> FitResult:
    """Train one run of ``cfg`` on Ray Train and log it to MLflow (a child of ``parent_run_id``
    when given). ``separate`` / ``finetune`` are K runs, one per stratum: see ``per_stratum``
    (``base_checkpoint``: the joint run that ``finetune`` starts from; trained first if None).
    ``callbacks``: ``ray.train.UserCallback``s of the Train run (a Tune trial forwards its
    reports with one). A run name with a checkpoint resumes it if its config is this one
    (``training/resume.py``); ``fresh``: move that run folder aside and train anew."""
    from ray_pinet.config import PER_STRATUM_METHODS

    cfg = absolute_checkpoint_paths(cfg)

    if cfg.method in PER_STRATUM_METHODS:
        from ray_pinet.training.per_stratum import fit_per_stratum

        return fit_per_stratum(cfg, base_checkpoint, progress=progress, parent_run_id=parent_run_id,
                               tags=tags, fresh=fresh)
    import ray

    from ray_pinet.tracking import mlflow_utils as mu

    progress = cfg.run.progress if progress is None else progress
    path = ensure_prepared(cfg, progress=progress)
    meta = load_run_meta(path)
    _check_compatible(cfg, meta, path)
    if cfg.run.init_from:
        check_init_from(cfg, meta)
    if cfg.run.warm_start:
        check_init_from(cfg, meta, "warm_start")
    storage = local_or_uri(cfg.run.storage_path)
    check_reachable(storage, "run.storage_path")
    _check_resume(cfg, meta, storage, fresh)
    if not ray.is_initialized():
        start_ray()
    config_dict = cfg.to_dict()

    uri, run_id, mlflow_info = start_tracking(
        cfg.tracking, cfg.run.name, config_dict, storage, parent_run_id,
        {"method": cfg.method, "backbone": cfg.model.backbone, "data": str(path), **(tags or {})},
        [path / name for name in ("strata.json", "report.json", "prepare_config.json")], fresh=fresh)
    trainer = torch_trainer(
        train_func, {"train": config_dict, "meta": meta.__dict__, "mlflow": mlflow_info,
                     "data_path": str(Path(path).resolve())}, cfg.run, storage, callbacks=callbacks)
    ckpt = fit_to_checkpoint(trainer, cfg.run.name, uri, run_id)
    with ckpt.as_directory() as d:
        snap = load_state(d)
    history = snap["engine"]["history"]
    final = {k: v for k, v in history[-1].items() if k != "step"}
    out = FitResult(cfg, final, history, uri_of(ckpt.filesystem, ckpt.path), run_id, uri, meta=meta)
    if uri and run_id:
        out.model_uri = _log_run_outputs(cfg, meta, path, snap, final, history, uri, run_id)
        mu.finish_run(uri, run_id)
    return out


def _check_resume(cfg: TrainConfig, meta: RunMeta, storage: str, fresh: bool) -> None:
    """``resume.check_resume`` for a train run: its config, and the data's sizes, against the
    checkpoint a relaunch would resume."""
    from ray_pinet.training.resume import check_resume

    stored: dict = {}

    def checkpoint_config(ckpt: Path) -> dict:
        stored.update(load_state(str(ckpt)))
        return stored["config"]

    def data_changes(_ckpt: Path) -> list:
        old = stored.get("meta", {})
        return [(f"data ({k} of {cfg.data.path})", old.get(k), getattr(meta, k))
                for k in ("num_items", "num_strata", "num_train_samples") if old.get(k) != getattr(meta, k)]

    try:
        check_resume(TrainConfig, cfg, storage, checkpoint_config, fresh=fresh, extra=data_changes)
    finally:
        stored.clear()  # the checkpoint's weights: not kept on the driver for the whole run


def start_tracking(tracking, run_name: str, config_dict: dict, storage: str, parent_run_id: Optional[str],
                   tags: dict[str, str], data_files: list[Path],
                   fresh: bool = False) -> tuple[Optional[str], Optional[str], Optional[dict]]:
    """(tracking URI, run id, the workers' MLflow info) of a new or resumed run named ``run_name``
    (all None with ``tracking.enabled=false``); a new run gets the existing ``data_files``.
    ``fresh``: always a new MLflow run (the run's training starts anew)."""
    from ray_pinet.tracking import mlflow_utils as mu
    from ray_pinet.training.resume import RESUME_FREE

    if not tracking.enabled:
        return None, None, None
    uri = mu.resolve_tracking_uri(tracking.tracking_uri, storage)
    run_id, resumed = mu.start_or_resume_run(uri, tracking.experiment, run_name, config_dict, tags=tags,
                                             parent_run_id=parent_run_id, fresh=fresh, free=RESUME_FREE)
    if not resumed:
        for f in data_files:
            if f.exists():
                mu.log_artifact(uri, run_id, f, "data")
    return uri, run_id, {"tracking_uri": uri, "run_id": run_id}


def torch_trainer(train_loop, loop_config: dict, run, storage: str, callbacks: Optional[list] = None):
    """The TorchTrainer of a run section: ``run.num_workers`` workers, each with
    ``run.gpus_per_worker`` GPUs (0: CPU workers) and collectives on nccl when they hold GPUs,
    gloo otherwise; a checkpoint kept per report (the last two), ``run.max_failures`` restarts.
    No Ray Datasets: each worker reads its own block of the prepared files (training/shards.py)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ray_pinet.training.device import backend_for

    use_gpu = run.gpus_per_worker > 0
    resources = {"CPU": run.cpus_per_worker, **({"GPU": run.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=backend_for("cuda" if use_gpu else "cpu"),
                                 timeout_s=run.collective_timeout_s),
        scaling_config=ScalingConfig(num_workers=run.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run.name, **run_storage(storage), checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             callbacks=callbacks or None),
    )


def fit_to_checkpoint(trainer, name: str, uri: Optional[str], run_id: Optional[str]):
    """``trainer.fit()`` -> its last checkpoint; the MLflow run is marked FAILED if the fit raises."""
    from ray_pinet.tracking import mlflow_utils as mu

    try:
        result = trainer.fit()
    except BaseException:
        if uri and run_id:
            mu.finish_run(uri, run_id, status="FAILED")
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"run {name!r} ended without a checkpoint")
    return result.checkpoint


def rebuild_model(snap: dict):
    """The trained RecModel from a checkpoint state (``state.pt``)."""
    from ray_pinet.models.registry import build_model

    cfg = TrainConfig.from_dict(snap["config"])
    meta = RunMeta(**snap["meta"])
    model = build_model(cfg.model, meta.num_items, meta.num_strata,
                        cfg.stage2.plugin if cfg.uses_plugins else None)
    model.load_state_dict(snap["model"])
    model.use_plugins = bool(snap.get("use_plugins", False))
    model.eval()
    return model, cfg, meta


def _log_run_outputs(cfg, meta, path, snap, final, history, uri, run_id) -> Optional[str]:
    from ray_pinet.tracking import mlflow_utils as mu
    from ray_pinet.tracking.plots import plot_activeness, plot_final_bars, plot_stratum_curves

    mu.log_metrics(uri, run_id, {k: v for k, v in final.items() if isinstance(v, (int, float))},
                   step=len(history))
    slices = slice_names(meta.num_strata)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plot_stratum_curves(history, slices, cfg.eval.k, tmp / "stratum_metrics.png")
        plot_final_bars(final, slices, cfg.eval.k, tmp / "test_metrics_by_stratum.png")
        users = pq.read_table(path / "users.parquet", columns=["activeness", "stratum"])
        plot_activeness(users.column("activeness").to_numpy(), users.column("stratum").to_numpy(),
                        tmp / "activeness_histogram.png", title=f"activeness ({path.name})")
        (tmp / "final_metrics.json").write_text(json.dumps(final, indent=2, sort_keys=True))
        for f in ("stratum_metrics.png", "test_metrics_by_stratum.png", "activeness_histogram.png",
                  "final_metrics.json"):
            mu.log_artifact(uri, run_id, tmp / f, "plots" if f.endswith(".png") else None)
    if not cfg.tracking.log_model:
        return None
    # The item-index vocabulary beside the run (retrain reads it; the served model carries its own).
    mu.log_artifact(uri, run_id, path / "items.parquet", "vocab")
    return log_served_model(cfg, rebuild_model(snap)[0], uri, run_id, path, meta=meta)


def log_served_model(cfg: TrainConfig, model, uri: str, run_id: str, data_path,
                     meta: Optional[RunMeta] = None) -> Optional[str]:
    """Log ``model`` as the run's served model on raw ids (``serving.log_served_pyfunc``: the
    exported ``ScoringModule`` graph with ``data_path``'s vocabulary and users); its URI.
    With ``meta`` (a single RecModel, not a per-stratum ensemble) its weights also go to
    ``mlflow_utils.MODEL_STATE_ARTIFACT`` as plain data: what ``retrain`` warm-starts from."""
    from ray_pinet.serving import ScoringModule, log_served_pyfunc
    from ray_pinet.tracking import mlflow_utils as mu

    if meta is not None:
        mu.log_model_state(uri, run_id, cfg.to_dict(), dict(meta.__dict__), model.state_dict(),
                           getattr(model, "use_plugins", False))
    if not model.supports_full:  # DIN scores given candidates only: no catalogue to rank
        print(f"ray-pinet: {cfg.model.backbone} scores candidates, not the catalogue: no served model "
              "logged (its weights are in the run's checkpoint)", file=sys.stderr)
        return None
    return log_served_pyfunc(uri, run_id, ScoringModule(model, cfg.stage2.unseen_stratum), cfg.model.max_len,
                             data_path)


def reuse_joint(cfg: TrainConfig, joint_checkpoint: Optional[str], joint_data: Optional[str],
                retrain_stage1: bool = False) -> Optional[str]:
    """Reuse a finished joint run where a method's first stage is joint training on the same
    data: pinet with a joint-equivalent stage 1 starts stage 2 from its backbone
    (``cfg.run.init_from`` is set in place, unless ``retrain_stage1``); ``finetune`` fine-tunes
    it (returned, for ``fit``'s ``base_checkpoint``). A run on other data (e.g. K = 4 buckets)
    trains its own."""
    if not joint_checkpoint or not joint_data or not same_place(cfg.data.path, joint_data):
        return None
    if cfg.method == "pinet" and cfg.stage1_is_joint and not cfg.run.init_from and not retrain_stage1:
        cfg.run.init_from = joint_checkpoint
    return joint_checkpoint if cfg.method == "finetune" else None


def format_table(final: dict[str, float], num_strata: int, k: int = 10, prefix: str = "test") -> str:
    """Per-stratum table of the final metrics (plain text, for the console and the README)."""
    slices = slice_names(num_strata)
    cols = [f"ndcg@{k}", f"hr@{k}", "auc", "gauc", "users"]
    lines = ["| slice | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in slices:
        vals = []
        for c in cols:
            v = final.get(f"{prefix}/{s}/{c}")
            vals.append("-" if v is None else (f"{int(v)}" if c == "users" else f"{v:.4f}"))
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines)
