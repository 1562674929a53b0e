"""Data layer of ray-pinet: ``ray-pinet prepare`` and the prepared-data contract (docs/design.md).

- ``inputs``: which files a ``source.path`` names (local, URI, folder, glob)
- ``sources``: raw logs -> Arrow tables (one adapter per ``source.format``); ``canonical``: their
  validated canonical form
- ``clean``: per-bucket cleaning policies (duplicates, out-of-order events, min_history, min_rating)
- ``strata``: activeness -> strata, stratum statistics and priors (pure; reused by the trainer)
- ``samples``: leave-one-out splits, training windows and seeded negatives (pure, per bucket)
- ``pipeline``: ``prepare(cfg)``, the Ray orchestration that writes the output directory
- ``prepared``: the prepared folder's format check and split readers; ``restratify``: strata views
- ``pairs``: the two-tower kind's pair data; ``config``: ``PrepareConfig``; ``schema``: column names
- ``synthetic``: a seeded long-tail log generator that scales to 10^8+ rows

Import the submodules directly; this package imports nothing heavy (no Ray) on its own.
"""
