"""The whole Engine (stage 1 + stage 2 + final evaluation) in one process, on synthetic rows.

Checks the control flow the Ray workers run: early stopping, per-stratum plugin selection, that a
snapshot taken mid-run resumes to the same final result, and that the report contract holds.
"""

from __future__ import annotations

import pytest
import torch

from ray_pinet.config import TrainConfig
from ray_pinet.training import exactness as ex
from ray_pinet.training.engine import Engine, RunMeta
from ray_pinet.training.stage2 import compose_plugin_states

P = ex.Problem(num_rows=120, num_items=40, max_len=8, seed=5)


eval_table = ex.synthetic_eval_table


def make_engine(overrides=None, resume=None, reports=None, init_backbone=None, warm_backbone=None):
    d = {
        "method": "pinet",
        "model": {"dim": 16, "num_blocks": 1, "dropout": 0.0, "max_len": P.max_len},
        "optim": {"batch_size": 32, "max_epochs": 4, "patience": 10},
        "stage2": {"max_epochs": 3, "patience": 10},
        "run": {"progress": False},
    }
    for k, v in (overrides or {}).items():
        if "." not in k:
            d[k] = v
            continue
        sec, key = k.split(".")
        d.setdefault(sec, {})[key] = v
    cfg = TrainConfig.from_dict(d)
    meta = RunMeta(num_items=P.num_items, num_strata=2, num_train_samples=P.num_rows,
                   user_share=[0.8, 0.2], interaction_share=[0.5, 0.5])
    reports = [] if reports is None else reports
    return Engine(cfg, meta, ex.synthetic_train_table(P), eval_table(P, 1), eval_table(P, 2),
                  report=lambda m, s: reports.append((m, s)), say=lambda s: None, resume_state=resume,
                  init_backbone=init_backbone, warm_backbone=warm_backbone)


def test_engine_runs_both_stages_and_reports_every_epoch():
    reports = []
    final = make_engine(reports=reports).run()
    stages = [m.get("stage") for m, _ in reports]
    assert stages.count(1.0) == 4 and stages.count(2.0) == 3  # one report per epoch
    assert all(s is not None for _, s in reports)  # rank 0 checkpoints every report
    for name in ("tail", "head", "all"):
        assert 0.0 <= final[f"test/{name}/ndcg@10"] <= 1.0
        assert f"stage1_test/{name}/ndcg@10" in final
    assert final["test/all/users"] == P.num_rows


def test_every_epoch_reports_where_its_time_went():
    reports = []
    make_engine(reports=reports).run()
    epochs = [m for m, _ in reports if "train/epoch_seconds" in m]
    assert len(epochs) == 7  # 4 stage-1 + 3 stage-2 epochs
    for metrics in epochs:
        parts = [metrics[f"train/time_{p}_s"] for p in ("data", "forward", "backward", "allreduce", "optimizer")]
        assert all(p >= 0.0 for p in parts), parts
        # The parts are timed inside the epoch: together they cannot exceed it.
        assert sum(parts) <= metrics["train/epoch_seconds"] + 1e-6
        assert metrics["train/time_forward_s"] > 0 and metrics["train/time_backward_s"] > 0


def test_resume_from_mid_run_snapshot_gives_the_same_result():
    reports = []
    full = make_engine(reports=reports).run()
    snap = reports[2][1]  # after stage-1 epoch 2
    assert snap["engine"]["epoch"] == 3
    resumed = make_engine(resume=snap).run()
    for k, v in full.items():
        if k.startswith(("test/", "final_val/", "stage1_test/")):
            assert resumed[k] == pytest.approx(v, abs=1e-6), k


def test_joint_never_uses_plugins():
    eng = make_engine()
    eng.cfg.method = "joint"
    out = eng.run()
    assert not any(k.startswith("stage1_test/") for k in out)
    assert not eng.model.use_plugins


def test_significant_keep_rule_serves_a_plugin_only_when_its_gain_is_above_noise():
    from ray_pinet.evaluation.bootstrap import paired_intervals
    from ray_pinet.evaluation.protocol import user_outcomes

    over = {"stage2.patience": 10, "stage2.lr": 0.01}
    best = make_engine(overrides=over)
    best_out = best.run()
    sig = make_engine(overrides={**over, "stage2.keep": "significant"})
    sig_out = sig.run()
    kept_best = [best_out[f"stage2/kept/{s}"] for s in ("tail", "head")]
    kept_sig = [sig_out[f"stage2/kept/{s}"] for s in ("tail", "head")]
    assert any(kept_best), "no plugin beat the backbone on validation: the rule is not exercised"
    assert all(b >= k for b, k in zip(kept_best, kept_sig))  # significant keeps a subset
    # Backbone-only and served per-user NDCG on validation, the rule's input.
    sig.model.use_plugins = False
    base = user_outcomes(sig.model, sig.valid_rows)
    sig.model.use_plugins = True
    served = user_outcomes(sig.model, sig.valid_rows)
    iv = paired_intervals(base["ndcg"].numpy(), served["ndcg"].numpy(), base["stratum"].numpy(), 2,
                          draws=1000, seed=0)
    for s, name in enumerate(("tail", "head")):
        mine = base["stratum"] == s
        if kept_sig[s]:
            assert iv[name][0] > 0  # a served plugin's gain is above zero at 95%
        else:  # a plugin that is not served is the exact identity: backbone scores for its users
            assert torch.equal(served["ndcg"][mine], base["ndcg"][mine])
            assert sig_out[f"final_val/{name}/ndcg@10"] == pytest.approx(sig.state.plugin_base[s], abs=1e-12)
    if kept_best != kept_sig:  # the rule reset at least one plugin that "best" serves
        dropped = [n for n, b, k in zip(("tail", "head"), kept_best, kept_sig) if b and not k]
        assert all(best_out[f"final_val/{n}/ndcg@10"] > sig_out[f"final_val/{n}/ndcg@10"] for n in dropped)


def test_significant_keep_rule_keeps_a_plugin_with_a_clear_gain():
    eng = make_engine(overrides={"stage2.keep": "significant", "stage2.max_epochs": 1})
    eng.run()
    # Plant a head plugin that ranks every head validation user's target first (item bias) and a
    # tail plugin with a negligible change; both are marked as having won on validation.
    rows = eng.valid_rows
    with torch.no_grad():
        eng.model.plugins.reset()
        bias = eng.model.plugins.item_bias.weight
        bias[1, rows.target[rows.stratum == 1]] += 50.0
        tail_bias = torch.zeros_like(bias[0])
        tail_bias[1] = 1e-3  # a tail "plugin" that won on validation by noise: no real gain
        bias[0] += tail_bias
    eng.state.plugin_best = [1.0, 1.0]
    eng.state.plugin_base = [0.0, 0.0]
    eng._decide_plugins()
    assert eng.state.plugin_kept == [0.0, 1.0]
    weight = eng.model.plugins.item_bias.weight.detach()
    assert float(weight[1].abs().max()) == 50.0  # the head plugin is still served
    assert float(weight[0].abs().max()) == 0.0  # the tail plugin is the identity again


def test_compose_plugin_states_takes_each_stratum_from_its_best_epoch():
    eng = make_engine()
    plugins = eng.model.plugins
    assert plugins is not None
    with torch.no_grad():
        for p in plugins.parameters():
            p.fill_(1.0)
    best0 = {k: v.clone() for k, v in plugins.state_dict().items()}
    with torch.no_grad():
        for p in plugins.parameters():
            p.fill_(2.0)
    best1 = {k: v.clone() for k, v in plugins.state_dict().items()}
    with torch.no_grad():
        for p in plugins.parameters():
            p.fill_(3.0)
    out = compose_plugin_states(plugins, {0: best0, 1: best1}, 2)
    lists = [n for n, m in plugins.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 2]

    def owner(key):  # stratum of a ModuleList child, else None
        for n in lists:
            if key.startswith(n + "."):
                return int(key[len(n) + 1:].split(".", 1)[0])
        return None

    stacked = [k for k, v in out.items() if owner(k) is None and v.dim() >= 1 and v.shape[0] == 2]
    assert stacked, "expected stacked per-stratum tensors (item bias / offsets)"
    for k in stacked:
        assert torch.all(out[k][0] == 1.0) and torch.all(out[k][1] == 2.0)
    for k, v in out.items():
        if owner(k) is not None:
            assert torch.all(v == (1.0, 2.0)[owner(k)]), k


def test_init_backbone_skips_stage1_and_starts_from_the_given_backbone():
    """run.init_from: pinet's stage 1 = joint, so pinet may start from joint's trained backbone.
    Its stage-1 test scores then equal joint's final ones exactly, and only stage 2 trains."""
    joint_reports = []
    joint_final = make_engine({"method": "joint"}, reports=joint_reports).run()
    backbone = {k[len("backbone."):]: v for k, v in joint_reports[-1][1]["model"].items()
                if k.startswith("backbone.")}
    reports = []
    final = make_engine(reports=reports, init_backbone=backbone).run()
    assert [m.get("stage") for m, _ in reports[:-1]] == [2.0, 2.0, 2.0]  # no stage-1 epoch
    for name in ("tail", "head", "all"):
        assert final[f"stage1_test/{name}/ndcg@10"] == joint_final[f"test/{name}/ndcg@10"]


def test_transfer_trains_resumes_and_checkpoints_its_discriminator():
    over = {"method": "transfer", "transfer.trajectories": 2, "transfer.inner_steps": 3, "optim.max_epochs": 2}
    reports = []
    full = make_engine(over, reports=reports).run()
    assert [m.get("stage") for m, _ in reports[:-1]] == [1.0, 1.0]  # no stage 2
    snap = reports[0][1]
    assert snap["aux"] is not None and any(k.startswith("net.") for k in snap["aux"])
    resumed = make_engine(over, resume=snap).run()
    for k, v in full.items():
        if k.startswith(("test/", "final_val/")):
            assert resumed[k] == pytest.approx(v, abs=1e-6), k


def test_train_strata_and_warm_start():
    """One stratum's rows only, selected on that stratum; warm start from a trained backbone
    (what separate/finetune run per stratum)."""
    over = {"method": "joint", "data.train_strata": [1], "eval.select_slice": "head", "optim.max_epochs": 2}
    reports = []
    eng = make_engine(over, reports=reports)
    head = (ex.synthetic_train_table(P).column("stratum").to_numpy() == 1).nonzero()[0]
    assert eng.train_ids.local_ids.tolist() == head.tolist() and eng.train_ids.total == len(head)
    eng.run()
    backbone = {k[len("backbone."):]: v for k, v in reports[-1][1]["model"].items() if k.startswith("backbone.")}
    warm = make_engine({**over, "optim.max_epochs": 1}, warm_backbone=backbone)
    for k, v in warm.model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    with pytest.raises(ValueError, match="select_slice"):
        make_engine({**over, "eval.select_slice": "middle"})
    with pytest.raises(ValueError, match="train_strata"):
        make_engine({**over, "data.train_strata": [2]})


def test_row_sparse_item_exchange_trains_checkpoints_and_resumes():
    """optim.item_exchange=rows: stage 1 steps the item table with lazy Adam (its state is
    checkpointed beside Adam's), a mid-run snapshot resumes to the same result, and stage 2
    (unfrozen backbone, dense path) still trains the table."""
    sets = {"loss": "sampled_softmax", "sampled.num_negatives": 8, "optim.item_exchange": "rows",
            "stage2.freeze_backbone": False}
    reports = []
    engine = make_engine(sets, reports=reports)
    before = engine.model.backbone.item_emb.weight.detach().clone()
    full = engine.run()
    snap = reports[1][1]
    assert set(snap["optimizers"]) == {"stage1", "stage1_items"}
    assert "exp_avg" in snap["optimizers"]["stage1_items"]["state"][0]  # lazy Adam's moments
    assert not torch.equal(engine.model.backbone.item_emb.weight.detach(), before)
    resumed = make_engine(sets, resume=snap).run()
    for k, v in full.items():
        if k.startswith(("test/", "final_val/")):
            assert resumed[k] == pytest.approx(v, abs=1e-6), k
