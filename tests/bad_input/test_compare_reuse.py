"""Issue 18 finding 3 for `compare`: a rerun skips a finished cell only when it builds the config
that cell was made with (a grid rerun with another learning rate reported the old cells under the
new command), and `--fresh` starts the grid anew with the old report folder kept aside.

No training runs here: the check refuses before the first fit, and the `--fresh` case stops on
missing prepared data right after moving the folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from ray_pinet.compare.grid import Cell, CellResult, run_grid
from ray_pinet.config import TrainConfig
from ray_pinet.config_base import ConfigError
from ray_pinet.kinds.sequence import SEQUENCE
from tests.conftest import REPO, run_cli_in_repo

CONFIG = str(REPO / "configs/ml-latest-small.yaml")


def _sets(tmp: Path) -> list[str]:
    return [f"data.path={tmp / 'prepared'}", "data.prepare=null", f"run.storage_path={tmp / 'runs'}",
            "tracking.enabled=false"]


def _record(tmp: Path, overrides: list[str], *, with_config: bool = True) -> Path:
    """reports/<grid>/cells.jsonl holding a finished joint cell made with ``overrides``."""
    out = tmp / "grid"
    out.mkdir()
    cfg = TrainConfig.from_yaml(CONFIG, overrides + ["method=joint", "model.backbone=sasrec", "run.seed=0",
                                                     "run.name=g-sasrec-s0-joint"])
    r = CellResult("joint", "sasrec", 0, "joint", {"test/all/ndcg@10": 0.05}, None, None, [],
                   cfg.to_dict() if with_config else None)
    row = asdict(r)
    if not with_config:
        row.pop("config")  # the line an older ray-pinet wrote
    (out / "cells.jsonl").write_text(json.dumps(row) + "\n")
    return out


def test_a_finished_cell_made_with_another_config_is_not_reused(tmp_path):
    out = _record(tmp_path, _sets(tmp_path) + ["optim.lr=0.001"])
    before = (out / "cells.jsonl").read_text()
    with pytest.raises(ConfigError) as err:
        run_grid(SEQUENCE, CONFIG, _sets(tmp_path) + ["optim.lr=0.002"], [Cell("joint", "joint")], ["sasrec"], [0],
                 "g", out)
    msg = str(err.value)
    assert "cell joint sasrec seed 0" in msg and "optim.lr: 0.001 -> 0.002" in msg and "--fresh" in msg
    assert (out / "cells.jsonl").read_text() == before


def test_a_finished_cell_with_the_same_config_is_reused(tmp_path):
    # tracking.* and run.progress may differ (they do not change what is trained)
    out = _record(tmp_path, _sets(tmp_path))
    got = run_grid(SEQUENCE, CONFIG, _sets(tmp_path) + ["run.progress=false"], [Cell("joint", "joint")], ["sasrec"], [0],
                   "g", out)
    assert [(r.label, r.final) for r in got] == [("joint", {"test/all/ndcg@10": 0.05})]


def test_a_cell_recorded_without_its_config_is_reused_with_a_note(tmp_path, capsys):
    out = _record(tmp_path, _sets(tmp_path), with_config=False)
    got = run_grid(SEQUENCE, CONFIG, _sets(tmp_path) + ["optim.lr=0.002"], [Cell("joint", "joint")], ["sasrec"], [0],
                   "g", out)
    assert len(got) == 1 and "recorded without its config" in capsys.readouterr().out


def test_compare_fresh_keeps_the_previous_report_folder(tmp_path, capsys):
    out = _record(tmp_path, _sets(tmp_path) + ["optim.lr=0.001"])
    (out / "report.md").write_text("old report")
    argv = ["compare", "--config", CONFIG, "--methods", "joint", "--seeds", "0", "--name", "g",
            "--output", str(out), "--fresh"]
    for s in _sets(tmp_path) + ["optim.lr=0.002"]:
        argv += ["--set", s]
    code = run_cli_in_repo(argv)
    err = capsys.readouterr()
    # the old grid is moved aside whole; the new one then stops at the missing prepared data
    assert code == 2 and "no prepared data there" in err.err
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("grid.replaced-")]
    assert len(kept) == 1 and (kept[0] / "report.md").read_text() == "old report"
    assert json.loads((kept[0] / "cells.jsonl").read_text())["config"]["optim"]["lr"] == 0.001
    assert not (out / "cells.jsonl").exists()


@pytest.mark.parametrize("label", ["x$\\alpha$", "a/b", "", "-x", "a b"])
def test_a_variant_label_that_cannot_name_a_run_or_a_legend_is_refused(label):
    from ray_pinet.compare.grid import parse_variant

    with pytest.raises(ConfigError, match="must be letters, digits"):
        parse_variant(f"{label}=pinet:ga.alpha=1")
    assert parse_variant("pinet-a1.5+x_y=pinet:ga.alpha=1").label == "pinet-a1.5+x_y"
