"""BCSR's ``"xla"`` implementation: pure ``jnp``/``lax`` block-sparse kernels.

The kernels take parallel arrays: ``data (nse, bm, bn)``, ``row_ids (nse,)``
(block-row of each stored block) and ``col_ids (nse,)`` (block-column). The bottom
of the file adapts them to :class:`~jsparse.core.ProductKernels` and registers them.

Why a ``lax.scan`` over stored blocks: on CPU, the gather formulation
(``x[cols]`` -> batched einsum -> ``segment_sum``) materialises an
``nse * bn * N`` temporary that costs more than the FLOPs saved. A scan whose step
multiplies one block by a dynamic slice of ``x`` and accumulates into a dynamic
slice of the output keeps everything in cache (see docs/benchmarks.md). Small
blocks are processed ``chunk`` at a time (gather + scatter-add of a small chunk)
so that each step carries enough work to amortise the loop overhead.

Large blocks (>= 64x64) are also processed a few at a time, as one batched product
whose left operand contracts its *leading* block axis (the blocks are passed
transposed for ``A @ x``). XLA:CPU sends a row-major f32 dot to a single-threaded
YNNPACK kernel, but a dot with a transposed left operand to its Eigen kernel, which
runs the products of a batch on both cores of this machine: about 1.2x faster at
64x64 (docs/benchmarks.md). The arithmetic is the same either way; only the speed
depends on this XLA:CPU behaviour.

The kernels are jitted with static shapes so that eager calls hit the compile
cache instead of re-tracing and re-compiling the scan on every call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jsparse.core import product
from jsparse.core.product import ProductKernels
from jsparse.core.registry import register_impl
from jsparse.formats.bcsr.matrix import BCSR
from jsparse.formats.bcsr.pattern import BlockPattern

__all__ = ["XLA_KERNELS", "chunk_size", "gather", "sddmm", "spmm"]

# Target number of block elements processed per scan step.
_ELEMENTS_PER_STEP = 1024
# Blocks of at least this many elements take the batched, both-cores path in spmm.
_THREADED_BLOCK_ELEMENTS = 64 * 64
_THREADED_CHUNK = 4


def chunk_size(block_shape: tuple[int, int]) -> int:
    """Blocks per scan step: 1 for blocks of >= 1024 elements, more for small ones."""
    bm, bn = block_shape
    return max(1, _ELEMENTS_PER_STEP // (bm * bn))


def _chunked(data, row_ids, col_ids, chunk, pad_row=0):
    """Pad the block arrays to a multiple of ``chunk`` and reshape to (steps, chunk, ...).

    Padding blocks are zeros at block ``(pad_row, 0)``; the product passes an
    out-of-range ``pad_row`` so that its scatter drops them (a zero block times a
    NaN in ``x`` would otherwise add NaN to an unstored row)."""
    nse = data.shape[0]
    pad = (-nse) % chunk
    if pad:
        data = jnp.concatenate([data, jnp.zeros((pad, *data.shape[1:]), data.dtype)])
        row_ids = jnp.concatenate([row_ids, jnp.full((pad,), pad_row, row_ids.dtype)])
        col_ids = jnp.concatenate([col_ids, jnp.zeros((pad,), col_ids.dtype)])
    steps = (nse + pad) // chunk
    return (
        data.reshape(steps, chunk, *data.shape[1:]),
        row_ids.reshape(steps, chunk),
        col_ids.reshape(steps, chunk),
    )


@functools.partial(jax.jit, static_argnames=("shape", "transpose"))
def spmm(
    data: jax.Array,
    row_ids: jax.Array,
    col_ids: jax.Array,
    x: jax.Array,
    *,
    shape: tuple[int, int],
    transpose: bool = False,
) -> jax.Array:
    """``A @ x`` (or ``A.T @ x`` with ``transpose=True``) for block-sparse ``A``.

    Args:
      data, row_ids, col_ids: the stored blocks of ``A`` (shape ``shape``).
      x: dense ``(shape[1], N)`` (``(shape[0], N)`` when transposed).
      transpose: multiply by ``A.T`` without forming it.

    Returns:
      ``(shape[0], N)`` (``(shape[1], N)`` when transposed), accumulated in (at least) float32
      and returned in ``x.dtype``.
    """
    nse, bm, bn = data.shape
    if transpose:
        # A.T has blocks data[b].T at (col_ids[b], row_ids[b]).
        out_rows, src_ids, dst_ids = shape[1], row_ids, col_ids
        b_out, b_in = bn, bm
        block_dims = "ji"
    else:
        out_rows, src_ids, dst_ids = shape[0], col_ids, row_ids
        b_out, b_in = bm, bn
        block_dims = "ij"
    n = x.shape[1]
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    out = jnp.zeros((out_rows, n), acc_dtype)
    if nse == 0:
        return out.astype(x.dtype)
    threaded = bm * bn >= _THREADED_BLOCK_ELEMENTS
    chunk = _THREADED_CHUNK if threaded else chunk_size((bm, bn))
    if chunk == 1:

        def step(acc, blk):
            d, dst, src = blk
            xb = lax.dynamic_slice_in_dim(x, src * b_in, b_in, 0)
            y = jnp.einsum(f"{block_dims},jn->in", d, xb, preferred_element_type=acc_dtype)
            cur = lax.dynamic_slice_in_dim(acc, dst * b_out, b_out, 0)
            return lax.dynamic_update_slice_in_dim(acc, cur + y, dst * b_out, 0), None

        out, _ = lax.scan(step, out, (data, dst_ids, src_ids))
        return out.astype(x.dtype)

    if threaded and not transpose:
        # Contract the leading axis of each (transposed) block: see the module docstring.
        data, block_dims = data.swapaxes(1, 2), "ji"
    xb = x.reshape(-1, b_in, n)
    out = out.reshape(-1, b_out, n)

    def chunk_step(acc, blk):
        d, dst, src = blk
        y = jnp.einsum(f"c{block_dims},cjn->cin", d, xb[src], preferred_element_type=acc_dtype)
        return acc.at[dst].add(y, mode="drop"), None

    pad_row = out_rows // b_out  # out of range: padding blocks are dropped
    out, _ = lax.scan(chunk_step, out, _chunked(data, dst_ids, src_ids, chunk, pad_row))
    return out.reshape(out_rows, n).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("block_shape",))
def sddmm(
    u: jax.Array,
    v: jax.Array,
    row_ids: jax.Array,
    col_ids: jax.Array,
    *,
    block_shape: tuple[int, int],
) -> jax.Array:
    """Blocks ``u[rows of block-row r] @ v[rows of block-column c].T`` at each ``(r, c)``.

    Args:
      u: dense ``(M, J)``; v: dense ``(K, J)`` (note: ``v`` is the transposed right
        factor, so both operands are read row-wise).
      row_ids, col_ids: ``(nse,)`` block coordinates.

    Returns:
      ``(nse, bm, bn)`` in ``u.dtype``, accumulated in (at least) float32.
    """
    bm, bn = block_shape
    nse = row_ids.shape[0]
    j = u.shape[1]
    if nse == 0:
        return jnp.zeros((0, bm, bn), u.dtype)
    acc_dtype = jnp.promote_types(u.dtype, jnp.float32)
    chunk = chunk_size(block_shape)
    if chunk == 1:

        def step(_, rc):
            r, c = rc
            ub = lax.dynamic_slice_in_dim(u, r * bm, bm, 0)
            vb = lax.dynamic_slice_in_dim(v, c * bn, bn, 0)
            return None, jnp.einsum("in,jn->ij", ub, vb, preferred_element_type=acc_dtype)

        _, blocks = lax.scan(step, None, (row_ids, col_ids))
        return blocks.astype(u.dtype)

    ub_all = u.reshape(-1, bm, j)
    vb_all = v.reshape(-1, bn, j)
    dummy = jnp.zeros((nse, 1, 1), u.dtype)
    _, rows, cols = _chunked(dummy, row_ids, col_ids, chunk)

    def chunk_step(_, rc):
        r, c = rc
        return None, jnp.einsum(
            "cin,cjn->cij", ub_all[r], vb_all[c], preferred_element_type=acc_dtype
        )

    _, blocks = lax.scan(chunk_step, None, (rows, cols))
    return blocks.reshape(-1, bm, bn)[:nse].astype(u.dtype)


# ------------------------------------------------------------------ the implementation
def _spmm(data, pattern: BlockPattern, x, *, config, transpose):
    shape, _ = config
    return spmm(data, pattern.row_ids, pattern.indices, x, shape=shape, transpose=transpose)


def _sample(u, v, pattern: BlockPattern, *, config):
    _, block_shape = config
    return sddmm(u, v, pattern.row_ids, pattern.indices, block_shape=block_shape)


XLA_KERNELS = ProductKernels(spmm=_spmm, sample=_sample)


def gather(a: BCSR, dense: jax.Array) -> jax.Array:
    """The entries of ``dense`` (``a.shape``) in ``a``'s stored blocks, ``(nse, bm, bn)``.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> gather(a, jnp.arange(16.0).reshape(4, 4))[1].tolist()
      [[10.0, 11.0], [14.0, 15.0]]
    """
    bm, bn = a.block_shape
    blocks = dense.reshape(a.shape[0] // bm, bm, a.shape[1] // bn, bn)
    return blocks[a.row_ids, :, a.indices, :]


@register_impl("matmul", BCSR, "xla")
def _matmul(a: BCSR, x: jax.Array, *, transpose: bool) -> jax.Array:
    return product.spmm(XLA_KERNELS, a.kernel_config, transpose, a.data, a.pattern, x)


@register_impl("sddmm", BCSR, "xla")
def _sddmm(pattern: BCSR, x: jax.Array, y: jax.Array) -> BCSR:
    data = product.sample(XLA_KERNELS, pattern.kernel_config, pattern.pattern, x, y.T)
    return pattern._replace(data=data)
