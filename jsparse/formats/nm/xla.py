"""N:M's ``"xla"`` implementation: pure ``jnp``/``lax`` kernels (arrays in, arrays out).

An N:M matrix ``A`` of shape ``(rows, cols)`` keeps ``n`` of every ``m`` consecutive
entries along ``axis`` (0: down a column, 1: along a row). It is described by two
arrays of the same shape, the dense shape with the grouped axis shrunk by ``n / m``:

* ``values``: the kept entries, group after group, in increasing position;
* ``positions``: ``uint8``, the position in ``[0, m)`` of each kept entry inside
  its group (strictly increasing within a group).

The kernels take these *unpacked* positions (one ``uint8`` per kept value). The
:class:`jsparse.NM` leaf stores them bit-packed (:func:`~jsparse.formats.nm.packing.pack_positions`,
:func:`unpack_positions`; ``position_bits(m)`` bits each, little-endian along the last
axis); the format unpacks them before calling a kernel.

Why these formulations (CPU, measured in docs/nm.md):

* Gathers (``x[g * m + p]``) and scatters are slow on XLA:CPU; selecting among the
  ``m`` candidates with a chain of ``where`` is an elementwise fusion that vectorises.
* XLA:CPU's fused reductions are an order of magnitude slower than a matrix-vector
  product by Eigen, so the matrix-vector product reduces its elementwise products
  with a ``dot`` against a vector of ones (after summing pairs of groups inside the
  fusion, which halves the bytes of the temporary).
* For a wider dense operand the values are decompressed and multiplied by a dense
  ``dot``. A large matrix is decompressed a chunk of rows (``_CHUNK`` entries) at a
  time inside a ``lax.scan``: the chunk stays in cache for the matrix-matrix product
  and no ``(rows, cols)`` temporary is written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jsparse.core import product as core_product
from jsparse.core.nonfinite import stored_only
from jsparse.core.product import ProductKernels
from jsparse.core.registry import register_impl
from jsparse.formats.nm.matrix import NM
from jsparse.formats.nm.packing import (
    compress,
    decompress,
    group_view,
    pack_positions,
    select_position,
    unpack_positions,
)

__all__ = ["XLA_KERNELS", "gather", "prune", "sampled", "spmm", "values_length"]

# Dense entries decompressed per scan step (4 MiB of float32): big enough for an
# efficient matrix product, small enough to stay in cache. Smaller matrices are
# decompressed in one piece.
_CHUNK = 1 << 20


def _matvec(values, positions, x, *, n, m, axis):
    """``A @ x`` (axis 1) or ``A.T @ x`` (axis 0) for a vector ``x``: the contraction
    runs along the grouped axis. Returns a vector, accumulated in float32."""
    acc = jnp.promote_types(values.dtype, jnp.float32)
    groups = x.shape[0] // m
    pair = 2 if groups % 2 == 0 else 1  # groups summed inside the fusion
    xs = x.astype(acc).reshape(groups // pair, pair, m)
    v = group_view(values, axis, pair * n)
    p = group_view(positions, axis, pair * n)
    prod = None
    for q in range(pair):
        cand = [xs[:, q, j] for j in range(m)]
        if axis == 0:
            cand = [c[:, None] for c in cand]
        for k in range(n):
            s = q * n + k
            vk, pk = (v[:, :, s], p[:, :, s]) if axis == 1 else (v[:, s, :], p[:, s, :])
            term = vk.astype(acc) * select_position(pk, cand)
            prod = term if prod is None else prod + term
    # prod: (R, G/pair) for axis 1, (G/pair, K) for axis 0.
    if axis == 1:
        return jnp.dot(prod, jnp.ones((prod.shape[1],), acc))
    return jnp.dot(jnp.ones((prod.shape[0],), acc), prod)


def _row_chunk(rows: int, cols: int, unit: int) -> int:
    """Dense rows per scan step: the largest multiple of ``unit`` that divides ``rows``
    and holds at most ``_CHUNK`` entries. 0 (no scan) when the matrix has fewer than
    ``4 * _CHUNK`` entries, or when the only divisors are so small that the per-step
    overhead would dominate."""
    if rows * cols < 4 * _CHUNK:
        return 0
    target = max(unit, _CHUNK // max(cols, 1))
    units = rows // unit
    best = max(c for c in range(1, units + 1) if units % c == 0 and c * unit <= target)
    if best == units or 8 * best * unit < target:
        return 0
    return best * unit


def spmm(
    values: jax.Array,
    positions: jax.Array,
    x: jax.Array,
    *,
    n: int,
    m: int,
    axis: int,
    transpose: bool = False,
) -> jax.Array:
    """``A @ x`` (or ``A.T @ x`` with ``transpose=True``) for an N:M matrix ``A``.

    Args:
      values, positions: the N:M arrays of ``A`` (grouped along ``axis``).
      x: dense ``(cols, N)`` (``(rows, N)`` when transposed).

    Returns:
      ``(rows, N)`` (``(cols, N)`` when transposed) in ``x.dtype``, accumulated in
      (at least) float32.
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)
    contract_grouped = (axis == 1) != transpose
    if x.shape[1] == 1 and contract_grouped:
        y = _matvec(values, positions, x[:, 0], n=n, m=m, axis=axis)
        return y[:, None].astype(x.dtype)
    # Chunks of dense rows of A: storage rows (axis 1) or whole groups (axis 0).
    unit = m if axis == 0 else 1
    stored_unit = n if axis == 0 else 1
    rows = values.shape[0] // stored_unit * unit
    cols = values.shape[1] // n * m if axis == 1 else values.shape[1]
    chunk = _row_chunk(rows, cols, unit)
    dims = (((0,), (0,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))

    def product(v, p, xs):
        w = decompress(v, p, n=n, m=m, axis=axis)
        return lax.dot_general(w, xs.astype(w.dtype), dims, preferred_element_type=acc)

    if not chunk:
        return product(values, positions, x).astype(x.dtype)
    steps = rows // chunk
    vs = values.reshape(steps, -1, values.shape[1])
    ps = positions.reshape(steps, -1, positions.shape[1])
    if not transpose:
        _, y = lax.scan(lambda _, vp: (None, product(*vp, x)), None, (vs, ps))
        return y.reshape(rows, -1).astype(x.dtype)
    xs = x.reshape(steps, chunk, x.shape[1])

    def step(out, vpx):
        return out + product(*vpx), None

    out, _ = lax.scan(step, jnp.zeros((cols, x.shape[1]), acc), (vs, ps, xs))
    return out.astype(x.dtype)


def sampled(
    u: jax.Array, v: jax.Array, positions: jax.Array, *, n: int, m: int, axis: int
) -> jax.Array:
    """``u @ v.T`` at the kept entries of an N:M pattern: an array shaped like ``positions``.

    Args:
      u: dense ``(rows, N)``; v: dense ``(cols, N)`` (both read row-wise).
      positions: the pattern (grouped along ``axis``).

    Returns:
      The values-shaped array ``(u @ v.T)[kept]`` in ``u.dtype`` (float32 accumulation).
      For a large matrix only a chunk of rows of ``u @ v.T`` exists at a time; for
      ``N == 1`` it is a product of selected entries and nothing dense is formed.
    """
    acc = jnp.promote_types(u.dtype, jnp.float32)
    if u.shape[1] == 1:
        # dA[i, j] = u[i] * v[j]: select the grouped operand at the positions.
        grouped, other = (v, u) if axis == 1 else (u, v)
        g = grouped[:, 0].astype(acc).reshape(-1, m)
        p = group_view(positions, axis, n)
        if axis == 1:
            cand = [g[None, :, None, j] for j in range(m)]
            sel = select_position(p, cand).reshape(positions.shape)
            return (other.astype(acc) * sel).astype(u.dtype)
        cand = [g[:, None, None, j] for j in range(m)]
        sel = select_position(p, cand).reshape(positions.shape)
        return (sel * other[:, 0].astype(acc)[None, :]).astype(u.dtype)

    def gather(dense, p):
        d = group_view(dense, axis, m)
        pg = group_view(p, axis, n)
        if axis == 1:
            cand = [d[:, :, j : j + 1] for j in range(m)]
        else:
            cand = [d[:, j : j + 1, :] for j in range(m)]
        return select_position(pg, cand).reshape(p.shape)

    def block(ub, pb):
        dense = lax.dot_general(ub, v, (((1,), (1,)), ((), ())), preferred_element_type=acc)
        return gather(dense, pb)

    unit = m if axis == 0 else 1
    rows = u.shape[0]
    chunk = _row_chunk(rows, v.shape[0], unit)
    if not chunk:
        return block(u, positions).astype(u.dtype)
    steps = rows // chunk
    us = u.reshape(steps, chunk, u.shape[1])
    ps = positions.reshape(steps, -1, positions.shape[1])
    _, out = lax.scan(lambda _, up: (None, block(*up)), None, (us, ps))
    return out.reshape(positions.shape).astype(u.dtype)


# ------------------------------------------------------------------ the implementation
# ``pattern`` is the packed positions leaf (a small residual); kernels get it unpacked.
def _spmm(values, packed, x, *, config, transpose):
    n, m, axis = config
    positions = unpack_positions(packed, m=m, length=values.shape[1])

    def product(x):
        return spmm(values, positions, x, n=n, m=m, axis=axis, transpose=transpose)

    if x.shape[1] == 1 and (axis == 1) != transpose:
        return product(x)  # the matrix-vector product selects the stored entries only

    def dense():  # the decompressing product multiplies unstored zeros too: correct it
        w = decompress(values, positions, n=n, m=m, axis=axis)
        ones = jnp.ones(values.shape, jnp.bool_)
        mask = decompress(ones, positions, n=n, m=m, axis=axis)
        return (w.T, mask.T) if transpose else (w, mask)

    return stored_only(product, dense, x)


def _sample(u, v, packed, *, config):
    n, m, axis = config
    positions = unpack_positions(packed, m=m, length=values_length(v.shape[0], n, m, axis))
    return sampled(u, v, positions, n=n, m=m, axis=axis)


def values_length(cols: int, n: int, m: int, axis: int) -> int:
    """Length of the last axis of the values of an N:M matrix with ``cols`` columns."""
    return cols // m * n if axis == 1 else cols


XLA_KERNELS = ProductKernels(spmm=_spmm, sample=_sample)


def gather(a: NM, dense: jax.Array) -> jax.Array:
    """The entries of ``dense`` (``a.shape``) at ``a``'s stored positions, shaped like
    ``a.values``.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.NM.fromdense(jnp.array([[0.0, 3.0, 0.0, 1.0]]), n=2, m=4)
      >>> gather(a, jnp.array([[10.0, 11.0, 12.0, 13.0]])).tolist()
      [[11.0, 13.0]]
    """
    n, m, axis = a.kernel_config
    positions = a.unpacked_positions
    d = group_view(dense, axis, m)
    p = group_view(positions, axis, n)
    if axis == 1:
        cand = [d[:, :, j : j + 1] for j in range(m)]
    else:
        cand = [d[:, j : j + 1, :] for j in range(m)]
    return select_position(p, cand).reshape(positions.shape)


@register_impl("matmul", NM, "xla")
def _matmul(a: NM, x: jax.Array, *, transpose: bool) -> jax.Array:
    return core_product.spmm(XLA_KERNELS, a.kernel_config, transpose, a.values, a.positions, x)


@register_impl("sddmm", NM, "xla")
def _sddmm(pattern: NM, x: jax.Array, y: jax.Array) -> NM:
    values = core_product.sample(XLA_KERNELS, pattern.kernel_config, pattern.positions, x, y.T)
    return pattern._replace(values=values)


def prune(x: jax.Array, *, n: int, m: int, axis: int, with_mask: bool):
    """``(values, packed positions, mask or None)`` of the N:M pattern of largest
    magnitude in ``x`` (:func:`~jsparse.formats.nm.packing.compress`, ``lax.top_k``:
    ties to the lower position, NaN above every number); ``mask`` is the dense
    ``bool`` keep mask.

    Example:
      >>> import jax.numpy as jnp
      >>> v, p, mask = prune(jnp.array([[1.0, -5.0, 2.0, 0.5]]), n=2, m=4, axis=1,
      ...                    with_mask=True)
      >>> v.tolist(), p.tolist(), mask.tolist()
      ([[-5.0, 2.0]], [[9]], [[False, True, True, False]])
    """
    values, positions = compress(x, n=n, m=m, axis=axis)
    mask = None
    if with_mask:
        mask = decompress(jnp.ones(positions.shape, jnp.bool_), positions, n=n, m=m, axis=axis)
    return values, pack_positions(positions, m=m), mask


register_impl("fromdense", NM, "xla", prune)
