"""Validation and coercion helpers shared by every format (and by format authors).

Each raises a ``TypeError`` or ``ValueError`` whose message names the offending
argument, its value and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "as_index_leaf",
    "as_leaf",
    "as_shape",
    "check_block_shape",
    "check_float_dtype",
    "check_index_dtype",
    "check_sparsity",
    "is_concrete",
    "is_float0",
    "is_static_dim",
    "symbolic_width_reason",
]


def is_concrete(x) -> bool:
    """Whether ``x`` holds values readable on the host (not a tracer).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jsparse.core.checks import is_concrete
      >>> is_concrete(jnp.ones(2)), jax.jit(lambda x: is_concrete(x) * x)(1.0).item()
      (True, 0.0)
    """
    if isinstance(x, np.ndarray | np.generic):
        return True
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, jax.Array) and x.is_fully_addressable


def is_float0(x) -> bool:
    """Whether ``x`` is a ``float0`` array (the cotangent of an integer leaf).

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> from jsparse.core.checks import is_float0
      >>> a = jsparse.BCSR.fromdense(jnp.eye(2))
      >>> g = jax.grad(lambda a: (a @ jnp.ones(2)).sum(), allow_int=True)(a)
      >>> is_float0(g.indices), is_float0(g.data)
      (True, False)
    """
    return getattr(x, "dtype", None) == jax.dtypes.float0


def as_leaf(x):
    """``x`` as a ``jax.Array``; tracers and ``float0`` cotangents pass unchanged.

    Example:
      >>> from jsparse.core.checks import as_leaf
      >>> as_leaf([1.0, 2.0])
      Array([1., 2.], dtype=float32)
    """
    if is_float0(x) or isinstance(x, jax.core.Tracer):
        return x
    return jnp.asarray(x)


def as_index_leaf(x, name: str):
    """An integer index array as ``int32``; tracers and ``float0`` pass unchanged.

    Raises:
      TypeError: ``x`` is not an integer array.

    Example:
      >>> import numpy as np
      >>> from jsparse.core.checks import as_index_leaf
      >>> as_index_leaf(np.array([0, 2], np.int64), "offsets").dtype
      dtype('int32')
      >>> as_index_leaf([0.5], "offsets")
      Traceback (most recent call last):
      ...
      TypeError: offsets must have an integer dtype, got float32
    """
    if is_float0(x) or isinstance(x, jax.core.Tracer):
        return x
    x = jnp.asarray(x)
    check_index_dtype(name, x.dtype)
    return x.astype(jnp.int32)


def check_float_dtype(name: str, dtype) -> None:
    """TypeError unless ``dtype`` is a real floating dtype (or float0, for cotangents).

    Complex dtypes are rejected with a message that says so: jsparse formats hold real
    values only (docs/index.md).

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.core.checks import check_float_dtype
      >>> check_float_dtype("values", jnp.bfloat16)
      >>> check_float_dtype("values", jnp.int32)
      Traceback (most recent call last):
      ...
      TypeError: values must have a floating-point dtype, got int32
      >>> check_float_dtype("values", jnp.complex64)
      Traceback (most recent call last):
      ...
      TypeError: values must be real: complex dtypes (complex64) are not supported
    """
    if dtype == jax.dtypes.float0:
        return
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{name} must be real: complex dtypes ({jnp.dtype(dtype).name}) are not supported"
        )
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"{name} must have a floating-point dtype, got {jnp.dtype(dtype).name}")


def check_index_dtype(name: str, dtype) -> None:
    """TypeError unless ``dtype`` is an integer dtype (or float0, for cotangents).

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.core.checks import check_index_dtype
      >>> check_index_dtype("indices", jnp.uint8)
      >>> check_index_dtype("indices", jnp.float32)
      Traceback (most recent call last):
      ...
      TypeError: indices must have an integer dtype, got float32
    """
    if dtype == jax.dtypes.float0:
        return
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must have an integer dtype, got {jnp.dtype(dtype).name}")


def as_shape(shape: Sequence[int], name: str = "shape", ndim: int | None = None) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints (of length ``ndim`` if given).

    Raises:
      TypeError: not a sequence of ints.
      ValueError: a negative size, or not ``ndim`` sizes.

    Example:
      >>> from jsparse.core.checks import as_shape
      >>> as_shape([4, 8], ndim=2)
      (4, 8)
    """
    try:
        out = tuple(int(s) for s in shape)
    except TypeError as e:
        raise TypeError(f"{name} must be a sequence of ints, got {shape!r}") from e
    if any(s < 0 for s in out):
        raise ValueError(f"{name} must be non-negative, got {out}")
    if ndim is not None and len(out) != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {out}")
    return out


def check_block_shape(shape: Sequence[int], block_shape: Any) -> tuple[int, int]:
    """``block_shape`` as a pair of positive ints that divides ``shape``.

    Raises:
      TypeError: not a pair of ints.
      ValueError: not positive, or does not divide ``shape``.

    Example:
      >>> from jsparse.core.checks import check_block_shape
      >>> check_block_shape((64, 32), (16, 8))
      (16, 8)
    """
    try:
        bm, bn = (int(b) for b in block_shape)
    except (TypeError, ValueError) as e:
        raise TypeError(f"block_shape must be a pair of ints, got {block_shape!r}") from e
    if bm <= 0 or bn <= 0:
        raise ValueError(f"block_shape must be positive, got {(bm, bn)}")
    if shape[0] % bm or shape[1] % bn:
        raise ValueError(f"block_shape {(bm, bn)} does not divide the shape {tuple(shape)}")
    return bm, bn


def check_sparsity(sparsity: Any) -> float:
    """``sparsity`` as a float in ``[0, 1)``, or a clear error.

    Raises:
      TypeError: not a number.
      ValueError: outside ``[0, 1)``.

    Example:
      >>> from jsparse.core.checks import check_sparsity
      >>> check_sparsity("0.9")
      0.9
      >>> check_sparsity(1)
      Traceback (most recent call last):
      ...
      ValueError: sparsity must be in [0, 1), got 1
    """
    try:
        s = float(sparsity)
    except (TypeError, ValueError) as e:
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from e
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s


def is_static_dim(d) -> bool:
    """Whether the dimension ``d`` is a known integer (not a ``jax.export`` symbolic
    dimension).

    Example:
      >>> from jax import export
      >>> from jsparse.core.checks import is_static_dim
      >>> is_static_dim(3), is_static_dim(export.symbolic_shape("b")[0])
      (True, False)
    """
    return isinstance(d, int | np.integer)


def symbolic_width_reason(x) -> str | None:
    """``None`` if the width (``x.shape[1]``) of a 2-D dense operand is static, else
    the reason a kernel that needs a static width declines it (a ``supports`` check's
    answer under ``jax.export`` shape polymorphism).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax import export
      >>> from jsparse.core.checks import symbolic_width_reason
      >>> symbolic_width_reason(jnp.ones((4, 2))) is None
      True
      >>> x = jax.ShapeDtypeStruct(export.symbolic_shape("4, b"), jnp.float32)
      >>> symbolic_width_reason(x)[:39]
      "the dense operand's width b is symbolic"
    """
    width = x.shape[1]
    if is_static_dim(width):
        return None
    return (
        f"the dense operand's width {width} is symbolic (jax.export shape polymorphism); "
        "the Pallas kernels need a static width"
    )
