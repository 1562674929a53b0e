"""Search-space files and the guarded objective, in-process (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ray_pinet.config_base import ConfigError
from ray_pinet.evaluation.metrics import auc
from ray_pinet.tuning.objective import GUARD_PENALTY, Objective, reference_metrics
from ray_pinet.tuning.space import ObjectiveSpec, param_space, split_overrides
from ray_pinet.tuning.sweep import load_space
from ray_pinet.tuning.sequence_sweep import resolve_trial
from tests.conftest import REPO

BASE = str(REPO / "configs/ml-latest-small.yaml")


@pytest.mark.parametrize("name", ["pinet.yaml", "smoke.yaml"])
def test_shipped_spaces_load(name):
    space = load_space(REPO / "tune_spaces" / name, BASE, [])
    assert space.space and set(param_space(space)) == set(space.space)


def write(tmp_path, text: str):
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, needle", [
    ("space: {optim.lrr: {choice: [0.1]}}", "lrr"),                         # unknown train key
    ("space: {prepare.strata.qq: {uniform: [0.1, 0.2]}}", "qq"),             # unknown prepare key
    ("space: {prepare.strata.q: {uniform: [0.1, 1.5]}}", "q must be in (0, 1)"),  # bad end value
    ("space: {prepare.clean.min_history: {choice: [3, 5]}}", "only prepare.strata"),
    ("space: {optim.lr: {loguniform: [0, 0.1]}}", "loguniform needs low > 0"),
    ("space: {optim.lr: {between: [1, 2]}}", "is not a domain"),
    ("space: {run.seed: {choice: [1, 2]}}", "set by the sweep"),
    ("spcae: {optim.lr: {choice: [0.1]}}", "spcae"),                         # unknown top-level key
    ("space: {}", "at least one key"),
    ("search: {algorithm: grid}\nspace: {optim.lr: {choice: [0.1, 0.2]}}", "grid"),
])
def test_bad_spaces_are_rejected_with_the_key(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=None) as exc:
        load_space(write(tmp_path, text), BASE, [])
    assert needle in str(exc.value)


def test_max_len_sets_both_model_and_samples():
    train, prep = split_overrides({"model.max_len": 20, "prepare.strata.q": 0.3, "optim.lr": 0.01})
    assert "samples.max_len=20" in prep and "strata.q=0.3" in prep and "optim.lr=0.01" in train
    cfg, pcfg = resolve_trial(BASE, [], {"model.max_len": 20, "prepare.strata.q": 0.3}, "pinet")
    assert cfg.model.max_len == pcfg.samples.max_len == 20 and pcfg.strata.q == 0.3


def _outcomes(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user_id": [f"u{i}" for i in range(n)],
                         "hit": rng.integers(0, 2, n).astype(float), "ndcg": rng.random(n),
                         "pos": rng.normal(size=n), "neg": rng.normal(size=n)})


def test_reference_metrics_regroup_users_exactly():
    out = _outcomes(50, 0)
    users = pd.DataFrame({"user_id": out["user_id"][::-1], "stratum": [i % 3 == 0 for i in range(50)][::-1]})
    users["stratum"] = users["stratum"].astype(int)
    m = reference_metrics(out, users, 2, 10)
    s = users.set_index("user_id").loc[out["user_id"], "stratum"].to_numpy()
    for stratum, name in ((0, "tail"), (1, "head")):
        sel = s == stratum
        assert m[f"{name}/users"] == sel.sum()
        assert m[f"{name}/ndcg@10"] == pytest.approx(out["ndcg"][sel].mean())
        assert m[f"{name}/hr@10"] == pytest.approx(out["hit"][sel].mean())
        assert m[f"{name}/auc"] == pytest.approx(auc(out["pos"][sel], out["neg"][sel]))
    assert m["all/ndcg@10"] == pytest.approx(out["ndcg"].mean())


def test_reference_metrics_refuses_users_without_stratum():
    out = _outcomes(5, 1)
    with pytest.raises(ValueError, match="u4"):
        reference_metrics(out, pd.DataFrame({"user_id": ["u0", "u1", "u2", "u3"], "stratum": [0, 0, 1, 1]}), 2, 10)


def test_objective_lift_and_guard():
    ref = {"tail/ndcg@10": 0.05, "head/ndcg@10": 0.02, "all/ndcg@10": 0.04}
    obj = Objective(ObjectiveSpec(guard_tolerance=0.1), ref, 2, 10)
    ok = obj.score({"val/tail/ndcg@10": 0.06, "val/head/ndcg@10": 0.019}, "val")
    assert ok["objective"] == pytest.approx(0.2) and ok["feasible"] == 1.0  # head within 10%
    bad = obj.score({"val/tail/ndcg@10": 0.08, "val/head/ndcg@10": 0.015}, "val")
    assert bad["feasible"] == 0.0 and bad["objective_value"] == pytest.approx(0.6)
    assert bad["objective"] < ok["objective"] and bad["guard_shortfall"] == pytest.approx(0.15)
    assert bad["objective"] == pytest.approx(0.6 - GUARD_PENALTY - 0.15)
    assert obj.score({"loss": 1.0}, "val") is None
    absolute = Objective(ObjectiveSpec(measure="absolute"), ref, 2, 10)
    assert absolute.score({"final_val/tail/ndcg@10": 0.06, "final_val/head/ndcg@10": 0.03},
                          "final_val")["objective"] == pytest.approx(0.06)


def test_objective_tail_and_head_name_the_end_buckets_of_k_strata():
    ref = {f"s{i}/ndcg@10": 0.1 for i in range(4)}
    obj = Objective(ObjectiveSpec(), ref, 4, 10)
    obj.check()
    assert obj.slice == "s0" and obj.guarded() == ["s1", "s2", "s3"]
    r = obj.score({"val/s0/ndcg@10": 0.11, "val/s1/ndcg@10": 0.1, "val/s2/ndcg@10": 0.1,
                   "val/s3/ndcg@10": 0.09}, "val")
    assert r["feasible"] == 0.0  # s3 lost 10% > 0.5%


def test_list_valued_choices_travel_as_json_and_come_back():
    # Tune reads list values in points_to_evaluate as nested specs (a crash found on the real
    # sweep), so structured choices are JSON strings inside Tune and decoded for the trial.
    from ray.tune.search.variant_generator import generate_variants

    from ray_pinet.tuning.space import decode_values, encode_value
    from ray_pinet.tuning.trials import default_point

    space = load_space(REPO / "tune_spaces/pinet.yaml", BASE, [])
    dom = space.space["stage2.plugin.adapter_hidden"]
    tuned = param_space(space)["stage2.plugin.adapter_hidden"]
    assert all(isinstance(c, str) for c in tuned.categories)
    assert decode_values(space, {"stage2.plugin.adapter_hidden": encode_value(dom, [64])}) == \
        {"stage2.plugin.adapter_hidden": [64]}
    point = default_point(space, *resolve_trial(BASE, [], dict(space.fixed), space.method))
    assert point["stage2.plugin.adapter_hidden"] == "[64]" and point["prepare.strata.q"] == 0.2
    for _, variant in generate_variants({**param_space(space), **point}):
        cfg, _ = resolve_trial(BASE, [], decode_values(space, variant), "pinet")
        assert cfg.stage2.plugin.adapter_hidden == [64]
