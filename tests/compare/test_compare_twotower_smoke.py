"""`ray-pinet compare --kind twotower --smoke-test` keeps its tiny pair data apart. Until
each kind held its own smoke settings (``kinds/<kind>.py``) it took the two-tower smoke settings but not the ``-smoke`` folder suffix, so
its 60-user pairs landed in the real output folder, which the next full run then refused."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, run_cli_in_repo, shared_file

pytestmark = pytest.mark.slow


def test_twotower_compare_smoke_writes_its_pairs_beside_the_real_ones(ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["compare", "--kind", "twotower", "--smoke-test", "--config",
            str(REPO / "configs/twotower/ml-100k-onebp.yaml"), "--methods", "onebp", "--reference", "onebp",
            "--seeds", "0", "--output", str(tmp_path / "report")]
    for s in (f"data.source.path={shared_file('ml-100k/u.data')}", f"data.output={tmp_path / 'pairs'}",
              f"run.storage_path={tmp_path / 'runs'}", f"tracking.tracking_uri={uri}", "run.progress=false"):
        args += ["--set", s]
    assert run_cli_in_repo(args) == 0
    assert (tmp_path / "pairs-smoke").is_dir() and not (tmp_path / "pairs").exists()
    meta = json.loads((tmp_path / "pairs-smoke" / "meta.json").read_text())
    assert meta["num_users"] <= 60  # the smoke settings did apply
