"""Benchmarks of fl_app: `python -m benchmarks.run` (see docs/benchmarks.md)."""
