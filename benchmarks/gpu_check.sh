#!/usr/bin/env bash
# The one GPU check (issue 19): run on the GPU machine (torch + CUDA, numpy, pandas, pyarrow; no
# Ray, no MLflow, no internet), from the repository root, with the data prepared here and carried:
#
#   benchmarks/gpu_check.sh prepare        # HERE (needs Ray): writes prepared/gpu-check/ (ignored)
#   benchmarks/gpu_check.sh run            # THERE: run(command=..., carry=["prepared/gpu-check"])
#
# `run` writes under $OUT (default /tmp/gpu-check): pytest.txt / junit.xml of `pytest -m gpu
# tests/gpu`, gpu_throughput.{json,csv,md} and sampled_softmax/ (not with --smoke).
# `run --device cpu --smoke` completes on a CPU box (the gpu tests skip there).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=prepared/gpu-check
mode=${1:-run}; shift || true
case "$mode" in
  prepare)
    PY=${PYTHON:-.venv/bin/python}
    mkdir -p "$DATA"
    "$PY" -m ray_pinet.cli prepare --config configs/prepare/beauty.yaml --output "$DATA/beauty"
    "$PY" - "$DATA" <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from ray_pinet.data.pairs import prepare_pairs
from tests.gpu.test_cuda import twotower_cfg
from tests.conftest import shared_file
root = Path(sys.argv[1])
for name, extra in (("pairs", []), ("pairs-labeled", ["data.label_threshold=2"])):
    cfg = twotower_cfg(root / name, extra, shared_file("ml-100k/u.data"))
    prepare_pairs(cfg.data, progress=False)
PYEOF
    du -sh "$DATA";;
  run)
    OUT=${OUT:-/tmp/gpu-check}; mkdir -p "$OUT"
    PY=${PYTHON:-python}
    export PYTHONPATH=. RAY_PINET_GPU_PAIRS=$DATA/pairs RAY_PINET_GPU_PAIRS_LABELED=$DATA/pairs-labeled
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count())" | tee "$OUT/env.txt"
    status=0
    "$PY" -m pytest -m gpu tests/gpu -p no:cacheprovider -q -rA --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.txt" || status=$?
    "$PY" benchmarks/gpu_throughput.py --data "$DATA/beauty" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.txt" || status=$?
    # issue 20 on the GPU: full softmax vs sampled softmax (dense and row-sparse item table), 10^6 items
    if [[ " $* " != *" --smoke "* ]]; then
      "$PY" benchmarks/sampled_softmax.py --device cuda --items 1000000 --steps 50 --batch-size 256 \
        --negatives 16384 --exchange dense rows --out "$OUT/sampled_softmax" 2>&1 | tee "$OUT/sampled.txt" || status=$?
    fi
    exit $status;;
  *) echo "usage: $0 prepare | run [gpu_throughput.py args, e.g. --device cpu --smoke]" >&2; exit 2;;
esac
