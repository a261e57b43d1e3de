"""The abstract matrix every sparse or structured format derives from.

A format is a frozen dataclass registered as a pytree (:func:`register_format`):
arrays (values *and* index arrays) are leaves, static metadata (shape, block shape,
n/m, ...) is aux data. Derived conveniences (``@``, ``.T``, ``ndim``, ``nbytes``,
``with_values`` ...) live here, once.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.core.checks import check_float_dtype, is_concrete, is_float0

__all__ = ["AbstractSparseMatrix", "OracleExample", "register_format", "registered_formats"]

# Every format registered with ``register_format``, in registration order.
_FORMATS: list[type] = []


@dataclasses.dataclass(frozen=True)
class OracleExample:
    """A random instance of a format for the shared dense-oracle test suite.

    Attributes:
      name: the test id (``"bcsr_4x8"``).
      make: ``make(key, shape, dtype) -> format`` with values of unit scale.
      shapes: the 2-D shapes ``make`` accepts; every op is tested on each.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> ex = jsparse.extend.OracleExample(
      ...     "bcsr_2x2",
      ...     lambda key, shape, dtype: jsparse.BCSR.random(
      ...         key, shape, density=0.5, block_shape=(2, 2), dtype=dtype),
      ...     ((4, 6),))
      >>> ex, ex.make(jax.random.key(0), ex.shapes[0], jnp.float32).shape
      (bcsr_2x2, (4, 6))
    """

    name: str
    make: Callable[[jax.Array, tuple[int, int], Any], Any]
    shapes: tuple[tuple[int, int], ...]

    def __repr__(self) -> str:
        return self.name


class AbstractSparseMatrix(abc.ABC):
    """Base class of every jsparse format (a 2-D matrix stored compactly).

    Subclasses are frozen dataclasses whose array fields are pytree leaves and whose
    remaining fields are static. They implement ``todense``, ``transpose``,
    ``astype`` and ``_validate_concrete``; matmul comes from the generic
    :func:`jsparse.matmul`, which dispatches on the type (docs/extending.md walks
    through a new format).

    Class attributes a format sets:

    * ``_leaf_fields``: the dataclass fields that are arrays (pytree leaves), in order;
    * ``_static_fields``: the fields that are static metadata (pytree aux data);
    * ``_value_fields``: the leaves that hold the stored (trainable, floating) values;
      the other leaves are index arrays (their cotangents are ``float0``);
    * ``oracle_examples``: :class:`OracleExample` instances the shared test suite runs.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> isinstance(a, jsparse.AbstractSparseMatrix), a._value_fields
      (True, ('data',))
      >>> leaves, treedef = jax.tree_util.tree_flatten(a)  # a pytree: values and indices
      >>> len(leaves), type(jax.tree_util.tree_unflatten(treedef, leaves)).__name__
      (6, 'BCSR')
    """

    # Names of the dataclass fields that are arrays (pytree leaves), in order.
    _leaf_fields: ClassVar[tuple[str, ...]] = ()
    # Names of the fields that are static metadata (pytree aux data).
    _static_fields: ClassVar[tuple[str, ...]] = ()
    # Names of the leaves that carry trainable values (float); the rest are indices.
    _value_fields: ClassVar[tuple[str, ...]] = ()
    # Random instances the shared oracle test suite runs every op on.
    oracle_examples: ClassVar[tuple[OracleExample, ...]] = ()

    shape: tuple[int, ...]

    # NumPy operands defer to our reflected operators (``np_array @ sparse``).
    __array_ufunc__ = None

    # ----------------------------------------------------------------- abstract
    @abc.abstractmethod
    def todense(self) -> jax.Array:
        """The dense equivalent, an array of ``self.shape`` and ``self.dtype``.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.BCSR.fromdense(jnp.eye(2)).todense().tolist()
          [[1.0, 0.0], [0.0, 1.0]]
        """

    @abc.abstractmethod
    def transpose(self) -> AbstractSparseMatrix:
        """The transposed matrix, in the same family of format where possible.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.ones((2, 4)), block_shape=(1, 2))
          >>> type(a.transpose()).__name__, a.transpose().shape
          ('BCSR', (4, 2))
        """

    @abc.abstractmethod
    def astype(self, dtype: Any) -> AbstractSparseMatrix:
        """Values cast to ``dtype``; the structure (index arrays) is kept.

        Raises:
          TypeError: ``dtype`` is not a floating dtype.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.BCSR.fromdense(jnp.eye(2)).astype(jnp.bfloat16).dtype
          dtype(bfloat16)
        """

    @abc.abstractmethod
    def _validate_concrete(self) -> None:
        """Check the index arrays (only called when they are concrete)."""

    def auto_order(self, op: str):
        """The implementations ``impl="auto"`` tries for ``op`` on this matrix, best
        first: a list, or a mapping from platform (``"cpu"``, ``"cuda"``, ``"tpu"``,
        ``"default"``) to a list. Formats override it (by density, shape ...).

        Args:
          op: the op name (``"matmul"``, ``"sddmm"``, ``"scale"`` ...).

        Returns:
          Implementation names, best first (names not registered for ``op`` are
          skipped).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
          >>> jsparse.extend.AbstractSparseMatrix.auto_order(a, "matmul")  # the default
          ['xla', 'dense']
        """
        del op
        return ["xla", "dense"]

    # ------------------------------------------------------------------ derived
    @property
    def dtype(self) -> np.dtype:
        """The dtype of the stored values.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.BCSR.fromdense(jnp.eye(2, dtype=jnp.bfloat16)).dtype
          dtype(bfloat16)
        """
        return getattr(self, self._value_fields[0]).dtype

    @property
    def ndim(self) -> int:
        """Number of dimensions (2).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.BCSR.fromdense(jnp.eye(2)).ndim
          2
        """
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of entries of the dense matrix (``m * n``), stored or not.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.BCSR.fromdense(jnp.eye(3, 4)).size
          12
        """
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes of every leaf (values and indices).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.NM.fromdense(jnp.ones((4, 8)), n=2, m=4)
          >>> a.nbytes  # 16 float32 values + 16 positions of 2 bits, four to a byte
          68
        """
        return int(sum(_leaf_nbytes(x) for x in jax.tree_util.tree_leaves(self)))

    @property
    def nstored(self) -> int:
        """Number of stored values (the sizes of the value leaves added up).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2)).nstored
          8
        """
        return int(sum(np.prod(getattr(self, f).shape) for f in self._value_fields))

    @property
    def T(self) -> AbstractSparseMatrix:  # noqa: N802 - array convention
        """The transpose (:meth:`transpose`).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.BCSR.fromdense(jnp.ones((2, 4))).T.shape
          (4, 2)
        """
        return self.transpose()

    def with_values(self, *values: jax.typing.ArrayLike) -> AbstractSparseMatrix:
        """The same pattern holding new stored values (one array per value leaf, each
        of the leaf's shape; any floating dtype).

        Args:
          *values: the new value leaves, in the order of ``_value_fields``.

        Returns:
          A matrix of the same format, structure and static fields.

        Raises:
          ValueError: the wrong number of arrays, or an array of the wrong shape.
          TypeError: a non-floating array.

        Example:
          >>> import jax, jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
          >>> a.with_values(2 * a.data).todense()[0, 0]
          Array(2., dtype=float32)
          >>> g = jax.grad(lambda d: jnp.sum(a.with_values(d) @ jnp.ones(4)))(a.data)
          >>> g.shape  # a gradient with the shape of the stored values
          (2, 2, 2)
        """
        fields = self._value_fields
        if len(values) != len(fields):
            raise ValueError(
                f"{type(self).__name__}.with_values takes {len(fields)} array(s) "
                f"({', '.join(fields)}), got {len(values)}"
            )
        new = {}
        for name, v in zip(fields, values, strict=True):
            v = v if isinstance(v, jax.core.Tracer) else jnp.asarray(v)
            if tuple(v.shape) != tuple(getattr(self, name).shape):
                raise ValueError(
                    f"{type(self).__name__}.with_values: new {name} have shape "
                    f"{tuple(v.shape)}, the pattern needs {tuple(getattr(self, name).shape)}"
                )
            check_float_dtype(f"{type(self).__name__} {name}", v.dtype)
            new[name] = v
        return self._replace(**new)

    def validate(self) -> AbstractSparseMatrix:
        """Check every invariant of the format; return ``self``.

        Index checks need concrete arrays; under ``jit`` only the static checks (shapes
        and dtypes) run.

        Returns:
          ``self``, unchanged.

        Raises:
          ValueError: an invariant fails (the message names the offending array).
          TypeError: a leaf has the wrong dtype.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
          >>> a.validate() is a
          True
        """
        self._validate_static()
        if self._indices_concrete():
            self._validate_concrete()
        return self

    def _validate_static(self) -> None:
        """Shape and dtype checks that work on tracers too. Override to extend."""

    @property
    def _index_fields(self) -> tuple[str, ...]:
        return tuple(f for f in self._leaf_fields if f not in self._value_fields)

    def _indices_concrete(self) -> bool:
        return all(is_concrete(getattr(self, f)) for f in self._index_fields)

    def __matmul__(self, other):
        from jsparse.core import verbs

        return verbs.matmul(self, other)

    def __rmatmul__(self, other):
        from jsparse.core import verbs

        return verbs.matmul(other, self)

    def __mul__(self, other):
        from jsparse.core import verbs

        return verbs.scale(self, other)

    __rmul__ = __mul__

    def __truediv__(self, other):
        from jsparse.core import verbs

        return verbs.scale(self, 1 / jnp.asarray(other))

    def __neg__(self):
        from jsparse.core import verbs

        return verbs.scale(self, -1)

    def __add__(self, other):
        from jsparse.core import verbs

        return verbs.add(self, other)

    def __sub__(self, other):
        from jsparse.core import verbs

        return verbs.add(self, -other)

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
    """Class decorator: register a format dataclass as a pytree with key paths, and
    list it among the formats the shared test suite and the tools discover.

    Args:
      cls: a dataclass deriving from :class:`AbstractSparseMatrix` whose
        ``_leaf_fields`` and ``_static_fields`` name its fields.

    Returns:
      ``cls`` itself.

    Raises:
      TypeError: ``_leaf_fields`` or ``_static_fields`` name a field ``cls`` lacks.

    Example:
      >>> import jsparse
      >>> jsparse.BCSR in jsparse.extend.registered_formats()
      True
    """
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
    if cls not in _FORMATS:
        _FORMATS.append(cls)
    return cls


def registered_formats() -> tuple[type, ...]:
    """Every format class registered with :func:`register_format`, in registration
    order.

    Example:
      >>> import jsparse
      >>> [f.__name__ for f in jsparse.extend.registered_formats()][:4]
      ['BCSR', 'Monarch', 'LowRankSparse', 'NM']
    """
    return tuple(_FORMATS)


# ------------------------------------------------------------------- helpers
def _leaf_nbytes(x) -> int:
    if is_float0(x):
        return 0
    return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize


def _describe(x) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}" if hasattr(x, "shape") else repr(x)
