"""The abstract matrix every sparse or structured format derives from.

A format is a frozen dataclass registered as a pytree (:func:`register_format`):
arrays (values *and* index arrays) are leaves, static metadata (shape, block shape,
n/m, ...) is aux data. Derived conveniences (``@``, ``.T``, ``ndim``, ``nbytes``,
``with_values`` ...) live here, once.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
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


class _FormatMeta(abc.ABCMeta):
    """The metaclass of every format: its class repr says what to do instead, because
    ``jax.numpy`` functions name the class in their error for a non-array argument
    (``jnp.matmul(A, x)``: "matmul requires ndarray or scalar arguments, got <class
    ...>")."""

    def __repr__(cls) -> str:
        return (
            f"<class '{cls.__module__}.{cls.__qualname__}'> (a jsparse format, not an "
            "array: jax.numpy functions do not take it; use A @ x or jsparse.matmul(A, x), "
            "or A.todense() for a dense array)"
        )


class AbstractSparseMatrix(metaclass=_FormatMeta):
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
    * ``oracle_examples``: :class:`OracleExample` instances the shared test suite runs;
      the first is the format's representative, which the suites of compositions
      (every transformation, ``jax.export``) run alone.

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
    # ndim of the first value leaf of one matrix (BCSR's ``data``: 3). A leaf with more
    # axes is stacked along leading batch axes (``jax.tree.map(jnp.stack, ...)``, as
    # ``nnx.vmap`` and ``lax.scan`` make); ``None``: not checked.
    _value_ndim: ClassVar[int | None] = None

    shape: tuple[int, ...]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A stacked matrix's own todense/transpose would fail with an unpacking error:
        # give the clear one instead.
        for name in ("todense", "transpose"):
            if name in cls.__dict__ and not getattr(
                cls.__dict__[name], "__isabstractmethod__", False
            ):
                setattr(cls, name, _unstacked_only(cls.__dict__[name]))

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
        and dtypes) run (:func:`jsparse.validate` under ``jax.experimental.checkify``
        checks the indices of traced arrays too).

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
        self._check_unstacked(f"{type(self).__name__}.validate")
        self._validate_static()
        if self._indices_concrete():
            self._validate_concrete()
        return self

    def _check_indices_traced(self) -> None:
        """The index invariants as ``jax.experimental.checkify.debug_check`` calls
        (traced arrays; active under ``checkify``). Formats with index leaves override
        it; the default has nothing to check."""

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

        return verbs.multiply(self, other)

    __rmul__ = __mul__

    def __abs__(self):
        from jsparse.core import verbs

        return verbs.map_values(jnp.abs, self)

    def __pow__(self, p):
        from jsparse.core import verbs

        if isinstance(p, jax.core.Tracer) or jnp.ndim(p) != 0:
            raise TypeError(f"{type(self).__name__} ** p needs a concrete scalar p > 0, got {p!r}")
        if not float(p) > 0:
            raise ValueError(
                f"{type(self).__name__} ** p needs p > 0 (so unstored zeros stay zero), got {p!r}"
            )
        return verbs.map_values(lambda v: v**p, self)

    def sum(self, axis: int | None = None) -> jax.Array:
        """Sum of the entries: all of them (``axis=None``), down the columns
        (``axis=0``, a vector of length ``shape[1]``) or along the rows (``axis=1``).

        Computed as products with a vector of ones, so it works for every format and
        under ``jit``, ``vmap`` and ``grad``; non-finite values follow the products'
        semantics.

        Args:
          axis: ``None``, 0, 1, -1 or -2.

        Returns:
          A dense array in the matrix's dtype.

        Raises:
          ValueError: any other ``axis``.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.array([[1.0, 2.0], [0.0, 3.0]]))
          >>> a.sum().item(), a.sum(axis=0).tolist(), a.sum(axis=1).tolist()
          (6.0, [1.0, 5.0], [3.0, 3.0])
        """
        if axis is None:
            return jnp.sum(self @ jnp.ones((self.shape[1],), self.dtype))
        if isinstance(axis, bool) or not isinstance(axis, int | np.integer) or not (-2 <= axis < 2):
            raise ValueError(f"sum: axis must be None, 0, 1, -1 or -2, got {axis!r}")
        if axis % 2 == 0:
            return jnp.ones((self.shape[0],), self.dtype) @ self
        return self @ jnp.ones((self.shape[1],), self.dtype)

    def __getitem__(self, index):
        """``a[i]``: row ``i`` as a dense vector (an int, or a traced integer scalar,
        which must be in range; negative counts from the end). Other indexing raises.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.array([[1.0, 2.0], [0.0, 3.0]]))
          >>> a[1].tolist(), a[-2].tolist()
          ([0.0, 3.0], [1.0, 2.0])
        """
        scalar_int = isinstance(index, int | np.integer) or (
            isinstance(index, jax.Array | np.ndarray)
            and index.ndim == 0
            and jnp.issubdtype(index.dtype, jnp.integer)
        )
        if isinstance(index, bool) or not scalar_int:
            raise TypeError(
                f"{type(self).__name__} indexing takes one integer row, a[i] (a dense "
                f"row); got {index!r}. Use a.todense()[...] for other indexing"
                + (", or a.block_rows(start, stop)" if hasattr(self, "block_rows") else "")
            )
        m = self.shape[0]
        if isinstance(index, int | np.integer):
            if not -m <= index < m:
                raise IndexError(f"row {index} is out of range for shape {tuple(self.shape)}")
            index = int(index) % m
        else:
            index = jnp.where(index < 0, index + m, index)
        return jax.nn.one_hot(index, m, dtype=self.dtype) @ self

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

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The leading batch axes of a stacked matrix (``()`` for one matrix).

        ``jax.tree.map(jnp.stack, ...)`` over matrices (what ``nnx.vmap`` and
        ``lax.scan`` produce) gives leaves with extra leading axes; such a stack is
        used inside ``jax.vmap`` or indexed (``jax.tree.map(lambda l: l[i], a)``).

        Example:
          >>> import jax, jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
          >>> stacked = jax.tree.map(lambda *ls: jnp.stack(ls), a, a, a)
          >>> a.batch_shape, stacked.batch_shape
          ((), (3,))
        """
        if self._value_ndim is None or not self._value_fields:
            return ()
        leaf = getattr(self, self._value_fields[0], None)
        shape = getattr(leaf, "shape", None)
        if not isinstance(shape, tuple) or len(shape) <= self._value_ndim:
            return ()
        return tuple(shape[: len(shape) - self._value_ndim])

    def _check_unstacked(self, what: str) -> None:
        """ValueError naming the batch axes if this matrix is stacked."""
        batch = self.batch_shape
        if batch:
            raise ValueError(
                f"{what}: this {type(self).__name__} is stacked along leading axes {batch} "
                f"(its leaves have extra leading axes, as jax.tree.map(jnp.stack, ...), "
                f"nnx.vmap or lax.scan make); use jax.vmap over it or index it "
                f"(jax.tree.map(lambda leaf: leaf[i], a))"
            )

    def __repr__(self) -> str:
        static = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._static_fields)
        leaves = ", ".join(f"{f}={_describe(getattr(self, f))}" for f in self._leaf_fields)
        batch = self.batch_shape
        stacked = f"[stacked {batch}]" if batch else ""
        return f"{type(self).__name__}{stacked}({static}, {leaves})"

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
    """Class decorator: register a format dataclass as a pytree with key paths (and
    for :mod:`jax.export` serialization, so exported functions can take and return
    it), and list it among the formats the shared test suite and the tools discover.

    The serialized name is ``"<module>.<qualname>"``; the static fields are written
    as JSON, so they must be ``None``, bools, ints, floats, strings or (nested)
    tuples of them.

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
    _register_serialization(cls)
    if cls not in _FORMATS:
        _FORMATS.append(cls)
    return cls


def _register_serialization(cls) -> None:
    """Register ``cls`` for ``jax.export`` (its aux data, the static fields, as JSON)."""

    def serialize(aux) -> bytes:
        fields = dict(zip(cls._static_fields, aux, strict=True))
        return json.dumps(
            {f: _to_json(f"{cls.__name__}.{f}", v) for f, v in fields.items()}, sort_keys=True
        ).encode()

    def deserialize(data: bytes):
        fields = json.loads(data.decode())
        if sorted(fields) != sorted(cls._static_fields):
            raise ValueError(
                f"cannot deserialize a {cls.__name__}: the serialized static fields "
                f"{sorted(fields)} differ from the class's {sorted(cls._static_fields)}"
            )
        return tuple(_from_json(fields[f]) for f in cls._static_fields)

    base = f"{cls.__module__}.{cls.__qualname__}"
    for attempt in range(100):  # classes of the same qualname (defined in functions)
        name = base if attempt == 0 else f"{base}#{attempt}"
        try:
            jax.export.register_pytree_node_serialization(
                cls,
                serialized_name=name,
                serialize_auxdata=serialize,
                deserialize_auxdata=deserialize,
            )
            return
        except ValueError as e:
            if "serialized_name" not in str(e):
                raise  # cls itself is registered already


def _to_json(name: str, v):
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return float(v)
    if isinstance(v, tuple | list):
        return {"tuple": [_to_json(name, x) for x in v]}
    raise TypeError(
        f"{name} = {v!r} cannot be serialized for jax.export: static fields must be "
        "None, bools, ints, floats, strings or tuples of them"
    )


def _from_json(v):
    if isinstance(v, dict):
        return tuple(_from_json(x) for x in v["tuple"])
    return v


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
    try:
        return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"
    except (AttributeError, TypeError):  # not an array: a placeholder, a dtype ...
        return repr(x)


def _unstacked_only(method):
    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        self._check_unstacked(f"{type(self).__name__}.{method.__name__}")
        return method(self, *args, **kwargs)

    return checked
