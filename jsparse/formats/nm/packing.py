"""N:M position packing, compression and decompression (arrays in, arrays out).

The :class:`jsparse.NM` leaf stores each kept value's position in ``[0, m)`` bit-packed
(``position_bits(m)`` bits each, little-endian along the last axis); the kernels take
them unpacked (one ``uint8`` per value). Selecting among the ``m`` candidates with a
chain of ``where`` (:func:`select_position`) is an elementwise fusion that vectorises
on XLA:CPU, where gathers and scatters are slow.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "compress",
    "decompress",
    "group_view",
    "pack_positions",
    "packed_length",
    "position_bits",
    "select_position",
    "unpack_positions",
]


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
    p = (p & jnp.uint8((1 << bits) - 1)).reshape(*p.shape[:-1], p.shape[-1] // per, per)
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
    return p.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :length]


def select_position(p: jax.Array, candidates: list[jax.Array]) -> jax.Array:
    """``candidates[p]`` elementwise, as a ``where`` chain (no gather)."""
    out = candidates[-1]
    for j in range(len(candidates) - 2, -1, -1):
        out = jnp.where(p == j, candidates[j], out)
    return out


def group_view(a: jax.Array, axis: int, width: int) -> jax.Array:
    """Split ``axis`` into ``(groups, width)``: ``(R, G, w)`` or ``(G, w, K)``."""
    if axis == 1:
        return a.reshape(a.shape[0], a.shape[1] // width, width)
    return a.reshape(a.shape[0] // width, width, a.shape[1])


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def decompress(values: jax.Array, positions: jax.Array, *, n: int, m: int, axis: int) -> jax.Array:
    """The dense matrix: ``(rows, cols)`` with the grouped ``axis`` expanded by ``m / n``."""
    v = group_view(values, axis, n)
    p = group_view(positions, axis, n)
    # Broadcast every kept slot against the m output positions of its group.
    slot = (lambda a, k: a[:, :, k : k + 1]) if axis == 1 else (lambda a, k: a[:, k : k + 1, :])
    shape = (v.shape[0], v.shape[1] // n * m, v.shape[2]) if axis == 0 else (*v.shape[:2], m)
    j = lax.broadcasted_iota(positions.dtype, shape, 2 if axis == 1 else 1)
    out = jnp.zeros(shape, values.dtype)
    for k in range(n):
        out = jnp.where(slot(p, k) == j, slot(v, k), out)
    if axis == 1:
        return out.reshape(values.shape[0], values.shape[1] // n * m)
    return out.reshape(values.shape[0] // n * m, values.shape[1])


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def compress(x: jax.Array, *, n: int, m: int, axis: int) -> tuple[jax.Array, jax.Array]:
    """Keep the ``n`` entries of largest magnitude in every group of ``m`` along ``axis``.

    Ties go to the lower position (``lax.top_k`` is stable), so the result is
    deterministic; works under ``jit``. Returns ``(values, positions)``.
    """
    xt = jnp.moveaxis(x, axis, -1)
    g = xt.reshape(*xt.shape[:-1], xt.shape[-1] // m, m)
    _, idx = lax.top_k(jnp.abs(g), n)
    idx = jnp.sort(idx, axis=-1)
    vals = jnp.take_along_axis(g, idx, axis=-1)
    shape = (*xt.shape[:-1], xt.shape[-1] // m * n)
    vals = jnp.moveaxis(vals.reshape(shape), -1, axis)
    pos = jnp.moveaxis(idx.astype(jnp.uint8).reshape(shape), -1, axis)
    return vals, pos
