"""Issue 22 targets on one prepared folder: the exported scoring graph against eager scoring on
every test user, and ``ray-pinet recommend``'s users/s.

    python benchmarks/serving_bench.py --data prepared/beauty --out benchmarks/results/serving/beauty.json
    python benchmarks/serving_bench.py --smoke-test

The model is SASRec (d 64, 2 blocks, L = the data's max_len) with the default plugins, seeded and
untrained, its plugin weights drawn far from the identity (N(0, 0.3)) so that routing changes
every score: graph equality is a property of the two programs, not of trained weights. Steps:
  1. eager ``ScoringModule`` vs ``export_scoring``'s graph on every test row (plus the same rows
     as unknown users), batch 1024: max |difference| over all scores, and each one's time;
  2. the served model logged to a temporary SQLite MLflow store, then ``recommend`` (Ray Data,
     ``--actors`` Scorer actors on the CPU, batch 1024, k 10) over every user: users/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parents[1]


def build(num_items: int, max_len: int, dim: int):
    from ray_pinet.config import TrainConfig
    from ray_pinet.models.registry import build_model
    from ray_pinet.serving import ScoringModule

    cfg = TrainConfig.from_dict({"model": {"dim": dim, "num_blocks": 2, "max_len": max_len}})
    torch.manual_seed(0)
    model = build_model(cfg.model, num_items, 2, cfg.stage2.plugin)
    with torch.no_grad():
        for p in model.plugin_parameters():
            p.normal_(0, 0.3)
    model.use_plugins = True
    return ScoringModule(model.eval(), 0).eval()


def export_check(data: Path, module, max_len: int, batch: int = 1024, limit: int = 0) -> dict:
    from ray_pinet.data.prepared import read_split
    from ray_pinet.serving import export_scoring, static_routing
    from ray_pinet.training.batches import EvalRows

    test = read_split(data, "test")
    rows = EvalRows(test.slice(0, limit) if limit else test, max_len)
    x = torch.cat([rows.stratum.unsqueeze(1), rows.history], 1)
    x = torch.cat([x, torch.cat([torch.full_like(x[:, :1], -1), x[:, 1:]], 1)])  # + as unknown users
    t = time.perf_counter()
    program = export_scoring(module, max_len).module()
    export_s = time.perf_counter() - t
    static_routing(module.model, False)
    worst, eager_s, graph_s = 0.0, 0.0, 0.0
    with torch.no_grad():
        for s in range(0, len(x), batch):
            xb = x[s : s + batch]
            t = time.perf_counter()
            a = module(xb)
            eager_s += time.perf_counter() - t
            t = time.perf_counter()
            b = program(xb)
            graph_s += time.perf_counter() - t
            worst = max(worst, float((a[:, 1:] - b[:, 1:]).abs().max()))
    return {"rows": int(len(x)), "test_users": int(len(rows)), "max_abs_diff": worst, "export_s": export_s,
            "eager_s": eager_s, "exported_s": graph_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a prepared folder")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--export-rows", type=int, default=0, help="check the graph on the first N test users (0: all)")
    p.add_argument("--out")
    p.add_argument("--smoke-test", "--smoke", action="store_true", help="bundled ml-latest-small, d 16")
    args = p.parse_args()
    import mlflow

    from ray_pinet.local_ray import start_ray
    from ray_pinet.recommend import RecommendOptions, recommend
    from ray_pinet.serving import log_served_pyfunc

    tmp = Path(tempfile.mkdtemp(prefix="ray-pinet-serving-bench-"))
    try:
        start_ray()
        if args.smoke_test:
            from ray_pinet.config_base import apply_overrides, from_dict, load_yaml
            from ray_pinet.data.config import PrepareConfig
            from ray_pinet.data.pipeline import prepare

            args.data, args.dim = str(tmp / "prepared"), 16
            prepare(from_dict(PrepareConfig, apply_overrides(load_yaml(REPO / "configs/prepare/ml-latest-small-dev.yaml"), [
                f"source.path={REPO / 'data/ml-latest-small/ratings.csv'}", f"output={args.data}"])), progress=False)
        if not args.data:
            p.error("--data is required (or --smoke-test)")
        data = Path(args.data)
        max_len = json.loads((data / "prepare_config.json").read_text())["samples"]["max_len"]
        num_items = pq.read_metadata(data / "items.parquet").num_rows
        module = build(num_items, max_len, args.dim)
        result = {"data": str(data), "items": num_items, "max_len": max_len, "dim": args.dim,
                  "export": export_check(data, module, max_len, limit=args.export_rows)}
        print(json.dumps(result["export"]), flush=True)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(experiment_id=mlflow.set_experiment("serving-bench").experiment_id) as run:
            pass
        t = time.perf_counter()
        log_served_pyfunc(uri, run.info.run_id, module, max_len, data, registered_model_name="bench")
        result["log_model_s"] = time.perf_counter() - t
        result["recommend"] = recommend(RecommendOptions(model_uri="models:/bench/1", output=str(tmp / "recs"),
                                                         k=10, batch_size=1024, actors=args.actors,
                                                         tracking_uri=uri), progress=False)
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))
        if result["export"]["max_abs_diff"] > 1e-5:
            raise SystemExit(f"exported graph differs from eager scoring by {result['export']['max_abs_diff']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
