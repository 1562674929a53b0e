"""Cheap re-stratification: another stratification of prepared data without running prepare.

The strata depend only on each user's activeness (``data/strata.py``), which ``users.parquet``
holds, so a new ``top_fraction`` q, ``min_count`` tau or ``quantiles`` k needs neither the log nor
new samples. ``restratify`` writes a *view* (docs/design.md "Restratified views"):

    users.parquet          the base's users, ``stratum`` recomputed (assign_strata, prepare's rules)
    strata.json            strata_stats of the new strata (what prepare would write)
    prepare_config.json    the base's, with the new ``strata`` and this ``output``
    restratified.json      marker: {"base": <base folder, relative to the view>}
    canonical train valid test items.parquet report.json
                           relative symlinks to the base's (never copied or rewritten)

The sample files keep the base's ``stratum`` column; readers take a sample's stratum from the
view's users.parquet (``prepared.read_split``, ``training/shards.py::read_shard``). Settings
that change the samples (history length, cleaning, negatives) still need a real ``prepare``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ray_pinet.config_base import ConfigError, to_dict
from ray_pinet.data.config import StrataConfig
from ray_pinet.data.prepared import VIEW_FILE, by_user_idx, check_format, view_base
from ray_pinet.data.strata import assign_strata, strata_stats
from ray_pinet.errors import DataError
from ray_pinet.outputs import replaced_dir

# What a view shares with its base, as links: everything prepare writes except the three files a
# view writes itself.
LINKED = ("canonical", "train", "valid", "test", "items.parquet", "report.json")


def restratify(base: str | Path, strata: StrataConfig, output: str | Path) -> dict[str, Any]:
    """Write at ``output`` a view of the prepared folder ``base`` stratified by ``strata``; returns
    its strata.json content. ``output`` appears whole or not at all and replaces what is there
    (refused when that is ``base`` or holds it). A view of a view is made from the original base."""
    strata.validate()
    base = view_base(base) or Path(base)
    for name in (*LINKED, "users.parquet", "prepare_config.json"):
        if not (base / name).exists():
            raise DataError("not a complete prepared folder: nothing to restratify (run `ray-pinet "
                            "prepare` first)", file=str(base / name))
    check_format(base)
    out = Path(output)
    out_abs, base_abs = out.parent.resolve() / out.name, base.resolve()
    if out_abs == base_abs or base_abs.is_relative_to(out_abs) or out_abs.is_relative_to(base_abs):
        raise ConfigError(f"restratify: output {out} would replace or sit inside its base data {base}")
    users = pq.read_table(base / "users.parquet")
    # activeness in user_idx order, as prepare passes it (the position is the tie-breaker)
    activeness = by_user_idx(users, "activeness", base / "users.parquet").astype(np.int64)
    new = assign_strata(activeness, strata)
    stats = strata_stats(activeness, new, strata)
    config = json.loads((base / "prepare_config.json").read_text())
    config.update(strata=to_dict(strata), output=str(output))
    pos = users.schema.get_field_index("stratum")
    users = users.set_column(pos, "stratum", pa.array(new, pa.int8()))
    # Links are relative to the output's folder; the temporary sibling has the same parent.
    rel = os.path.relpath(base_abs, out_abs)
    with replaced_dir(out_abs) as tmp:
        for name in LINKED:
            os.symlink(os.path.join(rel, name), tmp / name, target_is_directory=(base / name).is_dir())
        pq.write_table(users, tmp / "users.parquet")
        (tmp / "strata.json").write_text(json.dumps(stats, indent=2))
        (tmp / "prepare_config.json").write_text(json.dumps(config, indent=2))
        (tmp / VIEW_FILE).write_text(json.dumps({"base": rel}, indent=2))
    return stats
