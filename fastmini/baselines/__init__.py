"""Baselines: the implementations users have today, kept as oracles for tests and benchmarks."""
