"""Implementations every format inherits (registered once, on the base class).

* ``todense`` and ``transpose``, ``"xla"``: the format's own methods.
* ``matmul``, ``"dense"``: densify, then one dense ``dot`` accumulated in float32 —
  the honest choice for patterns dense enough that a sparse kernel would lose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.core import product
from jsparse.core.matrix import AbstractSparseMatrix
from jsparse.core.nonfinite import stored_mask, stored_only
from jsparse.core.product import ProductKernels
from jsparse.core.registry import register_impl

__all__ = ["dense_matmul"]


def _dense_spmm(w, skeleton, x, *, config, transpose):
    acc = jnp.promote_types(x.dtype, jnp.float32)
    w = w.T if transpose else w

    def dense():  # built only when x is not finite
        zeros = {f: jnp.zeros(shape, dtype) for f, shape, dtype in config}
        mask = stored_mask(skeleton._replace(**zeros))
        return w, (mask.T if transpose else mask)

    def product(x):
        return jnp.matmul(w, x, preferred_element_type=acc).astype(x.dtype)

    return stored_only(product, dense, x)


def _dense_sample(u, v, skeleton, *, config):
    del skeleton, config  # the dense gradient; todense's own VJP keeps the stored entries
    acc = jnp.promote_types(u.dtype, jnp.float32)
    return jnp.matmul(u, v.T, preferred_element_type=acc).astype(u.dtype)


# The dense product as a bundle of the shared sparse-product primitive: "values" is
# ``a.todense()`` (differentiable in the format's values through ``todense``), the
# "pattern" the format with its value leaves removed (for the stored mask only), so
# that the dense implementation is linear in ``x`` for ``jax.linear_transpose`` and
# ``jvp`` too (the non-finite correction's ``lax.cond`` reads ``x``, which JAX cannot
# transpose through; the primitive's transpose rule does it instead).
DENSE_KERNELS = ProductKernels(spmm=_dense_spmm, sample=_dense_sample)


@register_impl("matmul", AbstractSparseMatrix, "dense")
def dense_matmul(a: AbstractSparseMatrix, x: jax.Array, *, transpose: bool) -> jax.Array:
    """``op(a) @ x`` through ``a.todense()`` (``op(a) = a.T`` when ``transpose``).

    Non-finite entries of ``x`` count through the stored entries only, as in every
    sparse kernel (:func:`jsparse.core.nonfinite.stored_only`). A linear primitive in
    ``x`` and ``a.todense()`` (:func:`jsparse.core.product.spmm`), so every JAX
    transformation applies.

    Args:
      a: any format.
      x: dense 2-D operand.
      transpose: multiply by ``a.T``.

    Returns:
      ``op(a) @ x`` in ``x.dtype`` (accumulated in float32).

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(2), block_shape=(1, 1))
      >>> dense_matmul(a, jnp.ones((2, 1)), transpose=False)[:, 0].tolist()
      [1.0, 1.0]
    """
    fields = a._value_fields
    config = tuple((f, getattr(a, f).shape, jnp.dtype(getattr(a, f).dtype)) for f in fields)
    skeleton = a._replace(**{f: None for f in fields})
    return product.spmm(DENSE_KERNELS, config, transpose, a.todense(), skeleton, x)


register_impl("todense", AbstractSparseMatrix, "xla", lambda a: a.todense())
register_impl("transpose", AbstractSparseMatrix, "xla", lambda a: a.transpose())
