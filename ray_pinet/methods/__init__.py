"""Training-method math without distribution: per-sample losses and GA weights (pure torch)."""
