"""Cheap re-stratification (data/restratify.py) on a real dataset: a restratified view of one
``prepare`` gives the strata.json, users and per-sample strata (as the training reader and the
driver-side reader see them) of a fresh ``prepare`` with that stratification, and a sweep's
trials that differ only in the stratification are served by one prepare.

Data: ``configs/prepare/ml-latest-small-dev.yaml`` (170 whole users of the bundled MovieLens
latest-small, the end-to-end tests' data), each fresh prepare ~4 s."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_pinet.config_base import apply_overrides, from_dict, load_yaml, to_dict
from ray_pinet.data.config import PrepareConfig, StrataConfig
from ray_pinet.data.pipeline import prepare
from ray_pinet.data.prepared import SPLITS, VIEW_FILE, read_split
from ray_pinet.data.restratify import restratify
from ray_pinet.errors import DataError
from ray_pinet.training.shards import read_shard
from tests.conftest import DEV_PREPARE, REPO

# Each differs from the base (top_fraction q = 0.2) for some users; two thresholds of min_count.
STRATA = {
    "top_fraction": {"mode": "top_fraction", "q": 0.3},
    "min_count": {"mode": "min_count", "tau": 100},
    "min_count_low": {"mode": "min_count", "tau": 40},
    "quantiles": {"mode": "quantiles", "k": 3},
}


def _prepare(output: Path, strata: dict | None = None) -> Path:
    over = [f"source.path={REPO / 'data/ml-latest-small/ratings.csv'}", f"output={output}"]
    over += [f"strata.{k}={json.dumps(v)}" for k, v in (strata or {}).items()]
    prepare(from_dict(PrepareConfig, apply_overrides(load_yaml(DEV_PREPARE), over)), progress=False)
    return output


@pytest.fixture(scope="module")
def data(ray_cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("restratify")
    base = _prepare(tmp / "prepared")
    fresh = {name: _prepare(tmp / "fresh" / name, s) for name, s in STRATA.items()}
    return tmp, base, fresh


def _reader_table(path: Path, split: str) -> pa.Table:
    """A split as the Train workers receive it (read_shard's blocks of 2 ranks), in sample_id order."""
    return pa.concat_tables([read_shard(path, split, r, 2)[0] for r in range(2)]).sort_by("sample_id")


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by("sample_id").combine_chunks()


def assert_same_as_fresh(view: Path, fresh: Path, base: Path) -> None:
    """strata.json, users.parquet, the prepare config (but output) and every split's rows as
    both readers see them equal the fresh prepare's, while the samples are the base's files."""
    assert json.loads((view / "strata.json").read_text()) == json.loads((fresh / "strata.json").read_text())
    assert pq.read_table(view / "users.parquet").equals(pq.read_table(fresh / "users.parquet"))
    strip = lambda p: {k: v for k, v in json.loads((p / "prepare_config.json").read_text()).items()
                       if k != "output"}
    assert strip(view) == strip(fresh)
    for split in SPLITS:
        assert (view / split).resolve() == (base / split).resolve()  # not written again
        want = _sorted(pq.read_table(fresh / split))
        assert _sorted(read_split(view, split)).equals(want), split
        assert _reader_table(view, split).equals(_reader_table(fresh, split)), split
    # The check has teeth: the base files' own stratum column differs from the fresh one.
    assert not _sorted(pq.read_table(base / "train")).equals(_sorted(pq.read_table(fresh / "train")))


@pytest.mark.parametrize("name", ["top_fraction", "min_count", "quantiles"])
def test_view_equals_a_fresh_prepare(data, name):
    tmp, base, fresh = data
    view = tmp / "views" / name
    stats = restratify(base, StrataConfig(**STRATA[name]), view)
    assert stats == json.loads((fresh[name] / "strata.json").read_text())
    assert json.loads((view / VIEW_FILE).read_text()) == {"base": "../../prepared"}
    assert_same_as_fresh(view, fresh[name], base)


def test_view_checks_its_base(data, tmp_path):
    """A view whose base was prepared again (other users' activeness) is refused by the readers,
    with file, column, row and value, until it is made again; output onto the base is refused."""
    from ray_pinet.config_base import ConfigError

    _, base, _ = data
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    view = tmp_path / "view"
    restratify(copy, StrataConfig(mode="min_count", tau=100), view)
    users = pq.read_table(copy / "users.parquet")
    act = users.column("activeness").to_pylist()
    act[7] += 1
    pq.write_table(users.set_column(2, "activeness", pa.array(act, pa.int64())), copy / "users.parquet")
    with pytest.raises(DataError) as err:
        read_split(view, "valid")
    assert (err.value.file, err.value.column, err.value.row, err.value.value) == \
        (str(copy.resolve() / "users.parquet"), "activeness", 7, act[7])
    # Made again over the stale view (what a sweep does): readable, and replacing the old view
    # removed its links only, not the base files they point to.
    restratify(copy, StrataConfig(mode="min_count", tau=100), view)
    assert read_split(view, "valid").num_rows == 170 and len(list((copy / "train").iterdir())) > 0
    with pytest.raises(ConfigError, match="would replace"):
        restratify(copy, StrataConfig(mode="min_count", tau=100), copy)


def test_sweep_trials_share_one_prepare(data, tmp_path):
    """``run_config`` (what each trial runs) over trials that differ only in the stratification:
    every one gets a view of the one base prepare whose strata equal a fresh prepare's; a second
    call reuses it; a trial with another history length still gets a real prepare."""
    from ray_pinet.tuning.sweep import load_space
    from ray_pinet.tuning.trials import SweepSetup
    from ray_pinet.tuning.sequence_sweep import run_config

    _, _, fresh = data
    base = tmp_path / "prepared"
    shutil.copytree(data[1], base)  # the sweep's base data, prepared once (beside its tune/ folder)
    config = str(REPO / "configs/ml-latest-small.yaml")
    overrides = [f"data.path={base}", f"data.prepare={DEV_PREPARE}", f"run.storage_path={tmp_path / 'runs'}"]
    space = load_space(REPO / "tune_spaces/smoke.yaml", config, overrides)
    setup = SweepSetup("s", config, overrides, to_dict(space), str(tmp_path), None, None, "unused")
    base_report = (base / "report.json").read_text()
    cwd = os.getcwd()
    os.chdir(REPO)  # the prepare config names the log relative to the repository
    try:
        paths = {}
        for name, strata in STRATA.items():
            values = {f"prepare.strata.{k}": v for k, v in strata.items()}
            paths[name] = Path(run_config(setup, values, f"t-{name}", "pinet").data.path)
            assert (paths[name] / VIEW_FILE).is_file(), name
            assert_same_as_fresh(paths[name], fresh[name], base)
        again = run_config(setup, {"prepare.strata.tau": 100, "prepare.strata.mode": "min_count"}, "t", "pinet")
        assert Path(again.data.path) == paths["min_count"]  # cached per prepare-config hash
        longer = Path(run_config(setup, {"model.max_len": 20}, "t-len", "pinet").data.path)
    finally:
        os.chdir(cwd)
    # One prepare served every stratification: no hashed folder but the max_len one holds samples.
    tune = base.parent / "tune"
    real = sorted(p.name for p in tune.iterdir() if p.is_dir() and not (p / "train").is_symlink())
    assert real == [longer.name] and (base / "report.json").read_text() == base_report
    assert json.loads((longer / "prepare_config.json").read_text())["samples"]["max_len"] == 20
    assert not (longer / VIEW_FILE).exists()


@pytest.mark.slow
def test_training_on_a_view_equals_training_on_a_fresh_prepare(data, tmp_path):
    """Two gloo workers, `reweight` (its per-sample weights follow each sample's stratum and
    strata.json's shares): the run on a view reports exactly what the run on a fresh prepare of
    that stratification reports, per stratum; the reader's mapping is applied on every rank."""
    from ray_pinet.config import TrainConfig
    from ray_pinet.training.trainer import fit

    _, base, fresh = data
    view = tmp_path / "view"
    restratify(base, StrataConfig(**STRATA["min_count"]), view)
    finals = {}
    for label, path in (("view", view), ("fresh", fresh["min_count"])):
        cfg = TrainConfig.from_yaml(str(REPO / "configs/ml-latest-small.yaml"), [
            "method=reweight", f"data.path={path}", "data.prepare=null", f"run.name=rs-{label}",
            f"run.storage_path={tmp_path / 'runs'}", "run.num_workers=2", "run.cpus_per_worker=0.5",
            "run.progress=false", "model.dim=16", "model.num_blocks=1", "model.dropout=0",
            "optim.max_epochs=1", "tracking.enabled=false"])
        finals[label] = {k: v for k, v in fit(cfg, progress=False).final.items() if "/" in k}
    assert finals["view"] and finals["view"] == finals["fresh"]
    heads = json.loads((view / "strata.json").read_text())["strata"][1]["users"]
    assert finals["view"]["final_val/head/users"] == heads == 62
