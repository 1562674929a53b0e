"""Plain nn.Module recommenders (SASRec, GRU4Rec, DIN) with optional per-stratum plugins.

Nothing here knows about Ray or torch.distributed; ``registry.build_model`` is the entry point.
This file imports nothing: the configs (``models/config.py``) load without torch, so the CLI's
``--help`` and config validation stay fast.
"""
