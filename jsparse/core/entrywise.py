"""Entrywise verbs for formats whose stored values *are* matrix entries (BCSR, N:M).

Scaling, zero-preserving maps and same-pattern sums act on the value leaves and keep
the index leaves; :func:`register_entrywise` registers them as a format's ``"xla"``
implementations of ``scale``, ``map_values`` and ``add`` in one call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.core.checks import is_concrete
from jsparse.core.matrix import AbstractSparseMatrix
from jsparse.core.registry import register_impl

__all__ = ["register_entrywise", "same_pattern"]


def same_pattern(a: AbstractSparseMatrix, b: AbstractSparseMatrix) -> bool:
    """Whether ``a`` and ``b`` have the same static fields and index leaves: the same
    arrays, or equal concrete arrays. Traced arrays that are not the same objects
    cannot be compared, so they count as different.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> b = jsparse.BCSR.fromdense(2 * jnp.eye(4), block_shape=(2, 2))
      >>> c = jsparse.BCSR.fromdense(jnp.ones((4, 4)), block_shape=(2, 2))
      >>> jsparse.extend.same_pattern(a, b), jsparse.extend.same_pattern(a, c)
      (True, False)
    """
    if any(getattr(a, f) != getattr(b, f) for f in a._static_fields):
        return False
    if any(getattr(a, f).shape != getattr(b, f).shape for f in a._value_fields):
        return False
    pairs = [(getattr(a, f), getattr(b, f)) for f in a._index_fields]
    if all(x is y for x, y in pairs):
        return True
    if all(is_concrete(x) and is_concrete(y) for x, y in pairs):
        return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)
    return False


def _scale(a: AbstractSparseMatrix, s: jax.Array):
    new = {}
    for f in a._value_fields:
        v = getattr(a, f)
        new[f] = (v * s).astype(jnp.result_type(v, s))
    return a._replace(**new)


def _map_values(a: AbstractSparseMatrix, fn):
    return a._replace(**{f: fn(getattr(a, f)) for f in a._value_fields})


def _pattern_check(a: AbstractSparseMatrix, b: AbstractSparseMatrix, verb: str):
    """``True`` when ``a`` and ``b`` provably share a pattern; a traced boolean when
    only a run-time comparison of their (traced) index arrays can tell; ValueError
    when they provably differ."""
    if same_pattern(a, b):
        return True
    statics = all(getattr(a, f) == getattr(b, f) for f in a._static_fields)
    shapes = all(getattr(a, f).shape == getattr(b, f).shape for f in a._leaf_fields)
    pairs = [(getattr(a, f), getattr(b, f)) for f in a._index_fields]
    traced = not all(is_concrete(x) and is_concrete(y) for x, y in pairs)
    if statics and shapes and traced:
        return jnp.all(jnp.stack([jnp.all(x == y) for x, y in pairs]))
    raise ValueError(
        f"{verb}: {type(a).__name__} operands must share the same pattern (static fields "
        f"and index arrays); got different ones. Under jit, patterns that are not the "
        f"same arrays are compared when the program runs (a mismatch gives NaN values)."
    )


def _combine(a, b, verb, fn):
    ok = _pattern_check(a, b, verb)
    new = {}
    for f in a._value_fields:
        v = fn(getattr(a, f), getattr(b, f))
        new[f] = v if ok is True else jnp.where(ok, v, jnp.nan).astype(v.dtype)
    return a._replace(**new)


def _add(a: AbstractSparseMatrix, b: AbstractSparseMatrix):
    return _combine(a, b, "add", jnp.add)


def _multiply(a: AbstractSparseMatrix, b, *, gather=None):
    if isinstance(b, AbstractSparseMatrix):
        return _combine(a, b, "multiply", jnp.multiply)
    entries = gather(a, b)  # b's entries at a's stored positions, values-shaped
    (f,) = a._value_fields
    v = getattr(a, f)
    return a._replace(**{f: (v * entries).astype(jnp.result_type(v, entries))})


def register_entrywise(fmt: type, gather=None) -> None:
    """Register the entrywise ``scale``, ``map_values`` and ``add`` (``"xla"``) for ``fmt``.

    For formats whose stored values *are* matrix entries (BCSR, N:M): the three act
    on the value leaves and keep the index leaves; ``add`` needs both operands to
    have the same pattern (:func:`same_pattern`; under ``jit``, index arrays that
    are not the same tracers are compared when the program runs, and a mismatch
    gives NaN values). With ``gather`` it registers ``multiply`` too.

    Args:
      fmt: the format class.
      gather: ``gather(a, dense) -> values``: the entries of a dense array of
        ``a.shape`` at ``a``'s stored positions, shaped like ``a``'s one value leaf.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> class MyBCSR(jsparse.BCSR):  # a stand-in for a new entrywise format
      ...     pass
      >>> jsparse.extend.register_entrywise(MyBCSR)
      >>> a = MyBCSR(jnp.ones((1, 2, 2)), [0], [0, 1], shape=(2, 2))
      >>> (jsparse.scale(a, 2.0) + a).todense()[0].tolist()
      [3.0, 3.0]
    """
    register_impl("scale", fmt, "xla", _scale)
    register_impl("map_values", fmt, "xla", _map_values)
    register_impl("add", fmt, "xla", _add)
    if gather is not None:
        register_impl("multiply", fmt, "xla", functools.partial(_multiply, gather=gather))
