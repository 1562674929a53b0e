"""Checks that need a CUDA device (marker ``gpu``: skipped where ``torch.cuda.is_available()`` is
false, i.e. in CI; ``benchmarks/gpu_check.sh`` runs them on a GPU machine).

The GPU machine has torch, numpy, pandas and pyarrow but neither Ray nor MLflow: everything here
runs through the Ray-free ``Engine`` and two-tower loop, with ``torch.distributed`` ranks spawned by
``torch.multiprocessing`` where two ranks are needed, and nothing imported here may import Ray or
MLflow at module level. TF32 is off, so CUDA and the CPU differ only by fp32 rounding order.

* one process on CUDA == the CPU reference (fp32 tolerance): joint and pinet (Engine), OneBP,
  BPR with AUC-NS and NCF with T-CE (two-tower loop);
* two ranks on CUDA tensors == one process (NCCL with one GPU per rank when there are two GPUs,
  else gloo on CUDA tensors of one GPU);
* a checkpoint written from CUDA tensors loads on the CPU and scores the same there.

Data: synthetic sequence rows (``training/exactness.py``), and the first 120 users of ML-100K pair
data: ``RAY_PINET_GPU_PAIRS`` / ``RAY_PINET_GPU_PAIRS_LABELED`` name folders prepared elsewhere
(``benchmarks/gpu_check.sh prepare``), else they are prepared here from ../shared/data.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ray_pinet.config import TrainConfig
from ray_pinet.training import exactness as ex
from ray_pinet.training.collectives import rank_and_world
from ray_pinet.training.engine import Engine, RunMeta

pytestmark = pytest.mark.gpu

P = ex.Problem(num_rows=160, num_items=50, max_len=8, seed=7)
TWOTOWER_VARIANTS = {
    "onebp": ["model.method=onebp", "model.duplicate_rule=last_write", "model.ema_granularity=batch"],
    "bpr-auc_ns": ["model.method=bpr", "model.sampler=auc_ns", "optim.lr=0.01"],
    "ncf-gmf-tce": ["model.method=ncf", "data.label_threshold=2", "model.loss=tce", "model.tce_num_gradual=20",
                    "optim.lr=0.01"],
}


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 matmuls in fp32 (TF32 would round to 10 mantissa bits and fail every comparison)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


eval_table = ex.synthetic_eval_table


# training-step options (issue 20) on top of the defaults (packed rows, full-softmax ce)
STEP_VARIANTS = {
    "default": {},
    "padded": {"optim": {"batching": "padded"}},
    "sampled-rows": {"loss": "sampled_softmax", "sampled": {"num_negatives": 16, "in_batch": True},
                     "optim": {"item_exchange": "rows"}},
}


def engine_cfg(method: str, device: str, epochs: int = 3, extra: dict | None = None) -> TrainConfig:
    d = {
        "method": method,
        "model": {"dim": 16, "num_blocks": 1, "dropout": 0.0, "max_len": P.max_len},
        "optim": {"batch_size": 32, "max_epochs": epochs, "patience": 100},
        "stage2": {"max_epochs": 2, "patience": 100},
        "run": {"progress": False, "device": device, "seed": 3},
    }
    for key, value in (extra or {}).items():
        d[key] = {**d[key], **value} if isinstance(value, dict) and key in d else value
    return TrainConfig.from_dict(d)


def run_engine(method: str, device: str, epochs: int = 3, reports: list | None = None,
               extra: dict | None = None) -> tuple[dict, dict]:
    """(final metrics, model state on the CPU) of a whole Engine run on ``device``."""
    cfg = engine_cfg(method, device, epochs, extra)
    meta = RunMeta(num_items=P.num_items, num_strata=2, num_train_samples=P.num_rows,
                   user_share=[0.8, 0.2], interaction_share=[0.5, 0.5])
    reports = [] if reports is None else reports
    rank, world = rank_and_world()  # each rank gets its block of every split, as read_shard gives it
    eng = Engine(cfg, meta, *(ex.shard(t, rank, world) for t in (ex.synthetic_train_table(P), eval_table(P, 1),
                                                                  eval_table(P, 2))),
                 report=lambda m, s: reports.append((m, s)), say=lambda s: None, device=torch.device(device))
    final = eng.run()
    return final, {k: v.detach().cpu() for k, v in eng.model.state_dict().items()}


def assert_states_close(got: dict, want: dict, init: dict | None = None) -> None:
    for name, value in want.items():
        if not value.is_floating_point():
            assert torch.equal(got[name], value), name
            continue
        a, b = got[name].double(), value.double()
        if init is not None:
            # Adam turns float noise on coordinates whose exact gradient is zero into lr-sized
            # steps (tests/training/test_exactness.py): compare where the reference moved.
            live = (b - init[name].double()).abs() > 0
            a, b = a[live], b[live]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def assert_metrics_close(got: dict, want: dict) -> None:
    keys = [k for k in want if k.startswith(("test/", "final_val/", "stage1_test/"))]
    assert keys
    for k in keys:
        assert got[k] == pytest.approx(want[k], abs=1e-4), k


@pytest.mark.parametrize("variant", sorted(STEP_VARIANTS))
@pytest.mark.parametrize("method", ["joint", "pinet"])
def test_engine_on_cuda_equals_cpu(method, variant):
    cpu_final, cpu_state = run_engine(method, "cpu", extra=STEP_VARIANTS[variant])
    cuda_final, cuda_state = run_engine(method, "cuda", extra=STEP_VARIANTS[variant])
    assert_states_close(cuda_state, cpu_state)
    assert_metrics_close(cuda_final, cpu_final)


def test_engine_checkpoint_from_cuda_loads_and_scores_on_cpu(tmp_path):
    from ray_pinet.checkpoint_io import load_weights, save_weights
    from ray_pinet.models.registry import build_model

    reports: list = []
    _, cuda_state = run_engine("joint", "cuda", epochs=1, reports=reports)
    snap = [s for _, s in reports if s is not None][-1]
    save_weights(snap, tmp_path / "state.pt")
    loaded = load_weights(tmp_path / "state.pt")
    assert all(v.device.type == "cpu" for v in loaded["model"].values())
    cfg = TrainConfig.from_dict(loaded["config"])
    model = build_model(cfg.model, P.num_items, 2, None)
    model.load_state_dict(loaded["model"])
    model.use_plugins = False
    model.eval()
    gpu_model = build_model(cfg.model, P.num_items, 2, None).to("cuda")
    gpu_model.load_state_dict(loaded["model"])
    gpu_model.use_plugins = False
    gpu_model.eval()
    history = torch.randint(1, P.num_items + 1, (8, P.max_len))
    with torch.no_grad():
        want = gpu_model.predict(history.cuda(), None, None).cpu()
        got = model.predict(history, None, None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# -- two ranks ---------------------------------------------------------------------------------

def _rank_device(rank: int) -> torch.device:
    return torch.device("cuda", rank if torch.cuda.device_count() >= 2 else 0)


def _engine_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = _rank_device(rank)
    torch.cuda.set_device(device)
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"  # NCCL needs a GPU per rank
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        final, state = run_engine("joint", "cuda", epochs=2)
        if rank == 0:
            torch.save({"final": final, "state": state, "backend": backend}, out)
    finally:
        dist.destroy_process_group()


def test_two_ranks_on_cuda_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    from ray_pinet.models.registry import build_model

    cfg = engine_cfg("joint", "cpu", 2)
    torch.manual_seed(cfg.run.seed)
    init = build_model(cfg.model, P.num_items, 2, None).state_dict()
    one_final, one_state = run_engine("joint", "cuda", epochs=2)
    mp.spawn(_engine_rank, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path / "rank0.pt")), nprocs=2)
    got = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert_states_close(got["state"], one_state, init)
    assert_metrics_close(got["final"], one_final)


# -- two-tower loop ----------------------------------------------------------------------------

def _pairs(tmp_path_factory, labeled: bool) -> Path:
    env = os.environ.get("RAY_PINET_GPU_PAIRS_LABELED" if labeled else "RAY_PINET_GPU_PAIRS")
    if env:
        return Path(env)
    from ray_pinet.data.pairs import prepare_pairs
    from tests.conftest import shared_file

    cfg = twotower_cfg(tmp_path_factory.mktemp("pairs") / "p", ["data.label_threshold=2"] if labeled else [],
                       shared_file("ml-100k/u.data"))
    prepare_pairs(cfg.data, progress=False)
    return Path(cfg.data.output)


def twotower_cfg(output: Path, extra: list[str], source: Path | None = None):
    from ray_pinet.twotower_config import TwoTowerConfig
    from tests.conftest import REPO

    sets = [f"data.output={output}", "data.max_users=120", "data.valid_share=0.1", "model.dim=8",
            "optim.batch_size=256", "optim.max_epochs=3", "eval.every=1", "run.progress=false",
            "tracking.enabled=false", "model.beta=0.9", *extra]
    if source is not None:
        sets.insert(0, f"data.source.path={source}")
    return TwoTowerConfig.from_yaml(REPO / "configs/twotower/ml-100k-onebp.yaml", sets)


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    return {False: _pairs(tmp_path_factory, False), True: _pairs(tmp_path_factory, True)}


def _twotower(variant: str, path: Path, device: str, rank: int = 0, world: int = 1):
    from ray_pinet.training.twotower_loop import TwoTowerRun, run_epochs

    # data.* must match what the folder was prepared with only for ensure_pairs; the loop reads it
    cfg = twotower_cfg(path, TWOTOWER_VARIANTS[variant])
    run = TwoTowerRun(cfg, path, rank, world, device=torch.device(device))
    history = run_epochs(run, lambda row, r: None)
    return history, run.state()


def assert_twotower_close(got, want) -> None:
    (gh, gs), (wh, ws) = got, want
    tables = ws["model"] if "model" in ws else {"user": ws["user"], "item": ws["item"]}
    got_tables = gs["model"] if "model" in gs else {"user": gs["user"], "item": gs["item"]}
    for name, value in tables.items():
        assert got_tables[name].device.type == "cpu"  # checkpoints hold CPU tensors
        torch.testing.assert_close(got_tables[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert len(gh) == len(wh)
    for a, b in zip(gh, wh):
        for key in ("train/loss", "test/all/ndcg@10", "test/all/auc", "test/all/users"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("variant", list(TWOTOWER_VARIANTS))
def test_twotower_on_cuda_equals_cpu(variant, pair_data):
    path = pair_data[variant.startswith("ncf")]
    assert_twotower_close(_twotower(variant, path, "cuda"), _twotower(variant, path, "cpu"))


def _twotower_rank(rank: int, world: int, init: str, jobs: list[tuple[str, str, str]]) -> None:
    import torch.distributed as dist

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    device = _rank_device(rank)
    torch.cuda.set_device(device)
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        for variant, path, out in jobs:
            history, state = _twotower(variant, Path(path), str(device), rank, world)
            if rank == 0:
                torch.save((history, state), out)
    finally:
        dist.destroy_process_group()


def test_twotower_two_ranks_on_cuda_equal_one_process(tmp_path, pair_data):
    import torch.multiprocessing as mp

    jobs = [(v, str(pair_data[v.startswith("ncf")]), str(tmp_path / f"{v}.pt")) for v in TWOTOWER_VARIANTS]
    mp.spawn(_twotower_rank, args=(2, f"file://{tmp_path / 'pg'}", jobs), nprocs=2)
    for variant, path, out in jobs:
        assert_twotower_close(torch.load(out, weights_only=False), _twotower(variant, Path(path), "cpu"))
