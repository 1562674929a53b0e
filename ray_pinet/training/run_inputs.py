"""What a sequence run reads, checked on the driver before Ray Train starts: the prepared folder
(prepared first when it is missing), its ``RunMeta``, the settings only the data can check, and
``run.init_from`` / ``run.warm_start`` checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ray_pinet import storage_uri
from ray_pinet.config import TrainConfig
from ray_pinet.config_base import ConfigError, config_diff, format_diff, from_dict, to_dict
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.pipeline import prepare, prepare_output
from ray_pinet.data.prepared import check_format
from ray_pinet.errors import DataError
from ray_pinet.evaluation.protocol import slice_names
from ray_pinet.storage_uri import local_or_uri, same_place
from ray_pinet.training.checkpoint import STATE_FILE, load_state
from ray_pinet.training.engine import RunMeta

SPLITS = ("train", "valid", "test")
PREPARED_FILES = ("prepare_config.json", "strata.json", "report.json", "users.parquet", "items.parquet")
# Prepare settings that do not change the prepared data: where it is written, and the number of
# user buckets the work is split into (the output is the same for any, tests/data/test_pipeline.py).
PREPARE_FREE = ("output", "num_buckets")


def missing_prepared(path: Path) -> list[str]:
    """What a complete ``prepare`` output has and ``path`` lacks (docs/design.md's contract)."""
    missing = [f for f in PREPARED_FILES if not (path / f).is_file()]
    return missing + [f"{s}/*.parquet" for s in SPLITS if not any((path / s).glob("*.parquet"))]


def prepare_config_of(cfg: TrainConfig, path) -> PrepareConfig:
    """``data.prepare`` resolved as ``train`` runs it (output = data.path)."""
    try:
        return PrepareConfig.from_yaml(cfg.data.prepare, [f"output={path}"])
    except ConfigError as exc:
        raise ConfigError(f"data.prepare={cfg.data.prepare!r}: {exc}") from None


def _no_data(path) -> ConfigError:
    return ConfigError(f"data.path={str(path)!r}: no prepared data there: run `ray-pinet prepare` first, or "
                       "set data.prepare to a prepare config so that train prepares it")


def ensure_prepared(cfg: TrainConfig, progress: bool = True) -> Path:
    """The prepared-data directory, running ``prepare`` first when it is missing (or empty).

    A folder that is there is checked, never silently reused or rewritten: a partial ``prepare``
    output is refused with what it lacks, and with ``data.prepare`` set, data prepared with other
    settings (any key but ``PREPARE_FREE``) is refused with the differing keys, as ``twotower``
    refuses stale pair data."""
    if storage_uri.is_remote(cfg.data.path):
        return _ensure_remote(cfg, progress)
    path = Path(storage_uri.local_path(cfg.data.path))
    if not path.is_dir() or not any(path.iterdir()):
        if not cfg.data.prepare:
            raise _no_data(path)
        prepare(prepare_config_of(cfg, path), progress=progress)
        return path
    missing = missing_prepared(path)
    if missing:
        how = (f"`ray-pinet prepare --config {cfg.data.prepare} --output {path}`" if cfg.data.prepare
               else "`ray-pinet prepare` with its config")
        raise DataError(f"data.path is not a complete prepared folder (an interrupted or partial "
                        f"prepare?): it lacks {', '.join(missing)}; prepare it again with {how}",
                        file=str(path))
    if cfg.data.prepare:
        _check_prepared_with(cfg, path)
    return path


def _ensure_remote(cfg: TrainConfig, progress: bool) -> Path:
    # A remote folder is prepared (uploaded) when empty, then read from a local copy that is
    # checked like a local folder (docs/design.md "Object storage"); errors name the URI.
    uri = storage_uri.local_or_uri(cfg.data.path)
    if not storage_uri.has_files(uri, "data.path"):
        if not cfg.data.prepare:
            raise _no_data(uri)
        prepare_output(prepare_config_of(cfg, uri), progress=progress)
    local = storage_uri.local_copy(uri, "data.path")
    try:
        return ensure_prepared(replace(cfg, data=replace(cfg.data, path=str(local))), progress)
    except DataError as exc:
        raise DataError(exc.reason.replace(str(local), uri), file=(exc.file or "").replace(str(local), uri),
                        column=exc.column, row=exc.row, value=exc.value) from None
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(str(local), uri), key=exc.key) from None


def _check_prepared_with(cfg: TrainConfig, path: Path) -> None:
    want = to_dict(prepare_config_of(cfg, path))
    have = read_json(path / "prepare_config.json")
    try:  # keys added to PrepareConfig since the folder was made take their defaults
        have = to_dict(from_dict(PrepareConfig, have))
    except ConfigError:
        pass  # compared as stored: the keys it no longer has are listed as differences
    diffs = config_diff(have, want, free=PREPARE_FREE)
    if diffs:
        listed = format_diff(diffs, template="{key}: prepared {old!r}, asked {new!r}")
        raise ConfigError(
            f"data.path={str(path)!r} holds data prepared with other settings than data.prepare="
            f"{cfg.data.prepare!r} ({listed}): set data.path to a new directory, or prepare this one "
            f"again with `ray-pinet prepare --config {cfg.data.prepare} --output {path}`")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError("prepared data file missing: prepare the folder again", file=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"prepared data file is not valid JSON ({exc}): prepare the folder again",
                        file=str(path)) from None


def load_run_meta(path: Path) -> RunMeta:
    check_format(path)
    strata = read_json(path / "strata.json")
    pconf = read_json(path / "prepare_config.json")
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


def check_run_inputs(cfg: TrainConfig, path: Path) -> RunMeta:
    """The data's RunMeta, after every check that needs the data (or a checkpoint) rather than
    the config alone: refused on the driver before Ray Train starts."""
    meta = load_run_meta(path)
    samples = read_json(path / "prepare_config.json").get("samples", {})
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
    for key in ("init_from", "warm_start"):
        if getattr(cfg.run, key):
            check_init_from(cfg, meta, key)
    return meta


def check_init_from(cfg: TrainConfig, meta: RunMeta, key: str = "init_from") -> None:
    """run.init_from / run.warm_start must be a finished checkpoint of the same model on the same data."""
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
