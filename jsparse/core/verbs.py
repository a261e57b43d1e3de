"""The public verbs: ``matmul``, ``sddmm``, ``scale``, ``map_values``, ``add``,
``todense`` and ``transpose``.

Each verb is a :func:`functools.singledispatch` function (dense arrays get the
``jax.numpy`` meaning, formats the sparse one) that checks and normalises its
arguments once, then runs the format's implementation through the registry
(:func:`jsparse.core.registry.run`) with ``impl=`` (``"auto"`` by default, which asks
the format's :meth:`~jsparse.core.AbstractSparseMatrix.auto_order`). A format author
registers implementations (``jsparse.extend.register_impl``), not new verbs; a type
that is not a jsparse format can still register a verb directly
(``jsparse.todense.register(MyType)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jsparse.core import meshes
from jsparse.core.matrix import AbstractSparseMatrix
from jsparse.core.registry import check_impl, run

__all__ = [
    "add",
    "map_values",
    "matmul",
    "multiply",
    "scale",
    "sddmm",
    "todense",
    "transpose",
    "validate",
]


def _run(op: str, a: AbstractSparseMatrix, impl: str, *args, **kwargs):
    a._check_unstacked(f"jsparse.{op}")
    order = a.auto_order(op) if impl == "auto" else ()
    return run(op, type(a), impl, order, a, *args, **kwargs)


# ------------------------------------------------------------------ todense, transpose
@functools.singledispatch
def todense(a, *, impl: str = "auto") -> jax.Array:
    """The dense array of a format; dense arrays are returned as ``jax.Array``.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> jsparse.todense(a).shape
      (4, 4)
    """
    check_impl(impl)
    return jnp.asarray(a)


@todense.register
def _(a: AbstractSparseMatrix, *, impl: str = "auto") -> jax.Array:
    check_impl(impl)
    return _run("todense", a, impl)


@functools.singledispatch
def transpose(a, *, impl: str = "auto"):
    """The transpose: a format in the same family where possible (dense: ``a.T``).

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.ones((4, 6)), block_shape=(2, 3))
      >>> jsparse.transpose(a).shape, jsparse.transpose(a).block_shape
      ((6, 4), (3, 2))
    """
    check_impl(impl)
    return jnp.asarray(a).T


@transpose.register
def _(a: AbstractSparseMatrix, *, impl: str = "auto"):
    check_impl(impl)
    return _run("transpose", a, impl)


# ------------------------------------------------------------------ matmul
def _promote(a: AbstractSparseMatrix, x) -> tuple[AbstractSparseMatrix, jax.Array]:
    """The operands in their common floating dtype (a no-op when they agree)."""
    x = jnp.asarray(x)
    if x.dtype == a.dtype:
        return a, x
    if not jnp.issubdtype(x.dtype, jnp.floating):
        if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
            x = x.astype(a.dtype)
        else:
            raise TypeError(f"the dense operand must be real floating point, got {x.dtype}")
    dtype = jnp.result_type(a.dtype, x.dtype)
    if a.dtype != dtype:
        a = a.astype(dtype)
    return a, x.astype(dtype)


@functools.singledispatch
def matmul(a, b, *, impl: str = "auto") -> jax.Array:
    """Matrix product with a sparse operand on either side; the other is dense.

    ``a @ b`` follows :func:`jax.numpy.matmul` for the dense operand: a vector
    (contracted and removed) or an array whose trailing two axes are the matrix
    (leading axes are batch axes, on the dense side only).

    Args:
      a, b: one jsparse format (2-D) and one dense array (``jax.Array`` or array-like).
      impl: ``"auto"`` (by platform and pattern), or an implementation's name
        (``"xla"``, ``"dense"``, ``"pallas"`` ...: ``jsparse.implementations("matmul",
        type(a))``).

    Returns:
      A dense array in the promoted dtype of the operands (accumulated in float32).

    Raises:
      ValueError: the contraction dimensions differ (the message names both shapes),
        or ``impl`` is unknown or cannot handle the operands (with the reason).
      TypeError: both operands are sparse, or the dense operand is not real floating
        point.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.random(jax.random.key(0), (64, 32), density=0.25,
      ...                         block_shape=(16, 16))
      >>> (a @ jnp.ones((32, 3))).shape
      (64, 3)
      >>> jsparse.matmul(jnp.ones((5, 64)), a, impl="xla").shape
      (5, 32)
    """
    check_impl(impl)
    if isinstance(b, AbstractSparseMatrix):
        b, a = _promote(b, a)
        spec = meshes.spec_of(a)  # x's leading axes keep their sharding
        run = functools.partial(_dense_at_sparse, impl=impl)
        return _on_mesh(run, a, b, spec, contracted=len(spec) - 1, out_spec=P(*spec[:-1], None))
    return jnp.matmul(a, b)


@matmul.register
def _(a: AbstractSparseMatrix, b, *, impl: str = "auto") -> jax.Array:
    check_impl(impl)
    if isinstance(b, AbstractSparseMatrix):
        raise TypeError(
            f"sparse @ sparse is not supported ({type(a).__name__} {a.shape} @ "
            f"{type(b).__name__} {b.shape}); call .todense() on one operand"
        )
    a, b = _promote(a, b)
    spec = meshes.spec_of(b)  # the dense operand's axes but the contracted one keep theirs
    out_spec = P(None) if b.ndim <= 1 else P(*spec[:-2], None, spec[-1])
    run = functools.partial(_sparse_at_dense, impl=impl)
    return _on_mesh(run, a, b, spec, contracted=max(len(spec) - 2, 0), out_spec=out_spec)


def _on_mesh(run, a, b, spec, *, contracted, out_spec):
    """``run(a, b)`` on sharded operands (:mod:`jsparse.core.meshes`): on explicit axes
    that shard only the dense operand's batch axes, each device multiplies its own
    rows (the format's cotangent is then summed by one all-reduce, the size of its
    stored values); any other explicit sharding runs with the axes made automatic."""
    mesh = meshes.explicit_mesh(jax.tree.leaves((a, b)))
    sparse = a if isinstance(a, AbstractSparseMatrix) else b
    if (
        mesh is not None
        and spec[contracted] is None
        and not any(map(meshes.axis_names, jax.tree.leaves(sparse)))
    ):
        specs = [P() if o is sparse else P(*spec) for o in (a, b)]
        return meshes.batch_parallel(run, (a, b), mesh, specs, out_spec)
    return meshes.on_auto_axes(run, (a, b), out_spec)


def _sparse_at_dense(a: AbstractSparseMatrix, x: jax.Array, *, impl: str) -> jax.Array:
    m, k = a.shape
    if x.ndim == 0:
        raise ValueError("matmul: the dense operand must have at least 1 dimension")
    contracted = x.shape[0] if x.ndim == 1 else x.shape[-2]
    if contracted != k:
        raise ValueError(
            f"matmul: shapes {a.shape} and {x.shape} are not aligned ({k} != {contracted})"
        )
    if x.ndim == 1:
        return _run("matmul", a, impl, x[:, None], transpose=False)[:, 0]
    if x.ndim == 2:
        return _run("matmul", a, impl, x, transpose=False)
    batch, n = x.shape[:-2], x.shape[-1]
    x2 = jnp.moveaxis(x, -2, 0).reshape(k, -1)
    y = _run("matmul", a, impl, x2, transpose=False).reshape(m, *batch, n)
    return jnp.moveaxis(y, 0, -2)


def _static(d) -> bool:
    return isinstance(d, int | np.integer)


def _dense_at_sparse(x: jax.Array, a: AbstractSparseMatrix, *, impl: str) -> jax.Array:
    m, k = a.shape
    if x.ndim == 0:
        raise ValueError("matmul: the dense operand must have at least 1 dimension")
    if x.shape[-1] != m:
        raise ValueError(
            f"matmul: shapes {x.shape} and {a.shape} are not aligned ({x.shape[-1]} != {m})"
        )
    lead = x.shape[:-1]
    # x @ A = (A.T @ x.T).T: the kernels read A transposed, nothing forms A.T.
    rows = int(np.prod(lead, dtype=np.int64)) if all(map(_static, lead)) else -1
    y = _run("matmul", a, impl, x.reshape(rows, m).T, transpose=True).T
    return y.reshape(*lead, k)


# ------------------------------------------------------------------ sddmm
def sddmm(x, y, pattern: AbstractSparseMatrix, *, impl: str = "auto"):
    """Sampled dense-dense matmul: ``x @ y`` evaluated only where ``pattern`` stores.

    Args:
      x: dense ``(M, J)``.
      y: dense ``(J, K)``.
      pattern: a format of shape ``(M, K)`` whose structure is kept (its values are
        ignored).
      impl: ``"auto"`` or an implementation's name.

    Returns:
      A matrix in ``pattern``'s format and structure holding ``(x @ y)`` at the
      stored positions. Differentiable with respect to ``x`` and ``y``.

    Raises:
      TypeError: ``pattern`` is not a format, or ``x``/``y`` are not floating point.
      ValueError: the shapes do not match.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> p = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> jsparse.sddmm(jnp.ones((4, 3)), jnp.ones((3, 4)), p).todense()[0, :2]
      Array([3., 3.], dtype=float32)
    """
    check_impl(impl)
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
    return _run("sddmm", pattern, impl, x.astype(dtype), y.astype(dtype))


# ------------------------------------------------------------------ entrywise verbs
def _not_a_format(verb: str, a) -> TypeError:
    return TypeError(
        f"jsparse.{verb} takes a jsparse format, got {type(a).__name__}; for dense arrays "
        "use jax.numpy directly"
    )


@functools.singledispatch
def scale(a, s, *, impl: str = "auto"):
    """``s * a`` for a scalar ``s``, in ``a``'s format.

    Raises:
      TypeError: ``s`` is not a scalar.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(2), block_shape=(1, 1))
      >>> jsparse.scale(a, 3.0).todense()[1, 1]
      Array(3., dtype=float32)
    """
    raise _not_a_format("scale", a)


@scale.register
def _(a: AbstractSparseMatrix, s, *, impl: str = "auto"):
    check_impl(impl)
    s = jnp.asarray(s)
    if s.ndim != 0:
        raise TypeError(f"{type(a).__name__} can only be scaled by a scalar, got shape {s.shape}")
    return _run("scale", a, impl, s)


def map_values(fn: Callable[[jax.Array], jax.Array], a: AbstractSparseMatrix, *, impl="auto"):
    """Apply a zero-preserving elementwise ``fn`` to the stored values of ``a``.

    ``fn(0)`` must be ``0`` (e.g. ``jnp.abs``, ``jnp.sin``, ``jax.nn.relu``), so that
    the result equals ``fn`` applied to the dense matrix. This is checked when
    ``fn`` can be evaluated on a concrete zero.

    Raises:
      ValueError: ``fn(0) != 0``.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(-jnp.eye(2), block_shape=(1, 1))
      >>> jsparse.map_values(jnp.abs, a).todense()[0, 0]
      Array(1., dtype=float32)
    """
    return _map_values(a, fn, impl=impl)


# map_values takes the function first (like jax.tree.map); it dispatches on the format.
@functools.singledispatch
def _map_values(a, fn, *, impl: str):
    raise _not_a_format("map_values", a)


@_map_values.register
def _(a: AbstractSparseMatrix, fn, *, impl: str):
    check_impl(impl)
    _check_zero_preserving(fn, a.dtype)
    return _run("map_values", a, impl, fn)


def _check_zero_preserving(fn, dtype) -> None:
    try:
        with jax.ensure_compile_time_eval():
            zero = np.asarray(fn(jnp.zeros((), dtype)))
    except jax.errors.JAXTypeError:
        return  # fn closes over tracers: cannot check eagerly
    if zero.shape != () or zero != 0:
        raise ValueError(f"map_values needs a zero-preserving function, but fn(0) = {zero!r}")


@functools.singledispatch
def add(a, b, *, impl: str = "auto"):
    """Sum of two matrices of the same format and the same stored pattern.

    Raises:
      TypeError: the formats differ.
      ValueError: the shapes or patterns differ.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(2), block_shape=(1, 1))
      >>> jsparse.add(a, a).todense()[0, 0]
      Array(2., dtype=float32)
    """
    raise _not_a_format("add", a)


@add.register
def _(a: AbstractSparseMatrix, b, *, impl: str = "auto"):
    check_impl(impl)
    if type(a) is not type(b):
        raise TypeError(
            f"add: both operands must have the same format, got "
            f"{type(a).__name__} and {type(b).__name__}"
        )
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"add: shapes differ: {a.shape} and {b.shape}")
    return _run("add", a, impl, b)


@functools.singledispatch
def multiply(a, b, *, impl: str = "auto"):
    """Elementwise product ``a * b`` in ``a``'s format (``A * x``).

    ``b`` may be a scalar (:func:`scale`), a dense array of ``a.shape`` (its entries
    at ``a``'s stored positions multiply the stored values; unstored entries stay
    zero whatever ``b`` holds there), or a matrix of ``a``'s format with the same
    pattern (the stored values multiply; patterns as in :func:`add`).

    Args:
      a: a jsparse format whose stored values are entries (BCSR, N:M).
      b: a scalar, a dense array of ``a.shape``, or a same-pattern matrix.
      impl: ``"auto"`` or an implementation's name.

    Returns:
      A matrix in ``a``'s format and pattern.

    Raises:
      TypeError: ``a`` is not a format, the format has no entrywise product
        (Monarch, LowRankSparse: the result would not be one), or ``b`` is of
        another format.
      ValueError: ``b``'s shape or pattern differs from ``a``'s.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(2), block_shape=(1, 1))
      >>> (a * jnp.array([[3.0, 5.0], [7.0, 9.0]])).todense().tolist()
      [[3.0, 0.0], [0.0, 9.0]]
    """
    raise _not_a_format("multiply", a)


@multiply.register
def _(a: AbstractSparseMatrix, b, *, impl: str = "auto"):
    check_impl(impl)
    if not isinstance(b, AbstractSparseMatrix) and jnp.ndim(b) == 0:
        return scale(a, b, impl=impl)
    from jsparse.core.registry import implementations

    if not implementations("multiply", type(a)):
        raise TypeError(
            f"{type(a).__name__} has no elementwise product with an array or a matrix (the "
            f"result would not be a {type(a).__name__}); use a.todense() * b"
        )
    if isinstance(b, AbstractSparseMatrix):
        if type(a) is not type(b):
            raise TypeError(
                f"multiply: both operands must have the same format, got "
                f"{type(a).__name__} and {type(b).__name__}"
            )
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"multiply: shapes differ: {a.shape} and {b.shape}")
        return _run("multiply", a, impl, b)
    b = jnp.asarray(b)
    if tuple(b.shape) != tuple(a.shape):
        raise ValueError(
            f"multiply: the dense operand must have the matrix's shape {tuple(a.shape)} "
            f"(no broadcasting), got {tuple(b.shape)}"
        )
    if not (
        jnp.issubdtype(b.dtype, jnp.floating)
        or jnp.issubdtype(b.dtype, jnp.integer)
        or b.dtype == jnp.bool_
    ):
        raise TypeError(f"multiply: the dense operand must be real, got {b.dtype}")
    return _run("multiply", a, impl, b)


# ------------------------------------------------------------------ validate
def validate(a: AbstractSparseMatrix) -> AbstractSparseMatrix:
    """Check every invariant of ``a``, also under ``jit`` (through ``checkify``).

    Eagerly (concrete index arrays) this is ``a.validate()``: a ``ValueError`` names
    the offending array. Traced (under ``jit``), the static checks run at trace time
    and the index invariants (BCSR: block-columns in range, sorted within a
    block-row, ``indptr`` non-decreasing from 0 to ``nse``; N:M: positions in
    ``[0, m)``, increasing within each group) are staged as
    :func:`jax.experimental.checkify.debug_check` calls: functionalize the function
    with :func:`jax.experimental.checkify.checkify` to get the error (naming the
    array) instead of the silently wrong results out-of-range indices give under
    ``jit``; without ``checkify`` they cost nothing.

    Args:
      a: a jsparse format (one matrix, not a stack).

    Returns:
      ``a``, unchanged.

    Raises:
      TypeError: ``a`` is not a jsparse format, or a leaf has the wrong dtype.
      ValueError: an invariant fails (eagerly), or ``a`` is stacked.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> from jax.experimental import checkify
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> bad = a._replace(indices=jnp.array([0, 7], jnp.int32))
      >>> err, _ = checkify.checkify(jax.jit(jsparse.validate))(bad)
      >>> print(err.get())  # doctest: +ELLIPSIS
      BCSR indices must be block-columns in [0, 2) ...; found 7 at position 1...
    """
    if not isinstance(a, AbstractSparseMatrix):
        raise TypeError(f"jsparse.validate takes a jsparse format, got {type(a).__name__}")
    a._check_unstacked("jsparse.validate")
    if a._indices_concrete():
        return a.validate()
    a._validate_static()
    a._check_indices_traced()
    return a
