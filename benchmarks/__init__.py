"""Benchmarks for mas_ext: `make bench` runs `python -m benchmarks.bench` (see benchmarks/bench.py)."""
