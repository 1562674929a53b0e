"""The compare grid: which runs to make, in which order, and resuming a grid that stopped.

A cell is (label, method, overrides) x backbone x seed. Per (backbone, seed) the ``joint``
cell runs first: it is the baseline every change is measured against, and its trained
backbone is reused where a method's first stage *is* joint training (``pinet`` with the
interaction-share prior starts stage 2 from it, ``finetune`` fine-tunes it), exactly as
``train --method joint --method pinet`` does. Finished cells are appended to
``<output>/cells.jsonl``; rerunning the same command skips them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ray_pinet.config import METHODS, TrainConfig
from ray_pinet.config_base import ConfigError
from ray_pinet.twotower_config import TWOTOWER_METHODS


_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass
class Cell:
    label: str  # row name in the report: a method, or a variant "pinet-uniform"
    method: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class CellResult:
    label: str
    backbone: str
    seed: int
    method: str
    final: dict
    run_id: Optional[str]
    checkpoint: Optional[str]
    overrides: list[str]
    # The cell's resolved config: a rerun skips the cell only when it would build the same one
    # (None: recorded by a ray-pinet that did not keep it; then not checked, and said so).
    config: Optional[dict] = None


def parse_variant(text: str) -> Cell:
    """``LABEL=METHOD:key=value,key=value`` -> Cell (e.g. ``pinet-uniform=pinet:ga.prior=uniform``)."""
    if "=" not in text:
        raise ConfigError(f"--variant {text!r}: expected LABEL=METHOD[:key=value,...]")
    label, rest = text.split("=", 1)
    label = label.strip()
    # A label names runs (run.name), report rows and plot legends: matplotlib reads "$...$" as
    # mathtext, and a bad one made the report fail after every cell had trained.
    if not _LABEL.fullmatch(label):
        raise ConfigError(f"--variant {text!r}: label {label!r} must be letters, digits and . _ + - "
                          "(starting with a letter or digit)")
    method, _, sets = rest.partition(":")
    if method not in METHODS + TWOTOWER_METHODS:
        raise ConfigError(f"--variant {text!r}: method {method!r} is not one of {list(METHODS + TWOTOWER_METHODS)}")
    overrides = [s.strip() for s in sets.split(",") if s.strip()] if sets else []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"--variant {text!r}: override {o!r} is not key=value")
    return Cell(label.strip(), method, overrides)


def build_cells(methods: list[str], variants: list[str], reference: str = "joint") -> list[Cell]:
    """The grid's cells, the ``reference`` (joint; twobp for two-tower grids) first."""
    cells = [Cell(m, m) for m in methods]
    cells += [parse_variant(v) for v in variants]
    labels = [c.label for c in cells]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"compare: duplicate cell labels {dup}")
    if reference not in labels:
        cells.insert(0, Cell(reference, reference))  # the reference of every comparison
    return sorted(cells, key=lambda c: c.label != reference)


def load_done(path: Path) -> dict[tuple, CellResult]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = CellResult(**json.loads(line))
                done[(r.label, r.backbone, r.seed)] = r
    return done


def run_grid(
    config: Optional[str],
    overrides: list[str],
    cells: list[Cell],
    backbones: list[str],
    seeds: list[int],
    name: str,
    output: Path,
    parent_run_id: Optional[str] = None,
    kind: str = "sequence",
    fresh: bool = False,
) -> list[CellResult]:
    """``kind``: ``sequence`` (``ray-pinet train`` methods) or ``twotower`` (``ray-pinet twotower``
    methods, backbone "mf"; their selected test metrics are reported as ``test/*``). A finished
    cell (``cells.jsonl``) is skipped only when the command builds the config it was made with;
    ``fresh``: every cell's run starts anew (its earlier run folder kept aside, ``fit``)."""
    from ray_pinet.training.trainer import absolute_checkpoint_paths, fit, reuse_joint
    from ray_pinet.twotower_config import TwoTowerConfig

    output.mkdir(parents=True, exist_ok=True)
    base_data = None if kind == "twotower" else TrainConfig.from_yaml(config, overrides).data.path
    log = output / "cells.jsonl"
    done = load_done(log)
    results = []
    total = len(cells) * len(backbones) * len(seeds)
    n = 0
    for backbone in backbones:
        for seed in seeds:
            joint_ckpt = None
            for cell in cells:
                n += 1
                key = (cell.label, backbone, seed)
                run_name = f"run.name={name}-{backbone}-s{seed}-{cell.label}"
                base = None
                if kind == "twotower":
                    cfg = TwoTowerConfig.from_yaml(config, overrides + [
                        f"model.method={cell.method}", f"run.seed={seed}", run_name] + cell.overrides)
                else:
                    cfg = TrainConfig.from_yaml(config, overrides + [
                        f"method={cell.method}", f"model.backbone={backbone}", f"run.seed={seed}", run_name,
                    ] + cell.overrides)
                    base = reuse_joint(cfg, joint_ckpt, base_data)
                    cfg = absolute_checkpoint_paths(cfg)
                if key in done:
                    _check_same_config(done[key], cfg, output)
                    print(f"[compare {n}/{total}] {cell.label} {backbone} seed {seed}: done earlier, skipped")
                    results.append(done[key])
                    if cell.label == "joint":
                        joint_ckpt = done[key].checkpoint
                    continue
                tags = {"compare": name, "cell": cell.label, "seed": str(seed)}
                print(f"\n[compare {n}/{total}] {cell.label} ({cell.method}) {backbone} seed {seed}", flush=True)
                if kind == "twotower":
                    res = _fit_twotower_cell(cfg, parent_run_id, tags, fresh)
                else:
                    res = fit(cfg, parent_run_id=parent_run_id, base_checkpoint=base, tags=tags, fresh=fresh)
                r = CellResult(cell.label, backbone, seed, cell.method,
                               {k: v for k, v in res.final.items() if isinstance(v, (int, float))},
                               res.run_id, res.checkpoint_path, cell.overrides, cfg.to_dict())
                if cell.label == "joint":
                    joint_ckpt = res.checkpoint_path
                with log.open("a") as f:
                    f.write(json.dumps(asdict(r)) + "\n")
                results.append(r)
    return results


def _check_same_config(done: CellResult, cfg, output: Path) -> None:
    """A finished cell is reused only for the config that made it: a grid rerun with, say, another
    learning rate would otherwise report the old cells under the new command."""
    from ray_pinet.config_base import format_diff
    from ray_pinet.training.resume import config_changes

    where = f"cell {done.label} {done.backbone} seed {done.seed} of {output / 'cells.jsonl'}"
    if done.config is None:
        print(f"[compare] {where} was recorded without its config (older ray-pinet): not checked")
        return
    try:
        diffs = config_changes(type(cfg), done.config, cfg)
    except ConfigError as exc:
        diffs = [("config", f"recorded config {exc}", "this command's")]
    if diffs:
        raise ConfigError(f"{where} was finished with another config; reusing it would report it under "
                          f"this command: {format_diff(diffs)}. Rerun with the old settings, with --fresh "
                          "to start the grid anew (the report folder is kept aside), or with another --name")


def _fit_twotower_cell(cfg, parent_run_id: Optional[str], tags: dict, fresh: bool = False):
    """One two-tower cell; its selected test metrics (``final/*``) renamed ``test/*`` for the report."""
    from ray_pinet.training.twotower_trainer import fit_twotower

    res = fit_twotower(cfg, parent_run_id=parent_run_id, tags=tags, fresh=fresh)
    res.final.update({"test/" + k[len("final/"):]: v for k, v in list(res.final.items()) if k.startswith("final/")})
    return res
