"""Timing helpers shared by the benchmark sections."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax
import numpy as np


def median_time(fn: Callable, *args, reps: int = 7, warmup: int = 2) -> float:
    """Median wall time (seconds) of ``fn(*args)`` after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed with 2 decimals."""

    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
