"""Monarch's ``"xla"`` implementation: the factored product in plain ``jnp``.

JAX differentiates it directly (einsums and reshapes), forward and reverse.
Conventions: :mod:`jsparse.formats.monarch.factors`. Every function accumulates in at
least float32 and returns ``out_dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.core.registry import register_impl
from jsparse.formats.monarch.factors import acc_dtype, factor_sizes
from jsparse.formats.monarch.matrix import Monarch

__all__ = ["matmul", "rmatmul"]

# Up to this many blocks, one 2-D dot per block (unrolled) beats a batched dot_general
# plus transposes on CPU (measured in docs/monarch.md); above, the batched form wins
# and keeps the program small.
_UNROLL_MAX_BLOCKS = 16


def matmul(left: jax.Array, right: jax.Array, x: jax.Array, *, out_dtype=None) -> jax.Array:
    """``M @ x`` for a 2-D ``x`` of shape ``(nb * p, N)``."""
    nb, s, q, p, g = factor_sizes(left, right)
    n_cols = x.shape[1]
    acc = acc_dtype(left.dtype, right.dtype, x.dtype)
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
    nb, s, q, p, g = factor_sizes(left, right)
    n_rows = x.shape[0]
    acc = acc_dtype(left.dtype, right.dtype, x.dtype)
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


@register_impl("matmul", Monarch, "xla")
def _matmul(a: Monarch, x: jax.Array, *, transpose: bool) -> jax.Array:
    if transpose:  # A.T @ x = (x.T @ A).T; the transposes cancel for x @ A.
        return rmatmul(a.left, a.right, x.T).T
    return matmul(a.left, a.right, x)


@register_impl("scale", Monarch, "xla")
def _scale(a: Monarch, s: jax.Array) -> Monarch:
    dtype = jnp.result_type(a.left, s)
    return a._replace(left=(a.left * s).astype(dtype), right=a.right.astype(dtype))
