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


def paired_speedup(
    reference: Callable, ref_args: Sequence, candidate: Callable, cand_args: Sequence, reps: int = 9
) -> tuple[float, float]:
    """(median reference seconds, median of per-pair speedups reference / candidate).

    The two functions alternate, so a burst of load on a shared machine hits both
    sides of a pair; the ratio is far steadier than a ratio of separate medians.
    """

    def once(f, args):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        return time.perf_counter() - start

    for _ in range(2):
        once(reference, ref_args), once(candidate, cand_args)
    pairs = np.array([(once(reference, ref_args), once(candidate, cand_args)) for _ in range(reps)])
    return float(np.median(pairs[:, 0])), float(np.median(pairs[:, 0] / pairs[:, 1]))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed with 2 decimals."""

    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
