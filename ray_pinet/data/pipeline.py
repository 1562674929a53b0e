"""``prepare(cfg)``: raw log -> the prepared-data directory of docs/design.md, on Ray.

Parallel phases, each a set of Ray tasks (one CPU each) that read and write Parquet on disk, and one driver
step. Only summaries travel to the driver (counts, activeness histograms, per-item training counts), never
the log or a per-user table, so the driver is O(1) in users:

1. ingest (one task per input file): read + validate (``sources``), write ``canonical/`` and split the rows
   into ``num_buckets`` user buckets by a stable hash of the user id (``prepare_tasks.bucket_of``), keeping
   source order inside each bucket and every user whole in one bucket (instead of a hash shuffle: see below).
2. clean (one task per bucket): cleaning policies (``clean``); writes the bucket's rows and its users in
   user_idx order (hash slot, then id), returns counts, the bucket's activeness histogram and its per-item
   training counts (summed on the driver as they arrive).
3. driver: ``item_idx`` (items sorted by id, 1..M), strata from the activeness histogram
   (``strata.stratum_histograms``: exact, with prepare's tie-break), and each bucket's first user_idx and
   sample ids. Users are numbered bucket after bucket, so user_idx = the bucket's first + the rank inside the
   bucket, the same for any ``num_buckets`` (prepared format 2; format 1 numbered users by id, which needed
   every user on the driver). When some item appears only as a validation/test target, one small task round
   counts those rows per bucket (``unseen``).
4. samples (one task per bucket): the bucket's strata (global ranks from the driver's offsets), leave-one-out
   rows, windows and negatives (``samples``), and its rows of ``users.parquet``, which the driver
   concatenates one bucket at a time.

A bucket's scratch files are deleted as soon as its result is kept (``run_tasks(keep=...)``), so scratch disk
peaks at about one uncompressed copy of the log. One task's memory is about one bucket (rows / num_buckets):
raise ``num_buckets`` for larger logs (the benchmarks use about 1.25 M rows per bucket). ``prepare`` writes to
a local (or shared) filesystem path.

Why Ray tasks rather than a Ray Data ``read_parquet().map_batches()`` chain: the tie-break of equal timestamps
is the source order, and Ray Data's blocks do not carry a row's position in its file; per-file tasks know it
exactly. Ray Data's hash shuffle (``groupby``) is also several times slower than this bucketing on small
machines (ray-notes.md, measured numbers). ``report.json["tasks"]`` has each phase's task count, summed and
maximum task wall time and summed task CPU time, and how many tasks were reused from an unfinished run or
retried after their worker died.

Faults: ``prepare``'s docstring.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from ray_pinet import storage_uri
from ray_pinet.config_base import ConfigError, to_dict
from ray_pinet.data.clean import STAT_KEYS
from ray_pinet.data.config import PrepareConfig
from ray_pinet.data.prepare_tasks import (
    HASH_SLOTS,
    SPLITS,
    WORK_DIRS,
    CleanedSummary,
    ItemCounts,
    Plan,
    clean_one_bucket,
    concat_parquet,
    count_unseen,
    ingest_file,
    plan_buckets,
    sample_bucket,
    write_parquet,
)
from ray_pinet.data.prepared import PREPARED_FORMAT
from ray_pinet.data.ray_tasks import ensure_ray, run_tasks
from ray_pinet.data.schema import BEHAVIOR, ITEM, RATING, TS, USER
from ray_pinet.data.sources import display_name, output_columns, resolve_inputs
from ray_pinet.data.strata import format_strata_table
from ray_pinet.errors import DataError
from ray_pinet.outputs import refuse_foreign, refuse_input_inside, resumable_dir

_OUTPUTS = ("canonical", *SPLITS, "users.parquet", "items.parquet", "strata.json", "report.json",
            "prepare_config.json", "_work")
_DROPPED = ("partitions.json",)  # written into a prepared folder by retrain; see prepare()


@dataclass
class PrepareResult:
    output: Path
    strata: dict[str, Any]  # the strata.json content
    report: dict[str, Any]  # the report.json content


def prepare(cfg: PrepareConfig, progress: bool = True) -> PrepareResult:
    """Run the whole preparation and write ``cfg.output``; prints a summary. See docs/design.md.

    The output appears whole or not at all: everything is written into the sibling folder ``.<name>.partial``
    (``outputs.resumable_dir``), swapped in only when every phase succeeded, so a failed run (a mistyped input
    path, a bad row) leaves a previous prepared folder as it was. Refused before anything is written: an input
    inside the output or an existing output holding entries prepare does not write (replacing the output
    would delete them).

    Faults: a task whose worker process died is retried (``ray_tasks.TASK_RETRIES``); each task writes its
    files under temporary names, renamed into place when complete, then keeps its result in ``_work/done/``.
    A run that stops (killed, Ctrl-C, a worker lost beyond its retries) leaves ``.<name>.partial``; a rerun
    with the same config, input files (names, sizes, modification times) and data-layer code loads the
    finished tasks' results instead of running them (``report.json`` ``tasks.<phase>.reused``), anything
    else empties it first, with a note. Bad input or settings (DataError, ConfigError) remove it: nothing in
    it could be reused.
    """
    _validate(cfg)
    out = Path(cfg.output)
    notes: list[str] = []
    fs, files = resolve_inputs(cfg.source.path, notes)  # before anything is touched
    if isinstance(fs, pafs.LocalFileSystem):
        refuse_input_inside(out, files)
    # Nothing that other commands put into a prepared folder is carried over: ``partitions.json`` (retrain)
    # says which date partitions the folder holds, which a re-prepare may change; retrain writes it again
    # after its own prepare, and a missing one only costs retrain a fresh prepare, while a stale one would
    # make it reuse the wrong data.
    refuse_foreign(out, (*_OUTPUTS, *_DROPPED))
    ensure_ray()
    # A real output that is a symlink is replaced at its target (the link stays).
    target = out.resolve() if out.is_symlink() else out
    with resumable_dir(target, _resume_state(cfg, fs, files), discard_on=(DataError, ConfigError)) as part:
        if part.note:
            print(f"ray-pinet prepare: {part.note}", file=sys.stderr, flush=True)
        run = _Run(cfg, part.path, fs, files, progress)
        ingested = run.ingest()
        cleaned, item_counts = run.clean()
        plan, unseen_ids = run.plan(cleaned, item_counts)
        counts = run.samples(plan, unseen_ids)
        report = _report(cfg, ingested, cleaned, plan, counts, run, notes)
        (part.path / "strata.json").write_text(json.dumps(plan.strata, indent=2))
        (part.path / "report.json").write_text(json.dumps(report, indent=2))
        (part.path / "prepare_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    result = PrepareResult(output=out, strata=plan.strata, report=report)
    print(format_summary(result), flush=True)
    return result


class _Run:
    """The phases of one run (module docstring) and what they share: the config whose ``output`` is the
    partial folder (the tasks write there; prepare_config.json records the real one), the input files, and
    each phase's task counts and wall time for report.json."""

    def __init__(self, cfg: PrepareConfig, tmp: Path, fs, files: list[str], progress: bool) -> None:
        self.cfg = dataclasses.replace(cfg, output=str(tmp))
        self.tmp, self.work = tmp, tmp / "_work"
        self.fs, self.files, self.progress = fs, files, progress
        self.buckets = range(cfg.num_buckets)
        self.bucket_cols = [USER, ITEM, TS] + [RATING] * (cfg.clean.min_rating is not None)
        self.bucket_cols += [BEHAVIOR] * bool(cfg.source.behaviors)
        self.tasks: dict[str, dict] = {}
        self.timings: dict[str, float] = {}
        for d in ("canonical", *SPLITS, *(f"_work/{w}" for w in WORK_DIRS)):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        self._start = time.perf_counter()

    def _run_tasks(self, fn, args: list[tuple], phase: str, keep=None) -> list:
        return run_tasks(fn, args, phase, self.progress, self.tasks, self.work / "done", keep=keep)

    def _lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase], self._start = now - self._start, now

    def ingest(self) -> list[dict]:
        args = [(i, self.fs, f, self.cfg, self.bucket_cols) for i, f in enumerate(self.files)]
        ingested = self._run_tasks(ingest_file, args, "ingest")
        if sum(r["rows_read"] for r in ingested) == 0:
            where = self.files[0] if len(self.files) == 1 else self.cfg.source.path
            raise DataError("input is empty: no data rows", file=where)
        self._lap("ingest")
        return ingested

    def clean(self) -> tuple[list[CleanedSummary], ItemCounts]:
        item_counts = ItemCounts()

        def fold(b: int, summary: CleanedSummary) -> CleanedSummary:
            # The bucket's scratch input goes at once (module docstring); a rerun loads its kept result.
            item_counts.add(summary.items)
            shutil.rmtree(self.work / "buckets" / f"{b:04d}", ignore_errors=True)
            return dataclasses.replace(summary, items=None)

        args = [(b, self.cfg, self.bucket_cols, self.files, self.fs) for b in self.buckets]
        cleaned = self._run_tasks(clean_one_bucket, args, "clean", keep=fold)
        self._lap("clean")
        return cleaned, item_counts

    def plan(self, cleaned: list[CleanedSummary], item_counts: ItemCounts) -> tuple[Plan, pa.Array]:
        """The driver step; also returns the items that are only validation/test targets."""
        import ray

        items = item_counts.table()
        unseen_ids = pc.filter(items[ITEM], pc.equal(items["count"], 0)).combine_chunks()
        unseen_counts = [(0, 0)] * self.cfg.num_buckets
        if len(unseen_ids):  # one small round over the users files; most logs skip it
            unseen_ref = ray.put(unseen_ids)
            args = [(b, self.cfg, unseen_ref) for b in self.buckets]
            unseen_counts = self._run_tasks(count_unseen, args, "unseen")
        plan = plan_buckets(self.cfg, cleaned, items, unseen_counts)
        write_parquet(plan.items, self.tmp / "items.parquet")
        self._lap("index_and_strata")
        return plan, unseen_ids

    def samples(self, plan: Plan, unseen_ids: pa.Array) -> dict[str, int]:
        """Phase 4 and users.parquet; rows written per split."""
        import ray

        items_ref = ray.put(plan.item_ids)
        drop_ref = ray.put(unseen_ids) if self.cfg.clean.unseen_items == "drop" and len(unseen_ids) else None

        def drop_scratch(b: int, written: dict) -> dict:
            for name in ("clean", "users"):
                (self.work / name / f"{b:04d}.parquet").unlink(missing_ok=True)
            return written

        args = [(b, self.cfg, plan.buckets[b], items_ref, drop_ref) for b in self.buckets]
        written = self._run_tasks(sample_bucket, args, "samples", keep=drop_scratch)
        concat_parquet([self.work / "users_out" / f"{b:04d}.parquet" for b in self.buckets],
                       self.tmp / "users.parquet")
        self._lap("samples")
        shutil.rmtree(self.work)  # only now: a run that stops keeps it for the next to resume from
        counts = {s: sum(w[s] for w in written) for s in SPLITS}
        expected = {"train": plan.train_rows, "valid": plan.valid_rows, "test": plan.test_rows}
        if counts != expected:
            raise RuntimeError(f"internal error: wrote {counts} rows, planned {expected}")
        return counts


def _validate(cfg: PrepareConfig) -> None:
    for part in (cfg.source, cfg.clean, cfg.strata, cfg.samples):
        part.validate()
    if not 1 <= cfg.num_buckets <= HASH_SLOTS:
        raise ConfigError(f"num_buckets must be in 1..{HASH_SLOTS}, got {cfg.num_buckets}")
    cols = output_columns(cfg.source)
    for key, used, col in (("clean.min_rating", cfg.clean.min_rating is not None, RATING),
                           ("source.behaviors", bool(cfg.source.behaviors), BEHAVIOR)):
        if used and col not in cols:
            raise ConfigError(f"{key} is set but source format {cfg.source.format!r} has no {col} column")


# What a task runs: a change to any of these makes the kept results of an unfinished run stale.
_CODE = sorted([*Path(__file__).parent.glob("*.py"), Path(__file__).parents[1] / "keyed_random.py"])


def _resume_state(cfg: PrepareConfig, fs, files: list[str]) -> dict[str, Any]:
    """Everything a task's output depends on (``outputs.resumable_dir`` compares it): the resolved config,
    each input file's name, size and mtime, code and libraries."""
    code = hashlib.sha256()
    for p in _CODE:
        code.update(p.read_bytes())
    return {
        "config": to_dict(cfg),
        "input files": [{"path": display_name(fs, f), "size": info.size, "mtime_ns": info.mtime_ns}
                        for f, info in zip(files, fs.get_file_info(files))],
        "code": {"sha256": code.hexdigest(), "pyarrow": pa.__version__, "numpy": np.__version__},
    }


def _report(cfg, ingested, cleaned, plan: Plan, counts, run: _Run, notes: list[str]) -> dict[str, Any]:
    s = {k: sum(c.stats[k] for c in cleaned) for k in STAT_KEYS}
    removed = sum(v for k, v in s.items() if k.startswith("removed_") and not k.endswith("_users"))
    if s["rows_in"] - removed != s["rows_out"]:
        raise RuntimeError(f"internal error: row accounting does not add up: {s}")
    return {
        "prepared_format": PREPARED_FORMAT,
        "source": {
            "format": cfg.source.format,
            "path": cfg.source.path,
            "timestamp_unit": "position" if cfg.source.format == "amazon_seq" else (
                cfg.source.timestamp_unit if cfg.source.format in ("csv", "parquet") else "s"
            ),
            "files": ingested,
            "rows_read": s["rows_in"],
            "users_read": s["users_in"],
            "skipped_paths": notes,
        },
        "filters": [
            {"filter": "sample_users", "setting": cfg.clean.sample_users,
             "removed_rows": s["removed_sample_users_rows"], "removed_users": s["removed_sample_users_users"]},
            {"filter": "behaviors", "setting": cfg.source.behaviors or "all",
             "removed_rows": s["removed_behaviors_rows"], "removed_users": s["removed_behaviors_users"]},
            {"filter": "min_rating", "setting": cfg.clean.min_rating,
             "removed_rows": s["removed_min_rating_rows"], "removed_users": s["removed_min_rating_users"]},
            {"filter": "duplicates", "setting": cfg.clean.duplicates,
             "removed_rows": s["removed_duplicates"], "removed_users": 0},
            {"filter": "min_history", "setting": cfg.clean.min_history,
             "removed_rows": s["removed_min_history_rows"], "removed_users": s["removed_min_history_users"]},
            {"filter": "unseen_items", **plan.unseen},
        ],
        "out_of_order": {
            "rows": s["out_of_order_rows"],
            "users": s["out_of_order_users"],
            "action": "each user's events sorted by (timestamp, source order); nothing removed",
        },
        "result": {
            "rows": s["rows_out"],
            "users": s["users_out"],
            "items": plan.items.num_rows,
            "train_rows": counts["train"],
            "train_targets": plan.train_targets,
            "valid_rows": counts["valid"],
            "test_rows": counts["test"],
            "users_without_train_target": plan.no_target_users,
        },
        "num_buckets": cfg.num_buckets,
        "timings_s": {k: round(v, 3) for k, v in run.timings.items()},
        "tasks": run.tasks,
    }


def format_summary(result: PrepareResult) -> str:
    """The printed summary: what was read, every filter with what it removed, the result, the strata."""
    r = result.report
    lines = [
        f"ray-pinet prepare -> {result.output}",
        f"  read     {r['source']['rows_read']:>12,} rows  {r['source']['users_read']:>10,} users  "
        f"from {len(r['source']['files'])} file(s) ({r['source']['format']})",
    ]
    skipped = r["source"].get("skipped_paths", [])
    lines += [f"  input    {note}" for note in skipped[:10]]
    if len(skipped) > 10:
        lines.append(f"  input    ... {len(skipped) - 10} more skipped path(s): "
                     "report.json source.skipped_paths")
    lines += [f"  {f['filter']:<12} {str(f['setting']):<12} removed {f['removed_rows']:>10,} rows "
              f"{f['removed_users']:>8,} users" for f in r["filters"][:-1]]
    u = r["filters"][-1]  # unseen_items, always last
    lines.append(f"  unseen_items {u['setting']:<12} valid {u['valid_rows_unseen']:,} / "
                 f"test {u['test_rows_unseen']:,} targets unseen in training; "
                 f"removed {u['removed_valid_rows']:,} / {u['removed_test_rows']:,}")
    o = r["out_of_order"]
    lines.append(f"  out-of-order {o['rows']:,} rows of {o['users']:,} users (sorted, kept)")
    res = r["result"]
    lines.append(
        f"  result   {res['rows']:>12,} rows  {res['users']:>10,} users  {res['items']:,} items; samples "
        f"train {res['train_rows']:,} ({res['train_targets']:,} targets), valid {res['valid_rows']:,}, "
        f"test {res['test_rows']:,}; {res['users_without_train_target']:,} users without a training target"
    )
    lines.append(format_strata_table(result.strata))
    tasks = r.get("tasks", {})
    reused = [f"{t['reused']}/{t['reused'] + t['tasks']} {k}" for k, t in tasks.items() if t.get("reused")]
    if reused:
        lines.append(f"  resumed  kept results of an unfinished run: {', '.join(reused)} tasks")
    retried = [f"{t['retried']} {k}" for k, t in tasks.items() if t.get("retried")]
    if retried:
        lines.append(f"  retried  {', '.join(retried)} task attempt(s) after their worker died")
    lines.append("  timings " + ", ".join(f"{k} {v:.1f}s" for k, v in r["timings_s"].items()))
    return "\n".join(lines)


def prepare_output(cfg: PrepareConfig, progress: bool = True):
    """``prepare(cfg)`` for any ``cfg.output``: a local path or ``file://`` URI is prepared in place; a remote
    URI into a local staging folder, then uploaded (storage_uri's module docstring). The PrepareResult's
    ``output`` is the local folder prepared."""
    if not storage_uri.is_remote(cfg.output):
        return prepare(dataclasses.replace(cfg, output=storage_uri.local_path(cfg.output)), progress=progress)
    uri = storage_uri.local_or_uri(cfg.output)
    sources = cfg.source.path if isinstance(cfg.source.path, (list, tuple)) else [cfg.source.path]
    stage = storage_uri.staging_for(uri, (*_OUTPUTS, *_DROPPED), list(sources))
    result = prepare(dataclasses.replace(cfg, output=str(stage)), progress=progress)
    return dataclasses.replace(result, output=storage_uri.publish_staged(stage, uri))
