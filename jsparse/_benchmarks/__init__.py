"""Benchmark sections for ``python -m jsparse.bench`` (one module per format)."""
