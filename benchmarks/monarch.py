"""Monarch and LowRankSparse benchmarks: speedup over the dense ``jnp`` matmul of the
same shape (forward ``M @ X`` and ``X @ M``, and the gradient of a loss with respect
to the factors and ``X``), plus the cost of the projection ``Monarch.fromdense``."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from benchmarks.timing import markdown_table, median_time
from jsparse import LowRankSparse, Monarch, matmul


def _ratio_pair(fast, slow, args_fast, args_slow, reps):
    """``(t_slow, t_slow / t_fast)``, the two measured alternately (noisy machines)."""
    ts, tf = [], []
    for _ in range(3):
        ts.append(median_time(slow, *args_slow, reps=reps))
        tf.append(median_time(fast, *args_fast, reps=reps))
    t_slow, t_fast = min(ts), min(tf)
    return t_slow, t_slow / t_fast


def _monarch_rows(n: int, n_cols: int, nblocks_list, reps: int) -> list[list]:
    key = jax.random.key(0)
    x = jax.random.normal(key, (n, n_cols))
    xt = x.T + 0
    rows = []
    dense_fwd = jax.jit(lambda w, x: w @ x)
    dense_left = jax.jit(lambda w, x: x @ w)

    def loss(w, x):
        return jnp.sum(jnp.square(w @ x))

    dense_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    mon_fwd = jax.jit(lambda w, x: matmul(w, x, impl="xla"))
    mon_left = jax.jit(lambda w, x: matmul(x, w, impl="xla"))
    mon_grad = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.square(matmul(w, x, impl="xla"))), (0, 1)))
    for nb in nblocks_list:
        w = Monarch.init(key, (n, n), nblocks=nb)
        d = w.todense()
        t_dense, fwd = _ratio_pair(mon_fwd, dense_fwd, (w, x), (d, x), reps)
        _, left = _ratio_pair(mon_left, dense_left, (w, xt), (d, xt), reps)
        _, grad = _ratio_pair(mon_grad, dense_grad, (w, x), (d, x), max(3, reps // 2))
        flops = n * n / (w.left.size + w.right.size)  # dense / stored values
        rows.append([nb, w.block_rank, f"{flops:.1f}x", t_dense * 1e3, fwd, left, grad])
    return rows


def _projection_rows(sizes) -> list[list]:
    rows = []
    for n, nb in sizes:
        x = jax.random.normal(jax.random.key(1), (n, n))
        proj = jax.jit(lambda x, nb=nb: Monarch.fromdense(x, nblocks=nb, return_error=True))
        jax.block_until_ready(proj(x))
        start = time.perf_counter()
        _, err = jax.block_until_ready(proj(x))
        rows.append([f"{n}x{n}", nb, (time.perf_counter() - start) * 1e3, float(err)])
    return rows


def _lowrank_rows(n: int, n_cols: int, reps: int) -> list[list]:
    key = jax.random.key(2)
    x = jax.random.normal(key, (n, n_cols))
    dense_fwd = jax.jit(lambda w, x: w @ x)
    lrs_fwd = jax.jit(lambda a, x: matmul(a, x, impl="xla"))
    rows = []
    for rank, density, block in ((n // 64, 0.02, (32, 32)), (n // 16, 0.05, (32, 32))):
        a = LowRankSparse.random(key, (n, n), rank=rank, density=density, block_shape=block)
        t_dense, fwd = _ratio_pair(lrs_fwd, dense_fwd, (a, x), (a.todense(), x), reps)
        rows.append([rank, f"{100 * density:.0f}% of {block[0]}x{block[1]}", t_dense * 1e3, fwd])
    return rows


def run(quick: bool = False) -> str:
    n, n_cols = (1024, 256) if quick else (4096, 1024)
    reps = 3 if quick else 5
    nblocks_list = (4, 16) if quick else (2, 4, 16, 64)
    out = [
        f"## Monarch (CPU float32, M {n}x{n}, X {n}x{n_cols})\n",
        'Speedup = dense time / Monarch time (`impl="xla"`); `M @ X` is the forward, '
        "`X.T @ M` the other side, grad is `d/d(M, X) sum((M @ X)**2)`.\n",
        markdown_table(
            [
                "nblocks",
                "block_rank",
                "fewer FLOPs",
                "dense ms",
                "M @ X",
                "X.T @ M",
                "grad",
            ],
            _monarch_rows(n, n_cols, nblocks_list, reps),
        ),
        "\n### Projection `Monarch.fromdense` (batched SVD of the nblocks² sub-blocks)\n",
        markdown_table(
            ["matrix", "nblocks", "ms", "rel. error (Gaussian input)"],
            _projection_rows(((512, 4), (1024, 16)) if quick else ((1024, 4), (2048, 16))),
        ),
        f"\n## LowRankSparse (CPU float32, A {n}x{n}, X {n}x{n_cols})\n",
        markdown_table(["rank", "S", "dense ms", "A @ X speedup"], _lowrank_rows(n, n_cols, reps)),
    ]
    return "\n".join(out)
