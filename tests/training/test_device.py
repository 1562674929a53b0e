"""Device placement and precision of the sequence training stack, checked on the CPU.

CI has no GPU: every path that differs on a GPU (rows in host memory copied per batch, device-side
GA checks, bf16 autocast, the run's config keys) is exercised here with device="cpu"; the same
code runs with a CUDA device on a GPU machine.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_pinet.config import TrainConfig
from ray_pinet.config_base import ConfigError
from ray_pinet.methods.ga import Prior, stratum_prior, stratum_prior_on_device
from ray_pinet.training import exactness as ex
from ray_pinet.training.batches import TrainRows, epoch_batches
from ray_pinet.training.device import autocast, backend_for, resolve_device
from ray_pinet.training.ga_step import GradReducer
from ray_pinet.training.loop import run_epoch

from ray_pinet.training.engine import Engine
from tests.training.test_engine import P as TP
from tests.training.test_engine import eval_table, make_engine

P = ex.Problem()


def _weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_explicit_cpu_device_trains_exactly_the_default_path():
    default = make_engine({"method": "pinet", "model.dropout": 0.1})
    final_default = default.run()
    # the same engine, built with device=cpu passed explicitly (as a worker does)
    base = make_engine({"method": "pinet", "model.dropout": 0.1, "run.device": "cpu"})
    explicit = Engine(base.cfg, base.meta, ex.synthetic_train_table(TP), eval_table(TP, 1), eval_table(TP, 2),
                      report=lambda m, s: None, say=lambda s: None, device=torch.device("cpu"))
    assert explicit.device == default.device == torch.device("cpu")
    final_explicit = explicit.run()
    assert _weights_hash(explicit.model) == _weights_hash(default.model)
    drop = lambda m: {k: v for k, v in m.items() if not k.endswith("seconds")}  # noqa: E731
    assert drop(final_explicit) == drop(final_default)


def test_tiny_device_budget_keeps_rows_on_the_host_and_gives_the_same_batches():
    table = ex.synthetic_train_table(P)
    resident = TrainRows(table, P.max_len, P.num_rows, 2, torch.device("cpu"), budget_mb=2048)
    host = TrainRows(table, P.max_len, P.num_rows, 2, torch.device("cpu"), budget_mb=1e-6)
    assert resident.resident and not host.resident
    ids = list(epoch_batches(P.num_rows, 32, 7, 3))
    got_resident = list(resident.prefetched(iter(ids)))
    got_host = list(host.prefetched(iter(ids)))
    assert len(got_resident) == len(got_host) == len(ids)
    for a, b, want in zip(got_resident, got_host, ids):
        for field in ("inputs", "targets", "negs", "stratum", "sample_id"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field
        assert torch.equal(a.sample_id, want)  # prefetching kept the order


def test_device_prior_equals_the_host_prior_bit_for_bit():
    rng = np.random.default_rng(0)
    share = [0.7, 0.2, 0.1]
    for _ in range(50):
        counts = torch.from_numpy(rng.integers(0, 4, size=3).astype(np.float64))
        for kind, alpha in (("interaction_share", 0.0), ("uniform", 0.0), ("user_share", 0.0),
                            ("power", 0.5), ("power", -1.0), ("power", 0.0), ("reweight", 0.0),
                            ("stratum_mean", 0.0)):
            prior = Prior(kind, alpha, share, stratum_weights=[2.0, 0.5, 0.0])
            host = stratum_prior(prior, counts)
            dev, bad = stratum_prior_on_device(prior, counts)
            assert torch.equal(host, dev), (kind, alpha, counts)
            assert not bool(bad)
    # where the host version raises, the device version raises its flag
    _, bad = stratum_prior_on_device(Prior("user_share", user_share=[1.0, 0.0]),
                                     torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert bool(bad)


def test_grad_reducer_takes_bf16_parameters_and_reduces_in_fp32():
    torch.manual_seed(0)
    w32 = torch.nn.Parameter(torch.randn(5, 3))
    w16 = torch.nn.Parameter(w32.detach().to(torch.bfloat16).clone())
    x = torch.randn(8, 5)
    strata = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0])
    grads = {}
    for name, w in (("fp32", w32), ("bf16", w16)):
        reducer = GradReducer([w], 2)
        loss = (x @ w.float()).pow(2).sum(1)
        info = reducer.backward(loss, strata, Prior("power", 0.5, [0.8, 0.2]))
        reducer.close()
        assert w.grad.dtype == w.dtype and info.loss.dtype == torch.float32
        grads[name] = w.grad.float()
    # the bf16 run differs only by its parameters' and gradients' bf16 rounding (~3 digits)
    torch.testing.assert_close(grads["bf16"], grads["fp32"], rtol=2e-2, atol=2e-2)


def test_bf16_autocast_on_cpu_trains_close_to_fp32():
    finals = {}
    for precision in ("fp32", "bf16"):
        engine = make_engine({"method": "joint", "run.precision": precision})
        finals[precision] = engine.run()
        assert engine.state.history[0]["train/loss"] > engine.state.history[-2]["train/loss"]
    a, b = finals["fp32"]["test/all/ndcg@10"], finals["bf16"]["test/all/ndcg@10"]
    # 4 epochs on 120 synthetic rows: bf16's rounding moves NDCG@10 by far less than 0.05
    assert abs(a - b) < 0.05, (a, b)
    assert finals["fp32"]["test/all/ndcg@10"] != finals["bf16"]["test/all/ndcg@10"] or \
        finals["fp32"]["final_val/all/ndcg@10"] != finals["bf16"]["final_val/all/ndcg@10"]


def _bf16_epoch(rank: int, world: int, init_file: str, out_dir: str, precision: str = "bf16",
                budget_mb: float = float("inf")) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cfg = ex._cfg(P, {"run.precision": precision, "ga.prior": "power", "ga.alpha": 0.5,
                          "ga.bucket_cap_mb": 0.002})
        rows = TrainRows(ex.shard(ex.synthetic_train_table(P), rank, world), P.max_len, P.num_rows, 0,
                         budget_mb=budget_mb)
        model = ex._model(P, cfg)
        params = list(model.backbone_parameters())
        stats = run_epoch(ex.epoch_setup(P, model, params, [torch.optim.SGD(params, lr=0.5)], rows, cfg,
                                         ex.variant_prior(P, "power", 0.5)), 0)
        flat = torch.cat([q.detach().reshape(-1) for q in params])
        torch.save({"params": flat, "loss": stats.loss}, os.path.join(out_dir, f"{world}-{rank}.pt"))
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_two_gloo_ranks_under_bf16_equal_one_process(tmp_path):
    """Under bf16 autocast a rank's forward sees only its half of each global batch: the bf16
    matmuls of a row do not depend on the other rows, but the fp32 sums of the GA loss and of
    the all-reduced gradient add the same terms in another order (rounding ~1e-7 relative),
    and a bf16 forward turns such differences into at most bf16 rounding (2^-8 relative) of the
    values they feed. After one SGD epoch (lr 0.5) the parameters must agree within 1e-2
    absolute while the epoch moves them by > 5e-2 (measured here: 6.0e-3 of a 9.3e-2 move);
    the fp32 version of this check is exact to 1e-5 (test_exactness)."""
    _bf16_epoch(0, 1, "", str(tmp_path))
    mp.start_processes(_bf16_epoch, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    one = torch.load(tmp_path / "1-0.pt")
    two = [torch.load(tmp_path / f"2-{r}.pt") for r in range(2)]
    assert torch.equal(two[0]["params"], two[1]["params"])  # the ranks agree exactly
    init = torch.cat([q.detach().reshape(-1) for q in ex._model(P, ex._cfg(P)).backbone_parameters()])
    assert (one["params"] - init).abs().max() > 5e-2
    diff = (two[0]["params"] - one["params"]).abs().max().item()
    assert diff < 1e-2, f"2 gloo ranks under bf16 differ from 1 process by {diff:.2e}"
    assert abs(two[0]["loss"] - one["loss"]) < 1e-2 * abs(one["loss"])


def test_two_gloo_ranks_with_host_resident_rows_equal_one_process(tmp_path):
    """run.device_data_mb = 0: each rank's rows stay in host memory and every batch is copied,
    one prefetched ahead. Two such ranks must compute what one process with device-resident rows
    computes, to the fp32 exactness of test_exactness (1e-5)."""
    _bf16_epoch(0, 1, "", str(tmp_path), "fp32")
    mp.start_processes(_bf16_epoch, args=(2, str(tmp_path / "init"), str(tmp_path), "fp32", 0.0), nprocs=2,
                       start_method="spawn")
    one = torch.load(tmp_path / "1-0.pt")
    two = [torch.load(tmp_path / f"2-{r}.pt") for r in range(2)]
    assert torch.equal(two[0]["params"], two[1]["params"])
    init = torch.cat([q.detach().reshape(-1) for q in ex._model(P, ex._cfg(P)).backbone_parameters()])
    assert (one["params"] - init).abs().max() > 5e-2
    assert (two[0]["params"] - one["params"]).abs().max().item() < 1e-5
    assert abs(two[0]["loss"] - one["loss"]) < 1e-6 * abs(one["loss"])


def test_device_helpers():
    assert resolve_device("cpu") == torch.device("cpu")
    assert backend_for("cuda") == "nccl" and backend_for(torch.device("cpu")) == "gloo"
    assert isinstance(autocast("cpu", "bf16"), torch.autocast)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="run.device is 'cuda' but torch sees no CUDA device"):
            resolve_device("cuda")


@pytest.mark.parametrize("run, message", [
    ({"device": "gpu"}, "run.device: 'gpu' is not one of ['auto', 'cpu', 'cuda']"),
    ({"precision": "fp16"}, "run.precision: 'fp16' is not one of ['fp32', 'bf16']"),
    ({"gpus_per_worker": -1}, "run.gpus_per_worker must be >= 0 (0 = CPU workers), got -1.0"),
    ({"gpus_per_worker": 1, "device": "cpu"}, "run.gpus_per_worker must be 0 when run.device is cpu"),
    ({"gpus_per_worker": float("inf")}, "run.gpus_per_worker: must be a finite number"),
    ({"device_data_mb": -1}, "run.device_data_mb must be >= 0"),
    ({"gpus_per_worker": 0.5, "num_workers": 2}, "run.gpus_per_worker must be 0 or >= 1 with more than one worker"),
])
def test_run_device_keys_are_validated_at_load(run, message):
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"run": run})
    assert message in str(err.value)


def test_run_device_defaults():
    run = TrainConfig.from_dict({}).run
    assert (run.device, run.gpus_per_worker, run.precision) == ("auto", 0.0, "fp32")
    assert TrainConfig.from_dict({"run": {"gpus_per_worker": 0.5, "device": "cuda"}}).run.gpus_per_worker == 0.5
