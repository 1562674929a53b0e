"""Ray Job entry point: ``ray-pinet tune`` (Ray Tune sweep with ASHA; registers the best model in MLflow).

Every argument is passed on to ``ray-pinet tune``; ``--smoke-test`` runs a tiny end-to-end check.

    ray-pinet submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --space tune_spaces/pinet.yaml --config configs/ml-latest-small.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --space tune_spaces/smoke.yaml --config configs/ml-latest-small.yaml --smoke-test
"""

import sys

from ray_pinet.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
