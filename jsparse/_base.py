"""The protocol every sparse or structured format follows.

A format is a frozen dataclass registered as a pytree: arrays (values *and* index
arrays) are leaves, static metadata (shape, block shape, n/m, ...) is aux data.
Derived conveniences (``@``, ``.T``, ``ndim``, ``nbytes`` ...) live here, once.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AbstractSparseMatrix", "register_format"]


class AbstractSparseMatrix(abc.ABC):
    """Base class of every jsparse format (a 2-D matrix stored compactly).

    Subclasses are frozen dataclasses whose array fields are pytree leaves and whose
    remaining fields are static. They implement ``todense``, ``transpose``,
    ``astype`` and ``_validate_concrete``; matmul comes from the generic
    :func:`jsparse.matmul`, which dispatches on the type.
    """

    # Names of the dataclass fields that are arrays (pytree leaves), in order.
    _leaf_fields: ClassVar[tuple[str, ...]] = ()
    # Names of the fields that are static metadata (pytree aux data).
    _static_fields: ClassVar[tuple[str, ...]] = ()
    # Names of the leaves that carry trainable values (float); the rest are indices.
    _value_fields: ClassVar[tuple[str, ...]] = ()

    shape: tuple[int, ...]

    # NumPy operands defer to our reflected operators (``np_array @ sparse``).
    __array_ufunc__ = None

    # ----------------------------------------------------------------- abstract
    @abc.abstractmethod
    def todense(self) -> jax.Array:
        """The dense equivalent, an array of ``self.shape`` and ``self.dtype``."""

    @abc.abstractmethod
    def transpose(self) -> AbstractSparseMatrix:
        """The transposed matrix, in the same family of format where possible."""

    @abc.abstractmethod
    def astype(self, dtype: Any) -> AbstractSparseMatrix:
        """Values cast to ``dtype``; the structure (index arrays) is kept."""

    @abc.abstractmethod
    def _validate_concrete(self) -> None:
        """Check the index arrays (only called when they are concrete)."""

    # ------------------------------------------------------------------ derived
    @property
    def dtype(self) -> np.dtype:
        return getattr(self, self._value_fields[0]).dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of every leaf (values and indices)."""
        return int(sum(_leaf_nbytes(x) for x in jax.tree_util.tree_leaves(self)))

    @property
    def T(self) -> AbstractSparseMatrix:  # noqa: N802 - array convention
        return self.transpose()

    def validate(self) -> AbstractSparseMatrix:
        """Check every invariant of the format; return ``self``.

        Raises:
          ValueError / TypeError naming the offending array when an invariant fails.
          Index checks need concrete arrays; under ``jit`` only static checks run.
        """
        self._validate_static()
        if self._indices_concrete():
            self._validate_concrete()
        return self

    def _validate_static(self) -> None:
        """Shape and dtype checks that work on tracers too. Override to extend."""

    def _indices_concrete(self) -> bool:
        index_fields = [f for f in self._leaf_fields if f not in self._value_fields]
        return all(_is_concrete(getattr(self, f)) for f in index_fields)

    def __matmul__(self, other):
        from jsparse import ops

        return ops.matmul(self, other)

    def __rmatmul__(self, other):
        from jsparse import ops

        return ops.matmul(other, self)

    def __mul__(self, other):
        from jsparse import ops

        return ops.scale(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        from jsparse import ops

        return ops.scale(self, 1 / jnp.asarray(other))

    def __neg__(self):
        from jsparse import ops

        return ops.scale(self, -1)

    def __add__(self, other):
        from jsparse import ops

        return ops.add(self, other)

    def __sub__(self, other):
        from jsparse import ops

        return ops.add(self, -other)

    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            f"{type(self).__name__} cannot be converted to a NumPy array implicitly; "
            "call .todense() first."
        )

    def __repr__(self) -> str:
        static = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._static_fields)
        leaves = ", ".join(f"{f}={_describe(getattr(self, f))}" for f in self._leaf_fields)
        return f"{type(self).__name__}({static}, {leaves})"

    # -------------------------------------------------------------- pytree glue
    def _tree_flatten_with_keys(self):
        children = [(jax.tree_util.GetAttrKey(f), getattr(self, f)) for f in self._leaf_fields]
        aux = tuple(getattr(self, f) for f in self._static_fields)
        return children, aux

    @classmethod
    def _tree_unflatten(cls, aux, children):
        # Bypass __init__ validation: JAX unflattens with tracers, float0
        # cotangents and placeholder objects.
        obj = object.__new__(cls)
        for name, value in zip(cls._leaf_fields, children, strict=True):
            object.__setattr__(obj, name, value)
        for name, value in zip(cls._static_fields, aux, strict=True):
            object.__setattr__(obj, name, value)
        return obj

    def _replace(self, **changes) -> AbstractSparseMatrix:
        """A copy with some fields replaced, without re-validation."""
        fields = {f: getattr(self, f) for f in self._leaf_fields + self._static_fields}
        fields.update(changes)
        aux = tuple(fields[f] for f in self._static_fields)
        return self._tree_unflatten(aux, [fields[f] for f in self._leaf_fields])


def register_format(cls):
    """Class decorator: register a format dataclass as a pytree with key paths."""
    names = {f.name for f in dataclasses.fields(cls)}
    missing = (set(cls._leaf_fields) | set(cls._static_fields)) - names
    if missing:
        raise TypeError(f"{cls.__name__} declares unknown fields {sorted(missing)}")
    jax.tree_util.register_pytree_with_keys(
        cls,
        cls._tree_flatten_with_keys,
        cls._tree_unflatten,
        flatten_func=lambda obj: (
            [getattr(obj, f) for f in cls._leaf_fields],
            tuple(getattr(obj, f) for f in cls._static_fields),
        ),
    )
    return cls


# ------------------------------------------------------------------- helpers
def _is_concrete(x) -> bool:
    if isinstance(x, np.ndarray | np.generic):
        return True
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, jax.Array) and x.is_fully_addressable


def _is_float0(x) -> bool:
    return getattr(x, "dtype", None) == jax.dtypes.float0


def _leaf_nbytes(x) -> int:
    if _is_float0(x):
        return 0
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def _describe(x) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}" if hasattr(x, "shape") else repr(x)


def check_float_dtype(name: str, dtype) -> None:
    """TypeError unless ``dtype`` is an inexact (floating or complex) dtype or float0."""
    if dtype == jax.dtypes.float0:
        return
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"{name} must have a floating-point dtype, got {jnp.dtype(dtype).name}")


def check_index_dtype(name: str, dtype) -> None:
    """TypeError unless ``dtype`` is an integer dtype (or float0, for cotangents)."""
    if dtype == jax.dtypes.float0:
        return
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {jnp.dtype(dtype).name}")


def as_shape(shape: Sequence[int], name: str = "shape") -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as e:
        raise TypeError(f"{name} must be a sequence of ints, got {shape!r}") from e
    if any(s < 0 for s in out):
        raise ValueError(f"{name} must be non-negative, got {out}")
    return out
