"""Training-method math without distribution: per-sample losses and GA weights (pure torch), and what each
method of each kind needs (``needs.py``, torch-free: the configs load it) with the two-tower method objects
(``twotower_methods.py``)."""
