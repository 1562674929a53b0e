"""Ray Tune sweeps: search spaces, the guarded objective, the sweep driver and its report."""
