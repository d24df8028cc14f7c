"""Benchmarks: ``steps`` (the engine's step-time table for the cluster simulator)."""
