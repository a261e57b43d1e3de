"""Monarch factors as arrays: the dense matrix of two factors, and the projection of
a dense matrix onto the nearest factors (closed form).

Conventions (see ``docs/monarch.md``): ``nb`` blocks, the dense matrix ``M`` has shape
``(m, n) = (nb * s, nb * p)`` and the middle dimension is ``q = nb * g``:

* ``right`` (applied first): ``(nb, q, p)``, block ``k`` maps input block ``k``
  (``p`` entries) to ``q`` middle entries ordered ``(l, e)``, ``l < nb``, ``e < g``.
* ``left`` (applied second): ``(nb, s, q)``, block ``l`` maps the middle entries
  ``(k, e)`` gathered from every input block to output block ``l``.

so that ``M[l*s + u, k*p + t] = sum_e left[l, u, k*g + e] * right[k, l*g + e, t]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.core.linalg import thin_svd

__all__ = ["acc_dtype", "factor_sizes", "project", "todense"]


def acc_dtype(*dtypes):
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def factor_sizes(left: jax.Array, right: jax.Array) -> tuple[int, int, int, int, int]:
    nb, q, p = right.shape
    s = left.shape[1]
    return nb, s, q, p, q // nb


def todense(left: jax.Array, right: jax.Array, *, out_dtype=None) -> jax.Array:
    """The dense ``(nb * s, nb * p)`` matrix of the factors."""
    nb, s, q, p, g = factor_sizes(left, right)
    acc = acc_dtype(left.dtype, right.dtype)
    # Both operands contract their minor axis e with batch axes (l, k) leading: the
    # transposed Monarch then runs the same dot with the operands swapped, so
    # ``M.T.todense()`` equals ``M.todense().T`` bit for bit.
    a = left.reshape(nb, s, nb, g).transpose(0, 2, 1, 3)  # [l, k, u, e]
    b = right.reshape(nb, nb, g, p).transpose(1, 0, 3, 2)  # [l, k, t, e]
    dense = jax.lax.dot_general(
        a, b, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=acc
    ).transpose(0, 2, 1, 3)  # [l, u, k, t]
    return dense.reshape(nb * s, nb * p).astype(out_dtype or left.dtype)


def project(a: jax.Array, *, nblocks: int, block_rank: int) -> tuple[jax.Array, jax.Array]:
    """The Frobenius-nearest Monarch factors ``(left, right)`` of a dense ``a``.

    Each of the ``nblocks**2`` sub-blocks ``a[l*s:(l+1)*s, k*p:(k+1)*p]`` is replaced
    by its best rank-``block_rank`` approximation (a batched truncated SVD), split
    evenly between the factors (``sqrt`` of the singular values on each side). Ranks
    above ``min(s, p)`` are padded with zero factors.
    """
    m, n = a.shape
    nb, g = nblocks, block_rank
    s, p = m // nb, n // nb
    acc = acc_dtype(a.dtype)
    blocks = a.astype(acc).reshape(nb, s, nb, p).transpose(0, 2, 1, 3)  # [l, k, u, t]
    u, sv, vt = thin_svd(blocks)
    kept = min(g, sv.shape[-1])
    root = jnp.sqrt(sv[..., :kept])
    us = u[..., :kept] * root[..., None, :]  # [l, k, u, e]
    vs = vt[..., :kept, :] * root[..., :, None]  # [l, k, e, t]
    if kept < g:
        us = jnp.pad(us, [(0, 0)] * 3 + [(0, g - kept)])
        vs = jnp.pad(vs, [(0, 0)] * 2 + [(0, g - kept), (0, 0)])
    left = us.transpose(0, 2, 1, 3).reshape(nb, s, nb * g)  # [l, u, (k, e)]
    right = vs.transpose(1, 0, 2, 3).reshape(nb, nb * g, p)  # [k, (l, e), t]
    return left.astype(a.dtype), right.astype(a.dtype)
