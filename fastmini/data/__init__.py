"""Data helpers shared by the trainers, the demo and the benchmarks (ground floor: no model code)."""
