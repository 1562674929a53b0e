"""Ray Job entry point: ``ray-pinet train`` (joint / pinet / baselines on Ray Train, tracked in MLflow).

Every argument is passed on to ``ray-pinet train``; ``--smoke-test`` runs a tiny end-to-end check.

    ray-pinet submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config configs/ml-latest-small.yaml
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config configs/ml-latest-small.yaml --smoke-test
"""

import sys

from ray_pinet.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
