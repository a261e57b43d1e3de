"""BCSR benchmarks: speedup over dense ``jnp`` of jsparse, ``jax.experimental.sparse``
and ``scipy.sparse`` for A (M x K, block-sparse) @ X (K x N), forward and gradient."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import markdown_table, paired_speedup
from jsparse import BCSR, matmul

# Three rounds of five consecutive calls per side: each side is timed warm, in its
# steady state, and the rounds alternate so that load bursts hit both sides.
_ROUNDS = {"reps": 3, "run": 5}


def _case(key, shape, block_shape, density, n):
    a = BCSR.random(key, shape, density=density, block_shape=block_shape)
    x = jax.random.normal(jax.random.fold_in(key, 1), (shape[1], n))
    return a, x


def _forward_row(a: BCSR, x: jax.Array) -> list:
    from jax.experimental import sparse as jsp

    dense_w = a.todense()
    dense = jax.jit(lambda w, x: w @ x)
    spmm = {
        impl: jax.jit(lambda a, x, impl=impl: matmul(a, x, impl=impl)) for impl in ("xla", "auto")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = jsp.BCSR.fromdense(dense_w)
        peer_mm = jax.jit(lambda p, x: p @ x)
    t_dense, xla_speedup = paired_speedup(dense, (dense_w, x), spmm["xla"], (a, x), **_ROUNDS)
    row = [
        f"{a.block_shape[0]}x{a.block_shape[1]}",
        f"{100 * (1 - a.density):.0f}%",
        t_dense * 1e3,
        xla_speedup,
        paired_speedup(dense, (dense_w, x), spmm["auto"], (a, x), **_ROUNDS)[1],
        paired_speedup(dense, (dense_w, x), peer_mm, (peer, x), **_ROUNDS)[1],
    ]
    try:
        xs = np.asarray(x)
        csr, bsr = a.to_scipy("csr"), a.to_scipy("bsr")
        row += [
            paired_speedup(dense, (dense_w, x), lambda: csr @ xs, (), reps=3, run=3)[1],
            paired_speedup(dense, (dense_w, x), lambda: bsr @ xs, (), reps=3, run=3)[1],
        ]
    except ImportError:
        row += ["n/a", "n/a"]
    return row


def _grad_row(a: BCSR, x: jax.Array) -> list:
    from jax.experimental import sparse as jsp

    target = jnp.ones((a.shape[0], x.shape[1]))
    dense_w = a.todense()

    def loss_dense(w, x):
        return jnp.sum((w @ x - target) ** 2)

    def loss_sparse(data, x):
        return jnp.sum((a.with_values(data) @ x - target) ** 2)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = jsp.BCSR.fromdense(dense_w)

        def loss_peer(data, x, indices, indptr):  # indices as arguments: no constant folding
            p = jsp.BCSR((data, indices, indptr), shape=peer.shape)
            return jnp.sum((p @ x - target) ** 2)

        g_dense = jax.jit(jax.value_and_grad(loss_dense, argnums=(0, 1)))
        g_sparse = jax.jit(jax.value_and_grad(loss_sparse, argnums=(0, 1)))
        g_peer = jax.jit(jax.value_and_grad(loss_peer, argnums=(0, 1)))
        t_dense, speedup = paired_speedup(g_dense, (dense_w, x), g_sparse, (a.data, x), **_ROUNDS)
        peer_args = (peer.data, x, peer.indices, peer.indptr)
        return [
            f"{a.block_shape[0]}x{a.block_shape[1]}",
            f"{100 * (1 - a.density):.0f}%",
            t_dense * 1e3,
            speedup,
            paired_speedup(g_dense, (dense_w, x), g_peer, peer_args, reps=3, run=3)[1],
        ]


def run(quick: bool = False) -> str:
    """The BCSR tables (markdown)."""
    size = 1024 if quick else 2048
    n = 256 if quick else 512
    blocks = [(32, 32)] if quick else [(16, 16), (32, 32), (64, 64)]
    densities = [0.5, 0.1] if quick else [0.5, 0.3, 0.1, 0.05]
    key = jax.random.key(0)
    rows = []
    for bs in blocks:
        for d in densities:
            a, x = _case(key, (size, size), bs, d, n)
            rows.append(_forward_row(a, x))
    fwd = markdown_table(
        [
            "block",
            "sparsity",
            "dense ms",
            "jsparse xla",
            "jsparse auto",
            "jax.experimental.sparse.BCSR",
            "scipy CSR",
            "scipy BSR",
        ],
        rows,
    )
    grad_rows = []
    for bs in [(32, 32)] if quick else [(32, 32), (64, 64)]:
        a, x = _case(key, (size, size), bs, 0.1, n)
        grad_rows.append(_grad_row(a, x))
    grad = markdown_table(
        ["block", "sparsity", "dense ms", "jsparse", "jax.experimental.sparse.BCSR"], grad_rows
    )
    return (
        f"## BCSR: A {size}x{size} @ X {size}x{n}, float32\n\n"
        "Forward; entries are speedups over dense `jnp` (dense time / method time; "
        "> 1 is faster): the median over 3 alternating rounds of the ratio of medians of 5 "
        "consecutive runs (3 for scipy) after warm-up, one process.\n\n"
        f"{fwd}\n\n"
        "`value_and_grad` with respect to (A's values, X) of `sum((A @ X - T)**2)`; "
        "speedup over the dense gradient.\n\n"
        f"{grad}"
    )
