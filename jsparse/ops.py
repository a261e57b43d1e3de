"""Generic operations on jsparse formats.

Each public function validates its arguments, then dispatches on the format
through a :func:`functools.singledispatch` hook, so a new format plugs in by
registering the hooks it supports::

    @jsparse.ops.sparse_dense_matmul.register
    def _(a: MyFormat, x, *, impl): ...
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jsparse._base import AbstractSparseMatrix, _is_concrete
from jsparse._dispatch import AutoOrder, check_impl, run

__all__ = [
    "add",
    "add_entries",
    "map_entries",
    "same_indices",
    "scale_entries",
    "dense_sparse_matmul",
    "map_values",
    "matmul",
    "scale",
    "sddmm",
    "sparse_dense_matmul",
    "todense",
    "transpose",
]


def _unsupported(name: str, *objs) -> NotImplementedError:
    types = ", ".join(type(o).__name__ for o in objs)
    return NotImplementedError(f"jsparse.{name} is not implemented for {types}")


# ------------------------------------------------------------ format hooks
@functools.singledispatch
def sparse_dense_matmul(a, x: jax.Array, *, impl: str) -> jax.Array:
    """Hook: ``a @ x`` for a 2-D dense ``x`` of shape ``(a.shape[1], N)``."""
    raise _unsupported("matmul", a)


@functools.singledispatch
def dense_sparse_matmul(a, x: jax.Array, *, impl: str) -> jax.Array:
    """Hook: ``x @ a`` for a 2-D dense ``x`` of shape ``(P, a.shape[0])``.

    Note the argument order: the sparse operand comes first, for dispatch.
    """
    raise _unsupported("matmul", a)


def register_matmul(fmt: type, auto_order: Callable[..., AutoOrder]) -> None:
    """Route both matmul hooks of ``fmt`` through the registry's ``"matmul"`` kernels.

    ``auto_order(a)`` gives the ``impl="auto"`` candidates for ``a``. ``x @ A`` is run
    as ``(A.T @ x.T).T`` with ``transpose=True``, so no kernel forms ``A.T``.
    """

    @sparse_dense_matmul.register(fmt)
    def _(a, x, *, impl):
        return run("matmul", fmt, impl, auto_order(a), a, x, transpose=False)

    @dense_sparse_matmul.register(fmt)
    def _(a, x, *, impl):
        return run("matmul", fmt, impl, auto_order(a), a, x.T, transpose=True).T


@functools.singledispatch
def _sddmm(pattern, x: jax.Array, y: jax.Array):
    raise _unsupported("sddmm", pattern)


@functools.singledispatch
def _scale(a, s):
    raise _unsupported("scale", a)


@functools.singledispatch
def _map_values(a, fn):
    raise _unsupported("map_values", a)


@functools.singledispatch
def _add(a, b):
    raise _unsupported("add", a, b)


# ------------------------------------------------------------ public API
def todense(a) -> jax.Array:
    """The dense array of a format (dense arrays are returned unchanged)."""
    if isinstance(a, AbstractSparseMatrix):
        return a.todense()
    return jnp.asarray(a)


def transpose(a):
    """The transpose of a format (dense arrays: ``a.T``)."""
    if isinstance(a, AbstractSparseMatrix):
        return a.transpose()
    return jnp.asarray(a).T


def _promote(a: AbstractSparseMatrix, x) -> tuple[AbstractSparseMatrix, jax.Array]:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
            x = x.astype(a.dtype)
        else:
            raise TypeError(f"the dense operand must be real floating point, got {x.dtype}")
    dtype = jnp.result_type(a.dtype, x.dtype)
    if a.dtype != dtype:
        a = a.astype(dtype)
    return a, x.astype(dtype)


def matmul(a, b, *, impl: str = "auto") -> jax.Array:
    """Matrix product with a sparse operand on either side; the other is dense.

    ``a @ b`` follows :func:`jax.numpy.matmul` for the dense operand: a vector
    (contracted and removed) or an array whose trailing two axes are the matrix
    (leading axes are batch axes, on the dense side only).

    Args:
      a, b: one jsparse format (2-D) and one dense array (``jax.Array`` or array-like).
      impl: ``"auto"`` (by platform and density), ``"xla"``, ``"dense"`` or ``"pallas"``.

    Returns:
      A dense array in the promoted dtype of the operands (accumulated in float32).

    Raises:
      ValueError: the contraction dimensions differ (the message names both shapes).
      TypeError: both or neither operand is sparse in a way not supported, or the
        dense operand is not real floating point.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.random(jax.random.key(0), (64, 32), density=0.25,
      ...                         block_shape=(16, 16))
      >>> (a @ jnp.ones((32, 3))).shape
      (64, 3)
    """
    check_impl(impl)
    a_sparse = isinstance(a, AbstractSparseMatrix)
    b_sparse = isinstance(b, AbstractSparseMatrix)
    if a_sparse and b_sparse:
        raise TypeError(
            f"sparse @ sparse is not supported ({type(a).__name__} {a.shape} @ "
            f"{type(b).__name__} {b.shape}); call .todense() on one operand"
        )
    if not (a_sparse or b_sparse):
        return jnp.matmul(a, b)
    if a_sparse:
        a, b = _promote(a, b)
        return _sparse_at_dense(a, b, impl)
    b, a = _promote(b, a)
    return _dense_at_sparse(a, b, impl)


def _sparse_at_dense(a: AbstractSparseMatrix, x: jax.Array, impl: str) -> jax.Array:
    m, k = a.shape
    if x.ndim == 0:
        raise ValueError("matmul: the dense operand must have at least 1 dimension")
    contracted = x.shape[0] if x.ndim == 1 else x.shape[-2]
    if contracted != k:
        raise ValueError(
            f"matmul: shapes {a.shape} and {x.shape} are not aligned ({k} != {contracted})"
        )
    if x.ndim == 1:
        return sparse_dense_matmul(a, x[:, None], impl=impl)[:, 0]
    if x.ndim == 2:
        return sparse_dense_matmul(a, x, impl=impl)
    batch, n = x.shape[:-2], x.shape[-1]
    x2 = jnp.moveaxis(x, -2, 0).reshape(k, -1)
    y = sparse_dense_matmul(a, x2, impl=impl).reshape(m, *batch, n)
    return jnp.moveaxis(y, 0, -2)


def _dense_at_sparse(x: jax.Array, a: AbstractSparseMatrix, impl: str) -> jax.Array:
    m, k = a.shape
    if x.ndim == 0:
        raise ValueError("matmul: the dense operand must have at least 1 dimension")
    if x.shape[-1] != m:
        raise ValueError(
            f"matmul: shapes {x.shape} and {a.shape} are not aligned ({x.shape[-1]} != {m})"
        )
    lead = x.shape[:-1]
    y = dense_sparse_matmul(a, x.reshape(-1, m), impl=impl)
    return y.reshape(*lead, k)


def sddmm(x, y, pattern):
    """Sampled dense-dense matmul: ``x @ y`` evaluated only where ``pattern`` stores.

    Args:
      x: dense ``(M, J)``.
      y: dense ``(J, K)``.
      pattern: a format of shape ``(M, K)`` whose structure is kept (its values are
        ignored).

    Returns:
      A matrix in ``pattern``'s format and structure holding ``(x @ y)`` at the
      stored positions. Differentiable with respect to ``x`` and ``y``.
    """
    if not isinstance(pattern, AbstractSparseMatrix):
        raise TypeError(f"sddmm: pattern must be a jsparse format, got {type(pattern).__name__}")
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"sddmm: x and y must be 2-D, got shapes {x.shape} and {y.shape}")
    if x.shape[1] != y.shape[0] or (x.shape[0], y.shape[1]) != tuple(pattern.shape):
        raise ValueError(
            f"sddmm: x {x.shape} @ y {y.shape} does not match the pattern's shape "
            f"{tuple(pattern.shape)}"
        )
    for name, arr in (("x", x), ("y", y)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"sddmm: {name} must be real floating point, got {arr.dtype}")
    dtype = jnp.result_type(x.dtype, y.dtype)
    return _sddmm(pattern, x.astype(dtype), y.astype(dtype))


def scale(a, s):
    """``s * a`` for a scalar ``s``, in ``a``'s format.

    Raises:
      TypeError: ``s`` is not a scalar.
    """
    s = jnp.asarray(s)
    if s.ndim != 0:
        raise TypeError(f"{type(a).__name__} can only be scaled by a scalar, got shape {s.shape}")
    return _scale(a, s)


def map_values(fn: Callable[[jax.Array], jax.Array], a):
    """Apply a zero-preserving elementwise ``fn`` to the stored values of ``a``.

    ``fn(0)`` must be ``0`` (e.g. ``jnp.abs``, ``jnp.sin``, ``jax.nn.relu``), so that
    the result equals ``fn`` applied to the dense matrix. This is checked when
    ``fn`` can be evaluated on a concrete zero.

    Raises:
      ValueError: ``fn(0) != 0``.
    """
    _check_zero_preserving(fn, a.dtype)
    return _map_values(a, fn)


def _check_zero_preserving(fn, dtype) -> None:
    try:
        with jax.ensure_compile_time_eval():
            zero = np.asarray(fn(jnp.zeros((), dtype)))
    except jax.errors.JAXTypeError:
        return  # fn closes over tracers: cannot check eagerly
    if zero.shape != () or zero != 0:
        raise ValueError(f"map_values needs a zero-preserving function, but fn(0) = {zero!r}")


def add(a, b):
    """Sum of two matrices of the same format and the same stored pattern."""
    if type(a) is not type(b):
        raise TypeError(
            f"add: both operands must have the same format, got "
            f"{type(a).__name__} and {type(b).__name__}"
        )
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"add: shapes differ: {a.shape} and {b.shape}")
    return _add(a, b)


# ------------------------------------------------------------ entrywise formats
# Formats whose value leaves *are* matrix entries (BCSR, NM) share these hook
# implementations: scaling, zero-preserving maps and same-pattern sums act on the
# value leaves and keep the index leaves.
def _index_fields(a: AbstractSparseMatrix) -> list[str]:
    return [f for f in a._leaf_fields if f not in a._value_fields]


def same_indices(a: AbstractSparseMatrix, b: AbstractSparseMatrix) -> bool:
    """Whether ``a`` and ``b`` hold the same index leaves: the same arrays, or equal
    concrete arrays. Traced arrays that are not the same objects cannot be compared,
    so they count as different."""
    pairs = [(getattr(a, f), getattr(b, f)) for f in _index_fields(a)]
    if all(x is y for x, y in pairs):
        return True
    if all(_is_concrete(x) and _is_concrete(y) for x, y in pairs):
        return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)
    return False


def scale_entries(a: AbstractSparseMatrix, s: jax.Array):
    """``_scale`` hook for entrywise formats: every value leaf times the scalar ``s``."""
    return a._replace(
        **{
            f: (getattr(a, f) * s).astype(jnp.result_type(getattr(a, f), s))
            for f in a._value_fields
        }
    )


def map_entries(a: AbstractSparseMatrix, fn):
    """``_map_values`` hook for entrywise formats: ``fn`` on every value leaf."""
    return a._replace(**{f: fn(getattr(a, f)) for f in a._value_fields})


def add_entries(a: AbstractSparseMatrix, b: AbstractSparseMatrix):
    """Sum of the value leaves of two entrywise matrices known to share a pattern."""
    return a._replace(**{f: getattr(a, f) + getattr(b, f) for f in a._value_fields})
