"""Ray Job entry point: ``ray-pinet recommend`` (a registered model -> top-k raw item ids per user).

Every argument is passed on to ``ray-pinet recommend``; ``--smoke-test`` needs no model: it
prepares the bundled ml-latest-small, logs a tiny untrained model and recommends for every user.

    ray-pinet submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/recommend.py --model models:/ml-latest-small@champion --output $PWD/recs \
        --tracking-uri sqlite:///$PWD/runs/mlflow.db
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/recommend.py --smoke-test
"""

import sys

from ray_pinet.cli import main

if __name__ == "__main__":
    sys.exit(main(["recommend", *sys.argv[1:]]))
