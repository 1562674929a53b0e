"""The compare grid: which runs to make, in which order, and resuming a grid that stopped.

A cell is (label, method, overrides) x backbone x seed. Per (backbone, seed) the ``joint`` cell runs first: it
is the baseline every change is measured against, and its trained backbone is reused where a method's first
stage *is* joint training (``pinet`` with the interaction-share prior starts stage 2 from it, ``finetune``
fine-tunes it), exactly as ``train --method joint --method pinet`` does. Finished cells are appended to
``<output>/cells.jsonl``; rerunning the same command skips them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ray_pinet.compare.cells import Cell, CellResult, load_done
from ray_pinet.config import METHODS
from ray_pinet.config_base import ConfigError, format_diff
from ray_pinet.training.kind import Kind
from ray_pinet.training.resume import config_changes
from ray_pinet.training.run_inputs import absolute_checkpoint_paths
from ray_pinet.training.trainer import fit
from ray_pinet.twotower_config import TWOTOWER_METHODS

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


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


def run_grid(kind: Kind, config: Optional[str], overrides: list[str], cells: list[Cell], backbones: list[str],
             seeds: list[int], name: str, output: Path, parent_run_id: Optional[str] = None,
             fresh: bool = False) -> list[CellResult]:
    """Every cell x backbone x seed of ``kind`` (``backbones``: values of ``kind.backbone_key``; ["mf"] for a
    kind without one). A finished cell (``cells.jsonl``) is skipped only when the command builds the config it
    was made with; ``fresh``: every cell's run starts anew (its earlier run folder kept aside, ``fit``)."""
    output.mkdir(parents=True, exist_ok=True)
    base = kind.config_class.from_yaml(config, overrides)
    log = output / "cells.jsonl"
    done = load_done(log)
    results = []
    total = len(cells) * len(backbones) * len(seeds)
    n = 0
    for backbone in backbones:
        for seed in seeds:
            ref_ckpt = None  # the reference cell's checkpoint, for the methods that start from it
            for cell in cells:
                n += 1
                key = (cell.label, backbone, seed)
                cfg = kind.config_class.from_yaml(config, overrides + [
                    f"{kind.method_key}={cell.method}", f"run.seed={seed}",
                    f"run.name={name}-{backbone}-s{seed}-{cell.label}",
                ] + ([f"{kind.backbone_key}={backbone}"] if kind.backbone_key else []) + cell.overrides)
                fit_args = kind.chain(cfg, ref_ckpt, base)
                cfg = absolute_checkpoint_paths(cfg)
                if key in done:
                    _check_same_config(done[key], cfg, output)
                    print(f"[compare {n}/{total}] {cell.label} {backbone} seed {seed}: done earlier, skipped")
                    r = done[key]
                else:
                    tags = {"compare": name, "cell": cell.label, "seed": str(seed)}
                    print(f"\n[compare {n}/{total}] {cell.label} ({cell.method}) {backbone} seed {seed}",
                          flush=True)
                    res = fit(cfg, parent_run_id=parent_run_id, tags=tags, fresh=fresh, **fit_args)
                    final = kind.compare_metrics(res.final)
                    r = CellResult(cell.label, backbone, seed, cell.method,
                                   {k: v for k, v in final.items() if isinstance(v, (int, float))},
                                   res.run_id, res.checkpoint_path, cell.overrides, cfg.to_dict())
                    with log.open("a") as f:
                        f.write(json.dumps(asdict(r)) + "\n")
                if cell.label == kind.reference:
                    ref_ckpt = r.checkpoint
                results.append(r)
    return results


def _check_same_config(done: CellResult, cfg, output: Path) -> None:
    """A finished cell is reused only for the config that made it: a grid rerun with, say, another
    learning rate would otherwise report the old cells under the new command."""
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
