"""Implementations every format inherits (registered once, on the base class).

* ``todense`` and ``transpose``, ``"xla"``: the format's own methods.
* ``matmul``, ``"dense"``: densify, then one dense ``dot`` accumulated in float32 —
  the honest choice for patterns dense enough that a sparse kernel would lose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.core.matrix import AbstractSparseMatrix
from jsparse.core.registry import register_impl

__all__ = ["dense_matmul"]


@register_impl("matmul", AbstractSparseMatrix, "dense")
def dense_matmul(a: AbstractSparseMatrix, x: jax.Array, *, transpose: bool) -> jax.Array:
    """``op(a) @ x`` through ``a.todense()`` (``op(a) = a.T`` when ``transpose``)."""
    w = a.todense()
    w = w.T if transpose else w
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.matmul(w, x, preferred_element_type=acc).astype(x.dtype)


register_impl("todense", AbstractSparseMatrix, "xla", lambda a: a.todense())
register_impl("transpose", AbstractSparseMatrix, "xla", lambda a: a.transpose())
