"""ray-pinet: PINet (gradient aggregation + per-stratum plugins) and its related methods on Ray.

Layers, lowest first (docs/design.md "Layers" has the full map); a module imports only from its own layer or
below, and ``tests/test_layers.py`` checks there is no import cycle: config and data (``config_base``,
``config_sections``, ``config``, ``twotower_config``, ``data/``), models and method math (``models/``,
``methods/``, ``evaluation/``), the loops and the shell's parts (``training/``), the kinds (``kinds/``), the
driver (``training/trainer.py``), and the commands (``commands.py``, ``compare/``, ``tuning/``, ``retrain/``,
``recommend.py``) under ``cli.py``.
"""
