"""Ray Job entry point: ``ray-pinet retrain`` (new date partitions -> warm-started candidate ->
gate against the registered model -> register; ``python jobs/retrain.py --help`` lists the options).

Every argument is passed on to ``ray-pinet retrain``; ``--smoke-test`` runs a tiny end-to-end check.

    ray-pinet submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/retrain.py --config configs/ml-latest-small.yaml \
        --logs /mnt/shared/logs/ml-latest-small --model ray-pinet-ml-latest-small
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/retrain.py --config configs/ml-latest-small.yaml \
        --logs /mnt/shared/logs/ml-latest-small --model ray-pinet-ml-latest-small --smoke-test
"""

import sys

from ray_pinet.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
