"""Monarch kernels in plain ``jnp``: arrays in, arrays out (no formats, no autodiff rules).

Conventions (see ``docs/monarch.md``): ``nb`` blocks, the dense matrix ``M`` has shape
``(m, n) = (nb * s, nb * p)`` and the middle dimension is ``nb * q`` with
``q = nb * g``:

* ``r`` (right factor, applied first): ``(nb, q, p)``, block ``k`` maps input block
  ``k`` (``p`` entries) to ``q`` middle entries ordered ``(l, e)``, ``l < nb``, ``e < g``.
* ``l`` (left factor, applied second): ``(nb, s, q)``, block ``l`` maps the middle
  entries ``(k, e)`` gathered from every input block to output block ``l``.

so that ``M[l*s + u, k*p + t] = sum_e l[l, u, k*g + e] * r[k, l*g + e, t]``.

Every function accumulates in at least float32 and returns ``out_dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["matmul", "project", "rmatmul", "svd", "todense"]

# Up to this many blocks, one 2-D dot per block (unrolled) beats a batched dot_general
# plus transposes on CPU (measured in docs/monarch.md); above, the batched form wins
# and keeps the program small.
_UNROLL_MAX_BLOCKS = 16


def _acc_dtype(*dtypes):
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _sizes(left: jax.Array, right: jax.Array) -> tuple[int, int, int, int, int]:
    nb, q, p = right.shape
    s = left.shape[1]
    return nb, s, q, p, q // nb


def todense(left: jax.Array, right: jax.Array, *, out_dtype=None) -> jax.Array:
    """The dense ``(nb * s, nb * p)`` matrix of the factors."""
    nb, s, q, p, g = _sizes(left, right)
    acc = _acc_dtype(left.dtype, right.dtype)
    # Both operands contract their minor axis e with batch axes (l, k) leading: the
    # transposed Monarch then runs the same dot with the operands swapped, so
    # ``M.T.todense()`` equals ``M.todense().T`` bit for bit.
    a = left.reshape(nb, s, nb, g).transpose(0, 2, 1, 3)  # [l, k, u, e]
    b = right.reshape(nb, nb, g, p).transpose(1, 0, 3, 2)  # [l, k, t, e]
    dense = jax.lax.dot_general(
        a, b, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=acc
    ).transpose(0, 2, 1, 3)  # [l, u, k, t]
    return dense.reshape(nb * s, nb * p).astype(out_dtype or left.dtype)


def matmul(left: jax.Array, right: jax.Array, x: jax.Array, *, out_dtype=None) -> jax.Array:
    """``M @ x`` for a 2-D ``x`` of shape ``(nb * p, N)``."""
    nb, s, q, p, g = _sizes(left, right)
    n_cols = x.shape[1]
    acc = _acc_dtype(left.dtype, right.dtype, x.dtype)
    out_dtype = out_dtype or x.dtype
    if nb <= _UNROLL_MAX_BLOCKS:
        # stage 1: z_k = R_k @ x_k, rows ordered (l, e); stage 2: y_l = L_l @ [z_k[l] for k].
        z = [
            jnp.matmul(right[k], x[k * p : (k + 1) * p], preferred_element_type=acc)
            for k in range(nb)
        ]
        ys = [
            jnp.matmul(
                left[i],
                jnp.concatenate([zk[i * g : (i + 1) * g] for zk in z], axis=0),
                preferred_element_type=acc,
            )
            for i in range(nb)
        ]
        return jnp.concatenate(ys, axis=0).astype(out_dtype)
    z = jnp.einsum("kat,ktN->kaN", right, x.reshape(nb, p, n_cols), preferred_element_type=acc)
    z = z.reshape(nb, nb, g, n_cols).transpose(1, 0, 2, 3).reshape(nb, q, n_cols)
    y = jnp.einsum("luc,lcN->luN", left, z, preferred_element_type=acc)
    return y.reshape(nb * s, n_cols).astype(out_dtype)


def rmatmul(left: jax.Array, right: jax.Array, x: jax.Array, *, out_dtype=None) -> jax.Array:
    """``x @ M`` for a 2-D ``x`` of shape ``(P, nb * s)``."""
    nb, s, q, p, g = _sizes(left, right)
    n_rows = x.shape[0]
    acc = _acc_dtype(left.dtype, right.dtype, x.dtype)
    out_dtype = out_dtype or x.dtype
    if nb <= _UNROLL_MAX_BLOCKS:
        # stage 1: w_l = x_l @ L_l, columns ordered (k, e); stage 2: y_k = [w_l[k] for l] @ R_k.
        w = [
            jnp.matmul(x[:, i * s : (i + 1) * s], left[i], preferred_element_type=acc)
            for i in range(nb)
        ]
        ys = [
            jnp.matmul(
                jnp.concatenate([wl[:, k * g : (k + 1) * g] for wl in w], axis=1),
                right[k],
                preferred_element_type=acc,
            )
            for k in range(nb)
        ]
        return jnp.concatenate(ys, axis=1).astype(out_dtype)
    xs = x.reshape(n_rows, nb, s).transpose(1, 0, 2)
    w = jnp.einsum("lPu,luc->lPc", xs, left, preferred_element_type=acc)
    w = w.reshape(nb, n_rows, nb, g).transpose(2, 1, 0, 3).reshape(nb, n_rows, q)
    y = jnp.einsum("kPa,kat->kPt", w, right, preferred_element_type=acc)
    return y.transpose(1, 0, 2).reshape(n_rows, nb * p).astype(out_dtype)


def svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``(u, s, vt)`` of a (batch of) matrices (LAPACK's default driver on CPU).

    One place to swap the SVD (e.g. a randomized one for large blocks). Note: on a
    heavily loaded CPU, OpenBLAS threading can slow LAPACK SVDs by 10x or more;
    ``OPENBLAS_NUM_THREADS=1`` avoids it.
    """
    return jnp.linalg.svd(x, full_matrices=False)


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
    acc = _acc_dtype(a.dtype)
    blocks = a.astype(acc).reshape(nb, s, nb, p).transpose(0, 2, 1, 3)  # [l, k, u, t]
    u, sv, vt = svd(blocks)
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
