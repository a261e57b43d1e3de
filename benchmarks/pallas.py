"""Pallas kernel benchmarks on an accelerator: kernels against dense ``jnp.dot``.

For each case it reports the kernel time, the ratio to the dense matmul of the
same (densified) weight, and the fraction of the roofline bound the kernel
reaches: ``max(FLOPs / peak FLOP/s, bytes / bandwidth)`` with the *stored*
FLOPs and bytes (block values, indices, ``X`` once, ``Y``). Peaks default to an
H100 SXM (docs/pallas.md); on other devices the percentages are indicative only.

On a machine without GPU/TPU it prints a note and returns at once: interpret-mode
timings say nothing about kernel speed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.timing import markdown_table, median_time
from jsparse import BCSR, matmul

# H100 SXM: bf16 dense tensor-core peak and HBM3 bandwidth (PERF-NOTES.md).
PEAK_FLOPS = {"bfloat16": 990e12, "float32": 67e12}
PEAK_BYTES_PER_S = 3.35e12


def _accelerator() -> str | None:
    platform = jax.default_backend()
    return platform if platform in ("gpu", "tpu") else None


def _roofline_s(a: BCSR, n: int, dtype) -> float:
    bm, bn = a.block_shape
    item = jnp.dtype(dtype).itemsize
    flops = 2 * a.nse * bm * bn * n
    nbytes = a.nse * bm * bn * item + a.nse * 4 + (a.shape[1] + a.shape[0]) * n * item
    return max(flops / PEAK_FLOPS[jnp.dtype(dtype).name], nbytes / PEAK_BYTES_PER_S)


def _row(key, shape, block_shape, density, n, dtype) -> list:
    a = BCSR.random(key, shape, density=density, block_shape=block_shape, dtype=dtype)
    x = jax.random.normal(jax.random.fold_in(key, 1), (shape[1], n), dtype)
    w = a.todense()
    dense = jax.jit(lambda w, x: jnp.dot(w, x, preferred_element_type=jnp.float32).astype(x.dtype))
    kernel = jax.jit(lambda a, x: matmul(a, x, impl="pallas"))
    grad_dense = jax.jit(jax.grad(lambda w, x: jnp.sum(dense(w, x).astype(jnp.float32))))
    grad_kernel = jax.jit(
        jax.grad(lambda a, x: jnp.sum(kernel(a, x).astype(jnp.float32)), allow_int=True)
    )
    t_dense, t_kernel = median_time(dense, w, x), median_time(kernel, a, x)
    t_gdense, t_gkernel = median_time(grad_dense, w, x), median_time(grad_kernel, a, x)
    bound = _roofline_s(a, n, dtype)
    return [
        f"{shape[0]}x{shape[1]}",
        f"{block_shape[0]}x{block_shape[1]}",
        f"{100 * (1 - a.density):.0f}%",
        n,
        jnp.dtype(dtype).name,
        t_kernel * 1e6,
        t_dense / t_kernel,
        f"{100 * bound / t_kernel:.0f}%",
        t_gdense / t_gkernel,
    ]


def run(quick: bool = False) -> str:
    """Markdown: Pallas BCSR kernels vs dense on the local accelerator."""
    platform = _accelerator()
    if platform is None:
        return (
            "## Pallas kernels\n\nNo GPU or TPU on this machine "
            f"(backend {jax.default_backend()!r}): the Pallas kernel benchmarks need an "
            "accelerator and were skipped. Correctness of the kernels is covered on CPU "
            "by `tests/test_pallas_bcsr.py` (interpret mode and lowering checks)."
        )
    size = 2048 if quick else 4096
    cases = [
        ((size, size), (32, 32), 0.1, 1),
        ((size, size), (32, 32), 0.1, 16),
        ((size, size), (64, 64), 0.1, 512),
        ((size, size), (32, 32), 0.3, 512),
    ]
    if not quick:
        cases += [((size, size), (128, 128), 0.05, 4096), ((size, size), (16, 16), 0.1, 64)]
    rows = []
    for i, (shape, block_shape, density, n) in enumerate(cases):
        key = jax.random.key(i)
        try:
            rows.append(_row(key, shape, block_shape, density, n, jnp.bfloat16))
        except NotImplementedError as e:  # a shape the kernel does not tile
            rows.append([f"{shape[0]}x{shape[1]}", f"{block_shape}", "-", n, "bf16",
                         f"skipped: {e}", "", "", ""])  # fmt: skip
    header = ["A", "block", "sparsity", "N", "dtype", "kernel µs", "× dense",
              "% roofline", "× dense (grad)"]  # fmt: skip
    device = jax.devices()[0].device_kind
    return (
        f'## Pallas kernels ({device})\n\nBCSR `A @ X` with `impl="pallas"` against '
        "dense `jnp.dot` of the same weight (× > 1: faster than dense); % roofline uses "
        "H100 SXM peaks.\n\n" + markdown_table(header, rows)
    )
