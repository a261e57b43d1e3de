"""Pure ``jnp``/``lax`` N:M kernels (arrays in, arrays out).

An N:M matrix ``A`` of shape ``(rows, cols)`` keeps ``n`` of every ``m`` consecutive
entries along ``axis`` (0: down a column, 1: along a row). It is described by two
arrays of the same shape, the dense shape with the grouped axis shrunk by ``n / m``:

* ``values``: the kept entries, group after group, in increasing position;
* ``positions``: ``uint8``, the position in ``[0, m)`` of each kept entry inside
  its group (strictly increasing within a group).

The kernels take these *unpacked* positions (one ``uint8`` per kept value). The
:class:`jsparse.NM` leaf stores them bit-packed (:func:`pack_positions`,
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

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Dense entries decompressed per scan step (4 MiB of float32): big enough for an
# efficient matrix product, small enough to stay in cache. Smaller matrices are
# decompressed in one piece.
_CHUNK = 1 << 20


def position_bits(m: int) -> int:
    """Bits per packed position: 2 for ``m <= 4``, 4 for ``m <= 16``, else 8."""
    return 2 if m <= 4 else 4 if m <= 16 else 8


def packed_length(length: int, m: int) -> int:
    """Bytes per packed row of ``length`` positions: ``ceil(length / (8 // bits))``."""
    per = 8 // position_bits(m)
    return -(-length // per)


# jit: one executable per shape when called eagerly (inlined under jit).
@functools.partial(jax.jit, static_argnames="m")
def pack_positions(positions: jax.Array, *, m: int) -> jax.Array:
    """Pack positions in ``[0, m)`` into ``uint8`` bytes along the last axis.

    ``per = 8 // position_bits(m)`` consecutive positions share a byte, the first in
    the lowest bits: position ``j`` of a row sits in byte ``j // per`` at bits
    ``bits * (j % per)``. The last axis is zero-padded to a multiple of ``per``.
    Only the low ``bits`` of each position are kept (callers check the range).
    Works under ``jit`` (shifts and ors, no gather).
    """
    bits = position_bits(m)
    per = 8 // bits
    p = positions.astype(jnp.uint8)
    if per == 1:
        return p
    pad = -p.shape[-1] % per
    if pad:
        p = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, pad)])
    p = (p & jnp.uint8((1 << bits) - 1)).reshape(*p.shape[:-1], -1, per)
    out = p[..., 0]
    for j in range(1, per):
        out = out | (p[..., j] << jnp.uint8(bits * j))
    return out


# jit: one executable per shape when called eagerly (inlined under jit).
@functools.partial(jax.jit, static_argnames=("m", "length"))
def unpack_positions(packed: jax.Array, *, m: int, length: int) -> jax.Array:
    """Inverse of :func:`pack_positions`: ``uint8`` positions, the last axis ``length``
    long (the padding slots dropped). Works under ``jit``."""
    bits = position_bits(m)
    per = 8 // bits
    if per == 1:
        return packed[..., :length].astype(jnp.uint8)
    shifts = jnp.arange(per, dtype=jnp.uint8) * jnp.uint8(bits)
    p = (packed.astype(jnp.uint8)[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    return p.reshape(*packed.shape[:-1], -1)[..., :length]


def _select(p: jax.Array, candidates: list[jax.Array]) -> jax.Array:
    """``candidates[p]`` elementwise, as a ``where`` chain (no gather)."""
    out = candidates[-1]
    for j in range(len(candidates) - 2, -1, -1):
        out = jnp.where(p == j, candidates[j], out)
    return out


def _grouped(a: jax.Array, axis: int, width: int) -> jax.Array:
    """Split ``axis`` into ``(groups, width)``: ``(R, G, w)`` or ``(G, w, K)``."""
    if axis == 1:
        return a.reshape(a.shape[0], -1, width)
    return a.reshape(-1, width, a.shape[1])


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def decompress(values: jax.Array, positions: jax.Array, *, n: int, m: int, axis: int) -> jax.Array:
    """The dense matrix: ``(rows, cols)`` with the grouped ``axis`` expanded by ``m / n``."""
    v = _grouped(values, axis, n)
    p = _grouped(positions, axis, n)
    # Broadcast every kept slot against the m output positions of its group.
    slot = (lambda a, k: a[:, :, k : k + 1]) if axis == 1 else (lambda a, k: a[:, k : k + 1, :])
    shape = (v.shape[0], v.shape[1] // n * m, v.shape[2]) if axis == 0 else (*v.shape[:2], m)
    j = lax.broadcasted_iota(positions.dtype, shape, 2 if axis == 1 else 1)
    out = jnp.zeros(shape, values.dtype)
    for k in range(n):
        out = jnp.where(slot(p, k) == j, slot(v, k), out)
    if axis == 1:
        return out.reshape(values.shape[0], -1)
    return out.reshape(-1, values.shape[1])


def _matvec(values, positions, x, *, n, m, axis):
    """``A @ x`` (axis 1) or ``A.T @ x`` (axis 0) for a vector ``x``: the contraction
    runs along the grouped axis. Returns a vector, accumulated in float32."""
    acc = jnp.promote_types(values.dtype, jnp.float32)
    groups = x.shape[0] // m
    pair = 2 if groups % 2 == 0 else 1  # groups summed inside the fusion
    xs = x.astype(acc).reshape(groups // pair, pair, m)
    v = _grouped(values, axis, pair * n)
    p = _grouped(positions, axis, pair * n)
    prod = None
    for q in range(pair):
        cand = [xs[:, q, j] for j in range(m)]
        if axis == 0:
            cand = [c[:, None] for c in cand]
        for k in range(n):
            s = q * n + k
            vk, pk = (v[:, :, s], p[:, :, s]) if axis == 1 else (v[:, s, :], p[:, s, :])
            term = vk.astype(acc) * _select(pk, cand)
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
        p = _grouped(positions, axis, n)
        if axis == 1:
            cand = [g[None, :, None, j] for j in range(m)]
            sel = _select(p, cand).reshape(positions.shape)
            return (other.astype(acc) * sel).astype(u.dtype)
        cand = [g[:, None, None, j] for j in range(m)]
        sel = _select(p, cand).reshape(positions.shape)
        return (sel * other[:, 0].astype(acc)[None, :]).astype(u.dtype)

    def gather(dense, p):
        d = _grouped(dense, axis, m)
        pg = _grouped(p, axis, n)
        if axis == 1:
            cand = [d[:, :, j : j + 1] for j in range(m)]
        else:
            cand = [d[:, j : j + 1, :] for j in range(m)]
        return _select(pg, cand).reshape(p.shape)

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


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def compress(x: jax.Array, *, n: int, m: int, axis: int) -> tuple[jax.Array, jax.Array]:
    """Keep the ``n`` entries of largest magnitude in every group of ``m`` along ``axis``.

    Ties go to the lower position (``lax.top_k`` is stable), so the result is
    deterministic; works under ``jit``. Returns ``(values, positions)``.
    """
    xt = jnp.moveaxis(x, axis, -1)
    g = xt.reshape(*xt.shape[:-1], -1, m)
    _, idx = lax.top_k(jnp.abs(g), n)
    idx = jnp.sort(idx, axis=-1)
    vals = jnp.take_along_axis(g, idx, axis=-1)
    shape = (*xt.shape[:-1], -1)
    vals = jnp.moveaxis(vals.reshape(shape), -1, axis)
    pos = jnp.moveaxis(idx.astype(jnp.uint8).reshape(shape), -1, axis)
    return vals, pos


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def topn_mask(x: jax.Array, *, n: int, m: int, axis: int) -> jax.Array:
    """Boolean mask of the ``n`` largest magnitudes in every group of ``m`` along
    ``axis`` (ties to the lower position, like :func:`compress`).

    Training recomputes this mask every step (SR-STE), so for ``m <= 16`` each entry is
    ranked inside its group by pairwise comparison: ``m * m`` elementwise ops that XLA
    fuses, about 100x faster on CPU than the sort in ``compress`` for 2:4 at 2048x2048.
    """
    if m > 16:
        _, positions = compress(x, n=n, m=m, axis=axis)
        return decompress(jnp.ones(positions.shape, jnp.bool_), positions, n=n, m=m, axis=axis)
    # Split the grouped axis in place, (G, m), so the other axis stays minor (for
    # axis=0 the comparisons vectorise along the long output axis).
    shape = list(x.shape)
    shape[axis : axis + 1] = [shape[axis] // m, m]
    g = jnp.abs(x).reshape(shape)
    mine = jnp.expand_dims(g, axis + 2)  # [..., i, 1, ...]
    other = jnp.expand_dims(g, axis + 1)  # [..., 1, j, ...]
    idx = jnp.arange(m)
    earlier = (idx[None, :] < idx[:, None]).reshape((m, m) + (1,) * (g.ndim - axis - 2))
    rank = jnp.sum((other > mine) | ((other == mine) & earlier), axis=axis + 2)
    return (rank < n).reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("m", "axis"))
def group_counts(x: jax.Array, *, m: int, axis: int) -> jax.Array:
    """Number of nonzeros in every group of ``m`` along ``axis``."""
    xt = jnp.moveaxis(x, axis, -1)
    return jnp.sum(xt.reshape(*xt.shape[:-1], -1, m) != 0, axis=-1)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def transposable_mask(x: jax.Array, *, n: int, m: int) -> jax.Array:
    """Greedy magnitude mask that keeps at most ``n`` per row and per column of every
    ``m x m`` block (so it is N:M along both axes).

    In every block the entries are visited by decreasing magnitude (ties: row-major
    order) and an entry is kept while its row and its column hold fewer than ``n``
    kept entries (the greedy rule of NVIDIA ASP's ``m4n2_2d_greedy``). Greedy can get
    stuck with fewer than ``n`` in a row or column; it never keeps more.
    """
    rows, cols = x.shape
    blocks = x.reshape(rows // m, m, cols // m, m).transpose(0, 2, 1, 3).reshape(-1, m * m)
    order = jnp.argsort(-jnp.abs(blocks), axis=-1, stable=True)
    nb = blocks.shape[0]

    def step(carry, flat):
        row_count, col_count, keep = carry
        r, c = flat // m, flat % m
        ok = (jnp.take_along_axis(row_count, r[:, None], 1)[:, 0] < n) & (
            jnp.take_along_axis(col_count, c[:, None], 1)[:, 0] < n
        )
        hit_r = (jnp.arange(m) == r[:, None]) & ok[:, None]
        hit_c = (jnp.arange(m) == c[:, None]) & ok[:, None]
        keep = keep | ((jnp.arange(m * m) == flat[:, None]) & ok[:, None])
        return (row_count + hit_r, col_count + hit_c, keep), None

    init = (
        jnp.zeros((nb, m), jnp.int32),
        jnp.zeros((nb, m), jnp.int32),
        jnp.zeros((nb, m * m), bool),
    )
    (_, _, keep), _ = lax.scan(step, init, order.T)
    return keep.reshape(rows // m, cols // m, m, m).transpose(0, 2, 1, 3).reshape(rows, cols)
