"""Issue 18 findings 3 and 6: runs are not mislabelled, bad settings are refused before Ray Train
starts, and every expected failure of the CLI is one line on stderr with exit code 2.

One real `train` (joint, 1 epoch, the dev quarter of ml-latest-small) is shared by the module: the
checkpoint a relaunch would resume is Ray Train V2's own layout, not a hand-made one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
import typing
from pathlib import Path

import pytest
import yaml

from ray_pinet.cli import main
from ray_pinet.config import TrainConfig
from ray_pinet.config_base import ConfigError, from_dict
from ray_pinet.data.config import PrepareConfig
from ray_pinet.twotower_config import TwoTowerConfig
from tests.conftest import DEV_PREPARE, REPO, shared_file, small_run_args

NAME = "resume"


def _sets(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory):
    """(tmp, uri, train argv, the run's FitResult) of one finished 1-epoch joint run."""
    from ray_pinet.training.trainer import fit

    tmp = tmp_path_factory.mktemp("resume")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = small_run_args(tmp, uri) + ["--set", "method=joint", "--set", "optim.max_epochs=1",
                                       "--set", f"run.name={NAME}"]
    cfg = TrainConfig.from_yaml(args[1], _sets(args))
    cwd = os.getcwd()
    os.chdir(REPO)  # the prepare config names the bundled data relative to the repo
    try:
        t0 = time.perf_counter()
        res = fit(cfg)
        print(f"\n[resume fixture] prepare + 1-epoch fit: {time.perf_counter() - t0:.1f} s")
    finally:
        os.chdir(cwd)
    return tmp, uri, ["train", *args], res


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = main(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    return code, err


def _one_error_line(err: str, kind: str = "config error") -> str:
    lines = [line for line in err.splitlines() if line.startswith("ray-pinet:")]
    assert len(lines) == 1 and f"ray-pinet: {kind}:" in lines[0], err
    assert "Traceback" not in err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _mlflow_runs(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ray-pinet")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`ray_pinet.run_name` = '{name}'",
                              order_by=["attributes.start_time ASC"])


# -- finding 3: resuming compares configs ----------------------------------------------------
@pytest.mark.slow  # the module's one Ray Train fit
def test_the_driver_finds_the_checkpoint_ray_train_resumes(finished):
    from ray_pinet.training.resume import latest_checkpoint

    tmp, _, _, res = finished
    assert latest_checkpoint(tmp / "runs" / NAME) == Path(res.checkpoint_path)
    assert latest_checkpoint(tmp / "runs" / "never-ran") is None


@pytest.mark.slow  # the module's one Ray Train fit
def test_relaunch_with_another_config_is_refused_naming_the_keys(finished, capsys):
    tmp, uri, argv, _ = finished
    before, runs_before = _snapshot(tmp / "runs" / NAME), len(_mlflow_runs(uri, NAME))
    code, err = _cli(argv + ["--set", "optim.lr=0.005", "--set", "model.dropout=0.3"], capsys)
    line = _one_error_line(err)
    assert code == 2
    assert f"run '{NAME}' already has a checkpoint" in line
    assert "model.dropout: 0.2 -> 0.3" in line and "optim.lr: 0.002 -> 0.005" in line
    assert "--fresh" in line
    # nothing ran: the checkpoints and the MLflow runs are as they were
    assert _snapshot(tmp / "runs" / NAME) == before
    assert len(_mlflow_runs(uri, NAME)) == runs_before


@pytest.mark.slow  # the module's one Ray Train fit
def test_keys_that_do_not_change_results_may_differ_on_resume(finished):
    from ray_pinet.training.resume import check_resume
    from ray_pinet.training.checkpoint import load_state

    tmp, _, argv, res = finished
    same = TrainConfig.from_yaml(argv[2], _sets(argv) + [
        "run.num_workers=2", "run.progress=true", "run.max_failures=3", "run.torch_threads=1",
        "run.collective_timeout_s=60", "tracking.experiment=elsewhere", "data.prepare=null"])
    ckpt = check_resume(TrainConfig, same, str(tmp / "runs"), lambda d: load_state(str(d))["config"])
    assert ckpt == Path(res.checkpoint_path)
    changed = TrainConfig.from_yaml(argv[2], _sets(argv) + ["run.seed=1", "eval.k=20"])
    with pytest.raises(ConfigError, match=r"eval.k: 10 -> 20; run.seed: 0 -> 1"):
        check_resume(TrainConfig, changed, str(tmp / "runs"), lambda d: load_state(str(d))["config"])


@pytest.mark.slow  # the module's one Ray Train fit
def test_twotower_relaunch_with_another_config_is_refused(finished, tmp_path, capsys):
    """The two-tower driver applies the same rule. Its run folder is Ray Train's layout (the
    snapshot file of the real run above, naming a checkpoint that holds a two-tower state)."""
    import torch

    tmp, _, _, res = finished
    config = str(REPO / "configs/twotower/ml-100k-onebp.yaml")
    sets = [f"data.source.path={shared_file('ml-100k/u.data')}", f"data.output={tmp_path / 'pairs'}",
            "data.max_users=60", f"run.storage_path={tmp_path / 'runs'}", "run.name=tt",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    run_dir = tmp_path / "runs" / "tt"
    run_dir.mkdir(parents=True)
    shutil.copy(tmp / "runs" / NAME / "checkpoint_manager_snapshot.json", run_dir)
    for real in (tmp / "runs" / NAME).glob("checkpoint_*"):  # every checkpoint the snapshot names
        if real.is_dir():
            (run_dir / real.name).mkdir()
            torch.save({"run": {}, "history": [], "config": TwoTowerConfig.from_yaml(config, sets).to_dict()},
                       run_dir / real.name / "state.pt")
    assert (run_dir / Path(res.checkpoint_path).name).is_dir()
    argv = ["twotower", "--config", config] + [x for s in sets + ["optim.lr=0.01"] for x in ("--set", s)]
    code, err = _cli(argv, capsys)
    line = _one_error_line(err)
    assert code == 2 and "run 'tt' already has a checkpoint" in line and "optim.lr: 0.0005 -> 0.01" in line
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["tt"]


@pytest.mark.slow  # the module's one Ray Train fit
def test_a_run_folder_missing_a_checkpoint_is_named(finished, tmp_path):
    """A snapshot naming a checkpoint that is gone: Ray Train's controller died on it with an
    actor traceback; the driver names it and the way out."""
    from ray_pinet.training.resume import latest_checkpoint

    tmp, _, _, res = finished
    shutil.copytree(tmp / "runs" / NAME, tmp_path / NAME)
    shutil.rmtree(tmp_path / NAME / Path(res.checkpoint_path).name)
    with pytest.raises(ConfigError, match=rf"checkpoint\(s\) \['{Path(res.checkpoint_path).name}'\].*--fresh"):
        latest_checkpoint(tmp_path / NAME)


def test_unfinished_mlflow_run_is_not_reopened_with_other_params(tmp_path):
    """A run that stopped before its first checkpoint starts from scratch: it gets a new MLflow
    run when its params changed (the old one would show the old params)."""
    from ray_pinet.tracking import mlflow_utils as mu
    from ray_pinet.training.resume import RESUME_FREE

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrainConfig().to_dict()
    first, _ = mu.start_or_resume_run(uri, "x", "r", cfg, free=RESUME_FREE)
    again, resumed = mu.start_or_resume_run(uri, "x", "r", {**cfg, "run": {**cfg["run"], "num_workers": 4}},
                                            free=RESUME_FREE)
    assert (again, resumed) == (first, True)
    other, resumed = mu.start_or_resume_run(uri, "x", "r", {**cfg, "optim": {**cfg["optim"], "lr": 0.5}},
                                            free=RESUME_FREE)
    assert other != first and not resumed


# -- finding 3: prepared data records the settings that made it ------------------------------
@pytest.mark.slow  # the module's one Ray Train fit
def test_prepared_data_made_with_other_settings_is_refused(finished, tmp_path, capsys):
    tmp, _, argv, _ = finished
    other = yaml.safe_load(DEV_PREPARE.read_text())
    other["strata"]["q"] = 0.3
    other["samples"]["train_negatives"] = 2
    other["num_buckets"] = 2  # does not change the data: not reported
    (tmp_path / "prepare.yaml").write_text(yaml.safe_dump(other))
    before = _snapshot(tmp / "prepared")
    code, err = _cli(argv + ["--set", f"data.prepare={tmp_path / 'prepare.yaml'}"], capsys)
    line = _one_error_line(err)
    assert code == 2
    assert "holds data prepared with other settings" in line
    assert "samples.train_negatives: prepared 1, asked 2; strata.q: prepared 0.2, asked 0.3)" in line
    assert "num_buckets" not in line
    assert _snapshot(tmp / "prepared") == before


@pytest.mark.parametrize("remove, named", [
    (["prepare_config.json", "test"], "lacks prepare_config.json, test/*.parquet"),
    (["items.parquet"], "lacks items.parquet"),
])
@pytest.mark.slow  # the module's one Ray Train fit
def test_half_written_prepared_folder_is_named_not_a_traceback(finished, tmp_path, capsys, remove, named):
    tmp, _, argv, _ = finished
    half = tmp_path / "half"
    shutil.copytree(tmp / "prepared", half)
    for name in remove:
        p = half / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    before = _snapshot(half)
    code, err = _cli(argv + ["--set", f"data.path={half}", "--set", "run.name=half"], capsys)
    line = _one_error_line(err, "bad input")
    assert code == 2 and named in line and "prepare it again" in line and str(half) in line
    assert _snapshot(half) == before


@pytest.mark.parametrize("sets, message", [
    (["data.prepare=null"], "no prepared data there: run `ray-pinet prepare`"),
    (["model.max_len=30"], "model.max_len=30 but"),
    (["eval.candidates=100"], "eval.candidates=100 but"),
    (["eval.select_slice=s3"], "eval.select_slice='s3': the data at"),
    (["data.train_strata=[5]"], "data.train_strata [5]: the data at"),
    (["stage2.unseen_stratum=2"], "stage2.unseen_stratum=2: the data at"),
], ids=["missing-data", "max-len", "candidates", "select-slice", "train-strata", "unseen-stratum"])
@pytest.mark.slow  # the module's one Ray Train fit
def test_data_dependent_settings_are_refused_before_ray_train(finished, capsys, sets, message):
    tmp, _, argv, _ = finished
    extra = sets if sets != ["data.prepare=null"] else sets + [f"data.path={tmp / 'nowhere'}"]
    code, err = _cli(argv + ["--set", "run.name=refused"] + [x for s in extra for x in ("--set", s)], capsys)
    assert code == 2 and message in _one_error_line(err)
    assert not (tmp / "runs" / "refused").exists()  # refused before Ray Train made its folder


# -- finding 6: every config value validated at load -----------------------------------------
def _leaves(cls, prefix=""):
    """(dotted key, type) of every scalar int/float field under a config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if typing.get_origin(tp) is typing.Union and len(args) == 1 else tp
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(base):
            yield from _leaves(base, key + ".")
        elif base in (int, float):
            yield key, base


def _build(cls, key, value):
    d: dict = {}
    cur = d
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return from_dict(cls, d)


CONFIGS = [TrainConfig, TwoTowerConfig, PrepareConfig]
# Where 0 means something (off, no limit, the first stratum, the first seed, joint training...).
ZERO_OK = {
    "ga.alpha", "stage2.backbone_lr_scale", "stage2.max_minutes", "stage2.unseen_stratum",
    "finetune.max_minutes", "reweight.power", "transfer.adv_weight", "transfer.disc_hidden",
    "optim.weight_decay", "optim.grad_clip", "optim.max_minutes", "eval.candidates", "run.seed",
    "run.torch_threads", "run.max_failures", "model.dropout", "stage2.plugin.head_layers",
    "run.gpus_per_worker", "run.device_data_mb",  # CPU workers; training rows always in host memory
    "sampled.beta",  # proposal (count + 1)^0: every item equally likely
    # two-tower
    "data.min_rating", "data.label_threshold", "data.valid_share", "data.split_seed", "model.beta",
    "model.tce_drop_rate", "model.tce_num_gradual", "model.rce_alpha", "model.auc_ns.alpha",
    "model.auc_ns.beta", "model.auc_ns.gamma", "eval.patience",
    # prepare
    "clean.min_rating", "samples.train_negatives", "samples.eval_candidates", "seed",
}
# Where a negative value means something: a head-heavy prior or weighting, Ray's unlimited
# restarts, and rating thresholds (ratings may be negative on some scales).
NEGATIVE_OK = {"ga.alpha", "reweight.power", "run.max_failures", "data.min_rating", "data.label_threshold",
               "clean.min_rating"}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_number_refuses_nan_and_infinity(cls):
    for key, _tp in _leaves(cls):
        for bad in (math.nan, math.inf, -math.inf, ".nan", ".inf"):
            with pytest.raises(ConfigError, match=rf"{key}\b"):
                _build(cls, key, float(bad) if isinstance(bad, float) else yaml.safe_load(bad))


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_number_refuses_zero_and_negatives_where_meaningless(cls):
    """A loop over every int/float field of every section: 0 and -1 are refused at load with
    the field named, unless listed above with their meaning."""
    for key, _tp in _leaves(cls):
        leaf = key.rsplit(".", 1)[-1]
        for value, allowed in ((0, ZERO_OK), (-1, NEGATIVE_OK)):
            if key in allowed:
                _build(cls, key, value)  # accepted
                continue
            with pytest.raises(ConfigError, match=leaf) as exc:
                _build(cls, key, value)
            section = key.rsplit(".", 1)[0] if "." in key else ""
            assert section in str(exc.value), (key, str(exc.value))


@pytest.mark.parametrize("sets, message", [
    (["optim.lr=nan"], "optim.lr: must be a finite number, got 'nan'"),
    (["optim.lr=.inf"], "optim.lr: must be a finite number, got inf"),
    (["model.dropout=.nan"], "model.dropout: must be a finite number"),
    (["ga.bucket_cap_mb=-.inf"], "ga.bucket_cap_mb: must be a finite number"),
    (["eval.every=0"], "eval.every must be >= 1"),
    (["eval.k=0"], "eval.k must be >= 1"),
    (["eval.select_slice=b0"], "eval.select_slice must be all, tail, head"),
    (["optim.patience=0"], "optim.patience must be >= 1"),
    (["stage2.max_epochs=0"], "stage2.max_epochs must be >= 1"),
    (["run.seed=-1"], "run.seed must be in [0, 2^63)"),
    (["run.name=a/b"], "run.name must be a non-empty name"),
    (["run.name=it's"], "run.name must be a non-empty name"),
    (["data.path="], "data.path must be a prepared-data directory"),
    (["tracking.register_as=m", "tracking.log_model=false"], "tracking.register_as must be unset unless"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_train_cli_refuses_bad_values_at_load(capsys, sets, message):
    code, err = _cli(["train", "--print-config"] + [x for s in sets for x in ("--set", s)], capsys)
    assert code == 2 and message in _one_error_line(err)


@pytest.mark.parametrize("sets, message", [
    (["optim.lr=.nan"], "optim.lr: must be a finite number"),
    (["model.dropout=1.0"], "model.dropout must be in [0, 1)"),
    (["model.auc_ns.alpha=2"], "model.auc_ns.alpha must be in [0, 1], got 2.0"),
    (["optim.epochs=5"], "optim.epochs was renamed to optim.max_epochs"),
    (["optim.l2=0"], "optim.l2 was renamed to optim.weight_decay"),
    (["optim.lr_milestones=[20, 10]"], "optim.lr_milestones must be strictly increasing"),
    (["tracking.log_model=true"], "two-tower runs log no served model"),
    (["data.split_seed=-1"], "data.split_seed must be >= 0"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_twotower_cli_refuses_bad_values_at_load(capsys, sets, message):
    argv = ["twotower", "--config", str(REPO / "configs/twotower/ml-100k-onebp.yaml"), "--print-config"]
    code, err = _cli(argv + [x for s in sets for x in ("--set", s)], capsys)
    assert code == 2 and message in _one_error_line(err)


# -- the CLI: one line, exit code 2 ------------------------------------------------------------
@pytest.mark.slow  # the module's one Ray Train fit
def test_json_output_into_a_missing_directory_is_refused_before_training(finished, tmp_path, capsys):
    tmp, _, argv, _ = finished
    code, err = _cli(argv + ["--json", str(tmp_path / "no" / "final.json")], capsys)
    assert code == 2 and "--json" in _one_error_line(err) and "does not exist" in err


def test_config_that_is_a_directory_is_one_line(capsys):
    code, err = _cli(["train", "--config", str(REPO / "configs"), "--print-config"], capsys)
    assert code == 2 and "cannot be read" in _one_error_line(err) and "configs" in err


def test_tune_num_samples_must_be_positive(capsys):
    """Tune reads num_samples=-1 as "sample forever"; 0 was silently the space's value."""
    for bad in ("-1", "0"):
        with pytest.raises(SystemExit) as exc:
            main(["tune", "--space", str(REPO / "tune_spaces/smoke.yaml"), "--num-samples", bad])
        assert exc.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err


def test_twotower_pair_data_with_other_settings_or_half_written(tmp_path, capsys):
    config = str(REPO / "configs/twotower/ml-100k-onebp.yaml")
    sets = [f"data.source.path={shared_file('ml-100k/u.data')}", f"data.output={tmp_path / 'pairs'}",
            "data.max_users=60", f"run.storage_path={tmp_path / 'runs'}"]
    from ray_pinet.kinds.twotower import ensure_pairs

    ensure_pairs(TwoTowerConfig.from_yaml(config, sets), progress=False)
    before = _snapshot(tmp_path / "pairs")
    argv = ["twotower", "--config", config] + [x for s in sets for x in ("--set", s)]
    code, err = _cli(argv + ["--set", "data.valid_share=0.1"], capsys)
    assert code == 2 and "data.valid_share: prepared 0.0, asked 0.1" in _one_error_line(err)
    (tmp_path / "pairs" / "test.parquet").unlink()
    code, err = _cli(argv, capsys)
    assert code == 2 and "it lacks test.parquet" in _one_error_line(err, "bad input")
    assert set(_snapshot(tmp_path / "pairs")) == set(before) - {"test.parquet"}


# -- --fresh (last: it moves the fixture's run folder aside) ------------------------------
def test_fresh_is_a_flag_of_train_and_twotower():
    from ray_pinet.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--fresh"]).fresh and not parser.parse_args(["train"]).fresh
    assert parser.parse_args(["twotower", "--fresh"]).fresh


@pytest.mark.slow  # the module's one Ray Train fit
def test_fresh_keeps_the_old_run_folder_and_opens_a_new_mlflow_run(finished, capsys):
    """What ``train --fresh`` does before Ray Train starts (``fit(fresh=True)``): the real run
    folder moves aside whole and a new MLflow run is opened with the new params. The training
    that follows is an ordinary first run (no second fit here: the suite's time)."""
    from ray_pinet.training.resume import check_resume, latest_checkpoint
    from ray_pinet.training.trainer import start_tracking
    from ray_pinet.training.checkpoint import load_state

    tmp, uri, argv, res = finished
    old_files = _snapshot(tmp / "runs" / NAME)
    old_runs = _mlflow_runs(uri, NAME)
    changed = TrainConfig.from_yaml(argv[2], _sets(argv) + ["optim.lr=0.005"])
    storage = str(tmp / "runs")
    assert check_resume(TrainConfig, changed, storage, lambda d: load_state(str(d))["config"], fresh=True) is None
    out = capsys.readouterr().out
    kept = [p for p in (tmp / "runs").iterdir() if p.name.startswith(f"{NAME}.replaced-")]
    assert len(kept) == 1 and f"its previous folder is kept as {kept[0]}" in out
    assert _snapshot(kept[0]) == old_files  # moved whole: nothing rewritten or deleted
    assert load_state(str(kept[0] / Path(res.checkpoint_path).name))["config"]["optim"]["lr"] == 0.002
    assert not (tmp / "runs" / NAME).exists() and latest_checkpoint(tmp / "runs" / NAME) is None
    # a second --fresh keeps both earlier folders
    (tmp / "runs" / NAME).mkdir()
    check_resume(TrainConfig, changed, storage, lambda d: {}, fresh=True)
    assert len([p for p in (tmp / "runs").iterdir() if p.name.startswith(f"{NAME}.replaced-")]) == 2

    _, run_id, _ = start_tracking(changed.tracking, NAME, changed.to_dict(), storage, None, {}, [], fresh=True)
    runs = _mlflow_runs(uri, NAME)
    assert len(runs) == len(old_runs) + 1 and runs[-1].info.run_id == run_id
    assert run_id not in {r.info.run_id for r in old_runs}
    assert runs[-1].data.params["optim.lr"] == "0.005" and runs[0].data.params["optim.lr"] == "0.002"
