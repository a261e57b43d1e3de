"""N:M benchmarks: W (M x K, 2:4 along K) @ X (K x B) against the dense matmul of
the same (pruned) matrix, forward and gradient, plus stored bytes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import markdown_table, paired_speedup
from jsparse import NM, matmul

IMPLS = ("xla", "dense", "auto")


def _forward_row(a: NM, x: jax.Array) -> list:
    dense_w = a.todense()
    dense = jax.jit(lambda w, x: w @ x)
    times, row = [], []
    for impl in IMPLS:
        f = jax.jit(lambda a, x, impl=impl: matmul(a, x, impl=impl))
        t_dense, speedup = paired_speedup(dense, (dense_w, x), f, (a, x))
        times.append(t_dense)
        row.append(speedup)
    return [x.shape[1], float(np.median(times)) * 1e3, *row]


def _grad_row(a: NM, x: jax.Array) -> list:
    target = jnp.ones((a.shape[0], x.shape[1]))

    def loss_dense(w, x):
        return jnp.sum((w @ x - target) ** 2)

    def loss_sparse(values, x):
        return jnp.sum((a.with_values(values) @ x - target) ** 2)

    g_dense = jax.jit(jax.value_and_grad(loss_dense, argnums=(0, 1)))
    g_sparse = jax.jit(jax.value_and_grad(loss_sparse, argnums=(0, 1)))
    t_dense, speedup = paired_speedup(g_dense, (a.todense(), x), g_sparse, (a.values, x), reps=5)
    return [x.shape[1], t_dense * 1e3, speedup]


def _bytes_rows(shape) -> list:
    rows = []
    for dtype in (jnp.float32, jnp.bfloat16):
        for n, m in ((2, 4), (1, 4), (2, 8)):
            a = NM.random(jax.random.key(0), shape, n=n, m=m, dtype=dtype)
            dense = shape[0] * shape[1] * jnp.dtype(dtype).itemsize
            export = "n/a"
            if (n, m) == (2, 4):
                values, meta = a.to_2to4_compressed()
                export = (values.nbytes + meta.nbytes) / dense
            rows.append(
                [jnp.dtype(dtype).name, f"{n}:{m}", a.position_bits, a.nbytes / dense, export]
            )
    return rows


def run(quick: bool = False) -> str:
    size = 1024 if quick else 4096
    widths = (1, 16, 256) if quick else (1, 16, 256, 1024)
    key = jax.random.key(0)
    a = NM.random(key, (size, size), n=2, m=4, axis=-1)
    xs = {b: jax.random.normal(jax.random.fold_in(key, b), (size, b)) for b in widths}
    fwd = [_forward_row(a, xs[b]) for b in widths]
    grad = [_grad_row(a, xs[b]) for b in widths if b in (1, 256)]
    out = [
        f"## N:M (2:4, float32): W {size}x{size} @ X {size}xB\n",
        "Speedup = dense time / jsparse time (> 1: jsparse is faster), the median over "
        "alternating pairs of runs; dense is `w @ x` on the pruned matrix stored densely.\n",
        markdown_table(["B", "dense ms", "xla", "dense impl", "auto"], fwd),
        "\nGradient (value_and_grad w.r.t. the values and X):\n",
        markdown_table(["B", "dense ms", "jsparse"], grad),
        "\nStored bytes / dense bytes (`nbytes`: values plus bit-packed positions; the "
        "2:4 export: values plus uint16 metadata):\n",
        markdown_table(["dtype", "N:M", "bits", "NM", "2:4 export"], _bytes_rows((size, size))),
    ]
    return "\n".join(out)
