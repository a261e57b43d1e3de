"""Block-sparse attention: speed and memory against ``jax.nn.dot_product_attention``
with the same mask as a dense boolean (CPU, float32, B = 1, H = 8, D = 64).

Issue 14's targets: local window 512 (causal), L = 8192, block 64: forward >= 6x,
forward + backward >= 5x, peak bytes of the compiled forward + backward <= 1/8 of
dense's; causal only, L = 4096: >= 1.6x; strided (local 256 + a 64-wide band every
512 positions, causal), L = 8192: >= 4x.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jsparse.attention as ja
from benchmarks.timing import markdown_table, paired_times

_ROUNDS = {"reps": 3, "run": 3}


def _cases(quick: bool):
    if quick:
        return [
            ("local 128 causal", ja.causal() & ja.local(127), 1024, 64),
            ("causal", ja.causal(), 512, 64),
        ]
    return [
        ("local 512 causal", ja.causal() & ja.local(511), 8192, 64),
        ("causal", ja.causal(), 4096, 64),
        ("strided (local 256 + 64 every 512) causal",
         ja.causal() & (ja.local(255) | ja.strided(512, 64)), 8192, 64),
    ]  # fmt: skip


def _peak_bytes(fn, *args) -> int:
    """Peak bytes XLA plans for ``fn`` (arguments + outputs + temporaries)."""
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    if stats is None:
        return -1
    return int(
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def _row(name, fn, L, block, heads, dim):
    mask = ja.BlockMask.from_fn(fn, L, L, block_size=(block, block))
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (1, L, heads, dim), jnp.float32) for x in keys)
    dense_mask = mask.to_dense()[None]  # (1, 1, L, S)

    def sparse_fwd(q, k, v, m):
        return ja.block_sparse_attention(q, k, v, m)

    def dense_fwd(q, k, v, dm):
        return jax.nn.dot_product_attention(q, k, v, mask=dm)

    def grad_of(f):
        return jax.grad(lambda q, k, v, m: f(q, k, v, m).sum(), argnums=(0, 1, 2))

    t_dense, t_sparse, fwd = paired_times(
        jax.jit(dense_fwd), (q, k, v, dense_mask), jax.jit(sparse_fwd), (q, k, v, mask), **_ROUNDS
    )
    t_dense_g, _, both = paired_times(
        jax.jit(grad_of(dense_fwd)), (q, k, v, dense_mask),
        jax.jit(grad_of(sparse_fwd)), (q, k, v, mask), **_ROUNDS,
    )  # fmt: skip
    mem_dense = _peak_bytes(grad_of(dense_fwd), q, k, v, dense_mask)
    mem_sparse = _peak_bytes(grad_of(sparse_fwd), q, k, v, mask)
    return [
        name,
        L,
        f"{100 * mask.density():.1f}%",
        t_dense * 1e3,
        fwd,
        t_dense_g * 1e3,
        both,
        f"{mem_dense / 2**20:.0f} / {mem_sparse / 2**20:.0f}",
        mem_dense / max(mem_sparse, 1),
    ]


def run(quick: bool) -> str:
    """The attention section (markdown)."""
    heads, dim = (2, 32) if quick else (8, 64)
    rows = [_row(name, fn, L, block, heads, dim) for name, fn, L, block in _cases(quick)]
    header = [
        "mask",
        "L",
        "blocks kept",
        "dense fwd ms",
        "fwd speedup",
        "dense fwd+bwd ms",
        "fwd+bwd speedup",
        "peak MiB fwd+bwd dense / sparse",
        "memory ratio",
    ]
    return (
        f"## Block-sparse attention (CPU, float32, B=1, H={heads}, D={dim}, block 64)\n\n"
        "Speedups of `jsparse.attention.block_sparse_attention` (impl auto) over "
        "`jax.nn.dot_product_attention` with the same mask as a dense boolean, in one "
        "process; peak bytes from `compiled.memory_analysis()` of the jitted gradient.\n\n"
        + markdown_table(header, rows)
    )
