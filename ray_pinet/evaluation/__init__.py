"""Evaluation: pure metric functions and per-stratum statistics that all-reduce exactly."""
