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


def paired_times(
    reference: Callable,
    ref_args: Sequence,
    candidate: Callable,
    cand_args: Sequence,
    reps: int = 9,
    run: int = 1,
) -> tuple[float, float, float]:
    """(median reference seconds, median candidate seconds, median over rounds of
    reference / candidate time).

    Each of ``reps`` rounds times ``run`` consecutive calls of each function and
    compares their medians. The rounds alternate the two functions, so a burst of load
    on a shared machine hits both sides of a round and the ratio is far steadier than
    a ratio of two separate medians. ``run=1`` alternates single calls; a longer run
    measures each side in its own warm steady state (caches, clock speed), as a loop
    of many calls would see it. Two untimed rounds warm both sides up first.
    """

    def median_run(f, args):
        times = []
        for _ in range(run):
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - start)
        return np.median(times)

    for _ in range(2):
        median_run(reference, ref_args), median_run(candidate, cand_args)
    rounds = np.array(
        [(median_run(reference, ref_args), median_run(candidate, cand_args)) for _ in range(reps)]
    )
    return (
        float(np.median(rounds[:, 0])),
        float(np.median(rounds[:, 1])),
        float(np.median(rounds[:, 0] / rounds[:, 1])),
    )


def paired_speedup(
    reference: Callable,
    ref_args: Sequence,
    candidate: Callable,
    cand_args: Sequence,
    reps: int = 9,
    run: int = 1,
) -> tuple[float, float]:
    """(median reference seconds, median over rounds of reference / candidate time):
    :func:`paired_times` without the candidate's own median."""
    t_ref, _, ratio = paired_times(reference, ref_args, candidate, cand_args, reps, run)
    return t_ref, ratio


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed with 2 decimals."""

    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
