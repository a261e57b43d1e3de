"""The sparse products of entrywise formats and their derivatives, defined once.

A format whose stored values are matrix entries (BCSR, N:M) describes one
implementation by a :class:`ProductKernels` bundle of two array-level kernels:

* ``spmm(values, pattern, x, *, config, transpose)``: ``op(A) @ x`` for a 2-D ``x``,
  ``op(A) = A.T`` when ``transpose``; accumulated in float32, in ``x``'s dtype;
* ``sample(u, v, pattern, *, config)``: ``u @ v.T`` at ``A``'s stored positions, in
  the shape of ``values`` (an SDDMM).

``pattern`` is the format's tuple (or NamedTuple) of index arrays, ``config`` its
hashable static description (shape, block shape, n:m ...). :func:`spmm` and
:func:`sample` add the derivatives, the same for every format and implementation:
``Y = op(A) @ X`` gives ``dX = op(A).T @ dY`` (the same kernel, ``transpose``
flipped) and ``dA = dY @ X.T`` sampled at A's pattern; the sample's derivatives are
two products with the cotangent as values. Both stay sparse.

This module is the one place where sparse products meet autodiff: giving them
forward-mode rules changes this file, not the formats.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any

import jax

__all__ = ["ProductKernels", "sample", "spmm"]


@dataclasses.dataclass(frozen=True)
class ProductKernels:
    """The array-level kernels of one implementation of an entrywise format.

    Hashable and static (it is a ``nondiff_argnums`` argument of the custom VJPs).

    Attributes:
      spmm: ``spmm(values, pattern, x, *, config, transpose) -> op(A) @ x``.
      sample: ``sample(u, v, pattern, *, config) -> values``: ``u @ v.T`` at the
        stored positions.

    Example:
      A diagonal matrix (``values`` is its diagonal, no index arrays) as a bundle;
      :func:`spmm` then gives its product sparse derivatives:

      >>> import jax, jax.numpy as jnp
      >>> from jsparse.core.product import ProductKernels, spmm
      >>> diag = ProductKernels(
      ...     spmm=lambda d, pattern, x, *, config, transpose: d[:, None] * x,
      ...     sample=lambda u, v, pattern, *, config: jnp.sum(u * v, axis=1))
      >>> d, x = jnp.array([1.0, 2.0]), jnp.ones((2, 3))
      >>> spmm(diag, None, False, d, (), x)[:, 0].tolist()
      [1.0, 2.0]
      >>> jax.grad(lambda d: spmm(diag, None, False, d, (), x).sum())(d).tolist()
      [3.0, 3.0]
    """

    spmm: Callable[..., jax.Array]
    sample: Callable[..., Any]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def spmm(
    kernels: ProductKernels, config: Hashable, transpose: bool, values, pattern, x: jax.Array
) -> jax.Array:
    """``op(A) @ x`` through ``kernels``, with sparse reverse-mode derivatives.

    ``dx = op(A).T @ dy`` (the same kernel, ``transpose`` flipped) and
    ``dvalues = dy @ x.T`` sampled at the pattern: neither densifies ``A``.

    Args:
      kernels: the format's bundle of one implementation.
      config: its static configuration (hashable).
      transpose: multiply by ``A.T``.
      values: the stored values (differentiable).
      pattern: the index arrays (not differentiated).
      x: dense 2-D operand.

    Returns:
      ``op(A) @ x`` in ``x.dtype``.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> from jsparse.formats.bcsr.xla import XLA_KERNELS
      >>> a = jsparse.BCSR.random(jax.random.key(0), (8, 8), density=0.5, block_shape=(2, 2))
      >>> y = spmm(XLA_KERNELS, a.kernel_config, False, a.data, a.pattern, jnp.ones((8, 3)))
      >>> bool(jnp.allclose(y, a.todense() @ jnp.ones((8, 3))))
      True
    """
    return kernels.spmm(values, pattern, x, config=config, transpose=transpose)


def _spmm_fwd(kernels, config, transpose, values, pattern, x):
    return spmm(kernels, config, transpose, values, pattern, x), (values, pattern, x)


def _spmm_bwd(kernels, config, transpose, residuals, dy):
    values, pattern, x = residuals
    dx = kernels.spmm(values, pattern, dy, config=config, transpose=not transpose)
    u, v = (x, dy) if transpose else (dy, x)
    dvalues = kernels.sample(u, v, pattern, config=config)
    return dvalues.astype(values.dtype), None, dx.astype(x.dtype)


spmm.defvjp(_spmm_fwd, _spmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def sample(kernels: ProductKernels, config: Hashable, pattern, u: jax.Array, v: jax.Array):
    """``u @ v.T`` at the stored positions of ``pattern`` (values-shaped), with sparse
    reverse-mode derivatives.

    Args:
      kernels: the format's bundle of one implementation.
      config: its static configuration (hashable).
      pattern: the format's index arrays.
      u: dense ``(M, J)``; v: dense ``(K, J)`` (the right factor, transposed).

    Returns:
      An array shaped like the format's values.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> from jsparse.formats.bcsr.xla import XLA_KERNELS
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> blocks = sample(XLA_KERNELS, a.kernel_config, a.pattern, jnp.ones((4, 3)),
      ...                 jnp.ones((4, 3)))
      >>> blocks.shape, float(blocks[0, 0, 0])
      ((2, 2, 2), 3.0)
    """
    return kernels.sample(u, v, pattern, config=config)


def _sample_fwd(kernels, config, pattern, u, v):
    return sample(kernels, config, pattern, u, v), (pattern, u, v)


def _sample_bwd(kernels, config, residuals, g):
    pattern, u, v = residuals
    # out = (u @ v.T) at the pattern  =>  du = G @ v and dv = G.T @ u, G holding g.
    du = kernels.spmm(g, pattern, v, config=config, transpose=False)
    dv = kernels.spmm(g, pattern, u, config=config, transpose=True)
    return None, du.astype(u.dtype), dv.astype(v.dtype)


sample.defvjp(_sample_fwd, _sample_bwd)
