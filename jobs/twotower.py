"""Ray Job entry point: ``ray-pinet twotower`` (OneBP, TwoBP, MF-BPR with uniform or AUC-NS
negatives on Ray Train, tracked in MLflow).

Every argument is passed on to ``ray-pinet twotower``; ``--smoke-test`` runs a tiny end-to-end check.

    ray-pinet submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/twotower.py --config configs/twotower/ml-100k-onebp.yaml --method onebp --method twobp
"""

import sys

from ray_pinet.cli import main

if __name__ == "__main__":
    sys.exit(main(["twotower", *sys.argv[1:]]))
