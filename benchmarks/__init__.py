"""Benchmarks that reproduce the comparison; run as `python -m benchmarks.X` from the repo root."""
