"""Data layer of ray-pinet: ``ray-pinet prepare`` and the prepared-data contract (docs/design.md).

- ``sources``: raw logs -> canonical, validated Arrow tables (one adapter per ``source.format``)
- ``clean``: per-bucket cleaning policies (duplicates, out-of-order events, min_history, min_rating)
- ``strata``: activeness -> strata, stratum statistics and priors (pure; reused by the trainer)
- ``samples``: leave-one-out splits, training windows and seeded negatives (pure, per bucket)
- ``pipeline``: ``prepare(cfg)``, the Ray orchestration that writes the output directory
- ``prepared``: ``load_meta(path)``, the small reader the trainer uses
- ``synthetic``: a seeded long-tail log generator that scales to 10^8+ rows

Import the submodules directly; this package imports nothing heavy (no Ray) on its own.
"""
