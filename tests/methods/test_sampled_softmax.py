"""Sampled softmax (methods/sampled_softmax.py): keyed draws, the proposal, the logQ correction,
accidental hits, candidate scoring with the plugins, and the Engine wiring.

W workers equal one process: tests/training/test_exactness.py (2 real gloo workers)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from ray_pinet.config import TrainConfig
from ray_pinet.methods.losses import per_position_losses
from ray_pinet.methods.sampled_softmax import Candidates, NegativeSampler, sampled_softmax_loss
from ray_pinet.models.config import ModelConfig, PluginConfig
from ray_pinet.models.registry import build_model
from ray_pinet.training import exactness as ex
from ray_pinet.training.batches import TrainRows
from ray_pinet.training.engine import Engine, RunMeta

COUNTS = np.array([0, 1, 5, 20, 100, 0, 3, 50])  # items 1..8; items 1 and 6 never a target


def test_draws_are_keyed_by_seed_epoch_and_step_only():
    a = NegativeSampler(COUNTS, 64, seed=7)
    b = NegativeSampler(COUNTS, 64, seed=7)  # another rank, another run: the same ids
    assert np.array_equal(a.draw(3, 5), b.draw(3, 5))
    assert a.draw(3, 5).min() >= 1 and a.draw(3, 5).max() <= len(COUNTS)
    assert not np.array_equal(a.draw(3, 5), a.draw(3, 6))
    assert not np.array_equal(a.draw(3, 5), a.draw(4, 5))
    assert not np.array_equal(a.draw(3, 5), NegativeSampler(COUNTS, 64, seed=8).draw(3, 5))
    c = a.candidates(3, 5, None, torch.device("cpu"))
    assert torch.equal(c.items, torch.from_numpy(a.draw(3, 5)))
    # log of each candidate's expected count n·Q(c)
    assert torch.allclose(c.log_count.double(), torch.log(64 * torch.from_numpy(a.q[a.draw(3, 5) - 1])))


@pytest.mark.parametrize("proposal,beta", [("unigram", 0.75), ("unigram", 1.0), ("uniform", 0.75)])
def test_empirical_frequencies_match_the_proposal(proposal, beta):
    s = NegativeSampler(COUNTS, 200_000, proposal=proposal, beta=beta, seed=1)
    q = np.ones(len(COUNTS)) if proposal == "uniform" else (COUNTS + 1.0) ** beta  # add-one smoothing
    q /= q.sum()
    assert np.allclose(s.q, q)
    observed = np.bincount(s.draw(0, 0) - 1, minlength=len(COUNTS))
    chi2, p = stats.chisquare(observed, q * observed.sum())
    assert p > 1e-4, (proposal, beta, observed, chi2)
    assert observed[0] > 0 and observed[5] > 0  # never-seen items are drawn too


def test_counts_come_from_the_training_targets():
    p = ex.Problem(num_rows=40, num_items=30)
    table = ex.synthetic_train_table(p)
    s = NegativeSampler.from_rows(TrainRows(table, p.max_len, p.num_rows, 0), p.num_items, 4)
    expected = np.zeros(p.num_items + 1, dtype=np.int64)
    for seq in table.column("seq").to_pylist():
        np.add.at(expected, np.asarray(seq[1:][-p.max_len:]), 1)  # every item after the first, last L
    assert np.allclose(s.freq, expected[1:] / expected.sum())


def test_accidental_hits_get_no_weight():
    torch.manual_seed(0)
    pos = torch.randn(3, requires_grad=True)
    cand = torch.randn(3, 4, requires_grad=True)
    targets = torch.tensor([5, 2, 9])
    items = torch.tensor([5, 2, 5, 7])
    log_count = torch.tensor([0.1, -0.3, 0.1, 0.7])
    loss = sampled_softmax_loss(pos, cand, targets, Candidates(items, log_count))
    loss.sum().backward()
    for i, t in enumerate(targets.tolist()):
        keep = items != t
        ref = torch.logsumexp(torch.cat([pos[i:i + 1], cand[i, keep] - log_count[keep]]), 0) - pos[i]
        assert torch.allclose(loss[i], ref)
        assert torch.all(cand.grad[i, ~keep] == 0)
    assert torch.all(cand.grad[2] != 0)  # target 9 is no candidate: nothing masked


def test_logq_corrected_loss_is_an_unbiased_estimate_of_full_softmax():
    """Exact expectation over every ordered draw of n = 3 negatives from Q (M = 5):
    E[exp(loss)] = exp(full cross-entropy), since the corrected sum of the negatives' exp-logits
    estimates Σ_{j≠t} e^{s_j} without bias. Without the correction, or with the target's logit
    corrected too (TensorFlow's convention), it is off."""
    counts = np.array([40, 3, 0, 10, 1])
    n, target = 3, 2
    s = NegativeSampler(counts, n, proposal="unigram", beta=1.0)
    logits = torch.tensor([0.3, 1.2, -0.5, 0.8, 2.0], dtype=torch.float64)
    full = torch.logsumexp(logits, 0) - logits[target - 1]
    expect = {"logq": 0.0, "none": 0.0, "tf": 0.0}
    for draw in itertools.product(range(1, 6), repeat=n):
        items = torch.tensor(draw)
        prob = float(np.prod(s.q[np.asarray(draw) - 1]))
        log_count = torch.log(n * torch.from_numpy(s.q[np.asarray(draw) - 1]))
        args = (logits[target - 1:target], logits[items - 1][None], torch.tensor([target]))
        expect["logq"] += prob * sampled_softmax_loss(*args, Candidates(items, log_count)).exp().item()
        expect["none"] += prob * sampled_softmax_loss(*args, Candidates(items, None)).exp().item()
        tf_pos = logits[target - 1:target] - np.log(n * s.q[target - 1])
        expect["tf"] += prob * sampled_softmax_loss(tf_pos, *args[1:], Candidates(items, log_count)).exp().item()
    assert expect["logq"] == pytest.approx(full.exp().item(), rel=1e-12)
    assert abs(expect["none"] / full.exp().item() - 1) > 0.05
    assert abs(expect["tf"] / full.exp().item() - 1) > 0.05


def _model(plugins: bool, num_items: int = 50):
    cfg = ModelConfig(backbone="sasrec", dim=8, num_blocks=1, dropout=0.0, max_len=6)
    torch.manual_seed(0)
    model = build_model(cfg, num_items, 2, PluginConfig(adapter_hidden=[8], item_bias=True, item_offset=True)
                        if plugins else None)
    with torch.no_grad():  # plugins away from the identity, so they change every logit
        for p in model.plugin_parameters():
            p.normal_(0, 0.3)
    return model


def test_many_uniform_negatives_give_full_cross_entropy_and_its_gradient():
    """Uniform Q, 40,000 negatives for 50 items: every item ~800 times; with logQ the loss and
    the backbone gradient are full softmax's up to sampling noise; without, the loss is off by
    about log(n / M)."""
    model = _model(False)
    p = ex.Problem(num_rows=16, num_items=50, max_len=6)
    batch = TrainRows(ex.synthetic_train_table(p), p.max_len, p.num_rows, 0).take(torch.arange(p.num_rows))
    params = list(model.backbone_parameters())

    def loss_and_grad(loss, cands=None):
        vec, _ = per_position_losses(model, batch.inputs, batch.targets, None, None, loss, candidates=cands)
        grads = torch.autograd.grad(vec.mean(), params)
        return vec.detach(), torch.cat([g.reshape(-1) for g in grads])

    full, g_full = loss_and_grad("ce")
    sampler = NegativeSampler(np.zeros(50), 40_000, proposal="uniform", seed=2)
    sampled, g_sampled = loss_and_grad("sampled_softmax", sampler.candidates(0, 0, None, torch.device("cpu")))
    assert (sampled - full).abs().max().item() < 0.02
    assert ((g_sampled - g_full).norm() / g_full.norm()).item() < 0.05
    ablation = NegativeSampler(np.zeros(50), 40_000, proposal="uniform", logq=False, seed=2)
    off, _ = loss_and_grad("sampled_softmax", ablation.candidates(0, 0, None, torch.device("cpu")))
    assert (off - full).mean().item() > np.log(40_000 / 50) - 0.5


@pytest.mark.parametrize("plugins", [False, True])
def test_candidate_logits_are_full_logits_columns(plugins):
    model = _model(plugins)
    model.use_plugins = True
    states = torch.randn(7, 8)
    stratum = torch.tensor([0, 1, 1, 0, 1, 0, 0])
    items = torch.tensor([3, 50, 1, 3, 17])
    full = model.full_logits(states, stratum)
    assert torch.allclose(model.candidate_logits(states, stratum, items), full[:, items], atol=1e-6)
    targets = torch.tensor([4, 9, 1, 50, 2, 2, 33])
    own = model.position_logits(states, stratum, targets[:, None])[:, 0]
    assert torch.allclose(own, full[torch.arange(7), targets], atol=1e-6)
    if plugins:  # the stratum really enters: plugins on and off differ
        model.use_plugins = False
        assert not torch.allclose(model.candidate_logits(states, stratum, items), full[:, items], atol=1e-3)


def test_in_batch_candidates_are_the_sorted_distinct_targets():
    s = NegativeSampler(COUNTS, 4, in_batch=True, seed=3)
    local = torch.tensor([7, 2, 7, 4])
    c = s.candidates(0, 1, local, torch.device("cpu"))
    assert torch.equal(c.items[:4], torch.from_numpy(s.draw(0, 1)))
    assert c.items[4:].tolist() == [2, 4, 7]
    # expected count: n·Q(c) + P(c among the 4 targets)
    f = s.freq[c.items.numpy() - 1]
    expected = 4 * s.q[c.items.numpy() - 1] + 1 - (1 - f) ** 4
    assert np.allclose(c.log_count.double().numpy(), np.log(expected), rtol=1e-6)


def test_engine_trains_both_stages_with_sampled_softmax():
    p = ex.Problem(num_rows=120, num_items=40, max_len=8, seed=5)
    cfg = TrainConfig.from_dict({
        "method": "pinet", "loss": "sampled_softmax",
        "sampled": {"num_negatives": 16, "in_batch": True},
        "model": {"dim": 16, "num_blocks": 1, "dropout": 0.0, "max_len": p.max_len},
        "optim": {"batch_size": 32, "max_epochs": 3, "patience": 10},
        "stage2": {"max_epochs": 2, "patience": 10}, "run": {"progress": False},
    })
    meta = RunMeta(num_items=p.num_items, num_strata=2, num_train_samples=p.num_rows,
                   user_share=[0.8, 0.2], interaction_share=[0.5, 0.5])
    reports = []
    engine = Engine(cfg, meta, ex.synthetic_train_table(p), ex.synthetic_eval_table(p, 1),
                    ex.synthetic_eval_table(p, 2), report=lambda m, s: reports.append(m), say=lambda s: None)
    assert engine.sampler is not None and engine.sampler.in_batch
    final = engine.run()
    losses = [m["train/loss"] for m in reports if m.get("stage") == 1.0]
    assert losses[-1] < losses[0]  # it trains
    assert [m["stage"] for m in reports if "train/loss" in m] == [1.0] * 3 + [2.0] * 2
    assert 0.0 <= final["test/all/ndcg@10"] <= 1.0  # evaluation still ranks the full catalogue
