"""NM: N:M structured sparsity (``n`` kept of every ``m`` along one axis)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsparse import ops
from jsparse._base import (
    AbstractSparseMatrix,
    _is_concrete,
    _is_float0,
    as_shape,
    check_float_dtype,
    check_index_dtype,
    register_format,
)
from jsparse._dispatch import register_impl, run, with_pallas
from jsparse._xla import nm as xla

__all__ = ["NM", "is_nm", "nm_mask"]


@register_format
@dataclasses.dataclass(frozen=True, init=False, repr=False, eq=False)
class NM(AbstractSparseMatrix):
    """An N:M structured sparse matrix: ``n`` entries kept in every group of ``m``
    consecutive entries along ``axis``.

    Grouping along the contraction axis of the product the matrix serves:
    ``axis=1`` (the default, ``-1``) for ``W @ x``, ``axis=0`` for ``x @ W``. Both
    products work for either axis; the grouped one is the fast one.

    Leaves (arrays, so values *and* pattern can change under ``jit``):
      values: the kept entries, of the dense shape with ``shape[axis]`` shrunk to
        ``shape[axis] // m * n`` (``values_shape``, ``(R, S)``); group after group,
        in increasing position. Zeros are allowed (a group with fewer than ``n``
        nonzeros still stores ``n``).
      positions: the position in ``[0, m)`` of each kept entry inside its group
        (strictly increasing within a group), *bit-packed* into ``uint8``:

        * ``bits = 2`` if ``m <= 4``, ``4`` if ``m <= 16``, else ``8`` bits per
          position; ``per = 8 // bits`` positions per byte (4, 2 or 1);
        * packed along the last axis of ``values``: ``positions`` has shape
          ``(R, ceil(S / per))`` and the position of ``values[r, j]`` is
          ``(positions[r, j // per] >> (bits * (j % per))) & (2**bits - 1)``
          (little-endian: the lowest column in the lowest bits);
        * the last axis is padded to a multiple of ``per``; padding slots are 0.

        :attr:`unpacked_positions` gives the ``uint8`` ``(R, S)`` positions. For a
        2:4 matrix grouped along axis 1 the packed bytes, read as little-endian
        ``uint16`` words, are exactly the metadata of :meth:`to_2to4_compressed`.

    Static: ``shape``, ``n``, ``m`` and ``axis`` (normalised to 0 or 1).

    Invariants (checked at construction on concrete positions, and by
    :meth:`validate`): ``1 <= n < m <= 256``, ``m`` divides ``shape[axis]``; every
    position is in ``[0, m)``, positions increase strictly within each group, and
    the padding slots of the packed leaf are 0.

    Args:
      values: the ``values`` leaf, ``values_shape``.
      positions: by default the natural, unpacked positions (an integer array of
        ``values_shape``), which are packed; with ``packed=True`` the packed
        ``uint8`` leaf itself, ``(R, ceil(S / per))``.
      shape, n, m, axis: the static fields (``axis`` 0, 1, -1 or -2).
      packed: whether ``positions`` is already packed.

    Raises:
      ValueError: bad ``n``/``m``/``axis``/``shape``, leaves of the wrong shape,
        positions out of ``[0, m)``, not strictly increasing within a group, or
        nonzero packed padding.
      TypeError: non-float values, non-integer positions, packed positions that are
        not ``uint8``.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> x = jnp.array([[1.0, -5.0, 2.0, 0.5], [0.0, 3.0, -4.0, 1.0]])
      >>> a = jsparse.NM.fromdense(x, n=2, m=4)
      >>> a.values.tolist(), a.unpacked_positions.tolist(), a.positions.tolist()
      ([[-5.0, 2.0], [3.0, -4.0]], [[1, 2], [1, 2]], [[9], [9]])
    """

    values: jax.Array
    positions: jax.Array
    shape: tuple[int, int]
    n: int
    m: int
    axis: int

    _leaf_fields = ("values", "positions")
    _static_fields = ("shape", "n", "m", "axis")
    _value_fields = ("values",)

    def __init__(
        self,
        values,
        positions,
        *,
        shape: Sequence[int],
        n: int,
        m: int,
        axis: int = -1,
        packed: bool = False,
    ):
        shape = as_shape(shape)
        n, m = _check_nm(n, m)
        axis = _check_axis(axis, len(shape))
        if len(shape) != 2:
            raise ValueError(f"NM shape must be 2-D, got {shape}")
        _check_divides(shape, m, axis)
        values = values if _is_tracer(values) else jnp.asarray(values)
        if packed:
            positions = _as_packed(positions)
        else:
            positions = _pack_natural(positions, _values_shape(shape, n, m, axis), m, n, axis)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        object.__setattr__(self, "axis", axis)
        self.validate()

    # ------------------------------------------------------------ properties
    @property
    def density(self) -> float:
        """Stored fraction of the matrix, ``n / m``."""
        return self.n / self.m

    @property
    def nse(self) -> int:
        """Number of stored entries."""
        return int(np.prod(self.values.shape))

    @property
    def values_shape(self) -> tuple[int, int]:
        """Shape of ``values`` and of :attr:`unpacked_positions`."""
        return _values_shape(self.shape, self.n, self.m, self.axis)

    @property
    def position_bits(self) -> int:
        """Bits per packed position: 2 (``m <= 4``), 4 (``m <= 16``) or 8."""
        return xla.position_bits(self.m)

    @property
    def packed_shape(self) -> tuple[int, int]:
        """Shape of the packed ``positions`` leaf: ``(R, ceil(S / (8 // bits)))``."""
        rows, length = self.values_shape
        return rows, xla.packed_length(length, self.m)

    @property
    def unpacked_positions(self) -> jax.Array:
        """The positions as ``uint8`` of :attr:`values_shape`: the position in
        ``[0, m)`` of every stored value inside its group. Shifts and masks only, so
        it works (and fuses) under ``jit``; a ``float0`` cotangent gives ``float0``."""
        if _is_float0(self.positions):
            return np.zeros(self.values_shape, jax.dtypes.float0)
        return xla.unpack_positions(self.positions, m=self.m, length=self.values_shape[1])

    # ------------------------------------------------------------ validation
    def _validate_static(self) -> None:
        if len(self.shape) != 2:
            raise ValueError(f"NM shape must be 2-D, got {self.shape}")
        _check_divides(self.shape, self.m, self.axis)
        check_float_dtype("NM values", self.values.dtype)
        expected = self.values_shape
        if tuple(self.values.shape) != expected:
            raise ValueError(
                f"NM values must have shape {expected} (shape {self.shape} with axis "
                f"{self.axis} shrunk by n/m = {self.n}/{self.m}), got {tuple(self.values.shape)}"
            )
        if _is_float0(self.positions):
            return
        if self.positions.dtype != jnp.uint8:
            raise TypeError(
                f"NM packed positions must be uint8, got {jnp.dtype(self.positions.dtype).name}"
            )
        if tuple(self.positions.shape) != self.packed_shape:
            raise ValueError(_packed_shape_message(self, tuple(self.positions.shape)))

    def _validate_concrete(self) -> None:
        if _is_float0(self.positions):
            return  # a cotangent: the structure lives in the primal
        per = 8 // self.position_bits
        full = _unpack_np(np.asarray(self.positions), self.position_bits)
        length = self.values_shape[1]
        if np.any(full[:, length:]):
            r = int(np.argwhere(full[:, length:])[0, 0])
            raise ValueError(
                f"NM packed positions: the padding slots (columns {length} .. "
                f"{full.shape[1] - 1} of the unpacked row, {per} positions per byte) must "
                f"be 0; row {r} has {full[r, length:].tolist()}"
            )
        _check_positions_np(full[:, :length], self.n, self.m, self.axis)

    # ------------------------------------------------------------ construction
    @classmethod
    def fromdense(cls, x: jax.typing.ArrayLike, *, n: int = 2, m: int = 4, axis: int = -1) -> NM:
        """Prune a dense matrix to N:M: keep the ``n`` entries of largest magnitude in
        every group of ``m`` consecutive entries along ``axis``.

        Ties go to the lower position, so the result is deterministic. Works under
        ``jit`` (``n``, ``m`` and ``axis`` are static).

        Args:
          x: dense ``(M, K)`` real floating array.
          n, m: keep ``n`` of every ``m`` (``1 <= n < m <= 256``).
          axis: the grouped axis (0, 1 or -1, -2).

        Raises:
          ValueError: ``n >= m``, ``m`` does not divide ``x.shape[axis]``, a bad axis,
            or ``x`` not 2-D.
          TypeError: ``x`` is not real floating point.
        """
        x = jnp.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"NM.fromdense expects a 2-D array, got shape {x.shape}")
        check_float_dtype("NM.fromdense input", x.dtype)
        n, m = _check_nm(n, m)
        axis = _check_axis(axis, 2)
        _check_divides(x.shape, m, axis)
        values, positions = xla.compress(x, n=n, m=m, axis=axis)
        packed = xla.pack_positions(positions, m=m)
        return cls(values, packed, shape=x.shape, n=n, m=m, axis=axis, packed=True)

    @classmethod
    def random(
        cls,
        key: jax.Array,
        shape: Sequence[int],
        *,
        n: int = 2,
        m: int = 4,
        axis: int = -1,
        dtype: Any = jnp.float32,
    ) -> NM:
        """A random N:M matrix: uniformly random positions, standard-normal values."""
        shape = as_shape(shape)
        if len(shape) != 2:
            raise ValueError(f"NM shape must be 2-D, got {shape}")
        n, m = _check_nm(n, m)
        axis = _check_axis(axis, 2)
        _check_divides(shape, m, axis)
        check_float_dtype("NM.random dtype", jnp.dtype(dtype))
        k_pos, k_val = jax.random.split(key)
        _, positions = xla.compress(jax.random.uniform(k_pos, shape), n=n, m=m, axis=axis)
        values = jax.random.normal(k_val, positions.shape, dtype)
        packed = xla.pack_positions(positions, m=m)
        return cls(values, packed, shape=shape, n=n, m=m, axis=axis, packed=True)

    def with_values(self, values: jax.typing.ArrayLike) -> NM:
        """The same pattern holding new ``values`` (of ``values_shape``)."""
        values = jnp.asarray(values)
        if tuple(values.shape) != self.values_shape:
            raise ValueError(
                f"with_values: new values have shape {values.shape}, the pattern needs "
                f"{self.values_shape}"
            )
        check_float_dtype("NM values", values.dtype)
        return self._replace(values=values)

    # ------------------------------------------------------------ conversions
    def todense(self) -> jax.Array:
        return xla.decompress(
            self.values, self.unpacked_positions, n=self.n, m=self.m, axis=self.axis
        )

    def transpose(self) -> NM:
        """The transpose, grouped along the other axis: ``values`` transposed, the
        positions unpacked, transposed and packed again along the new last axis."""
        if _is_float0(self.positions):
            positions = np.zeros(
                (self.values_shape[1], xla.packed_length(self.values_shape[0], self.m)),
                jax.dtypes.float0,
            )
        else:
            positions = xla.pack_positions(self.unpacked_positions.T, m=self.m)
        return self._replace(
            values=self.values.T,
            positions=positions,
            shape=self.shape[::-1],
            axis=1 - self.axis,
        )

    def astype(self, dtype: Any) -> NM:
        check_float_dtype("NM.astype dtype", jnp.dtype(dtype))
        return self._replace(values=self.values.astype(dtype))

    def mask(self) -> jax.Array:
        """The boolean ``(M, K)`` mask of the stored positions."""
        ones = jnp.ones(self.values.shape, jnp.bool_)
        return xla.decompress(ones, self.unpacked_positions, n=self.n, m=self.m, axis=self.axis)

    # ------------------------------------------------------ 2:4 export/import
    def to_2to4_compressed(self) -> tuple[jax.Array, jax.Array]:
        """Export a 2:4 matrix (grouped along axis 1) for sparse tensor cores.

        Layout (the logical, row-major metadata of PTX ``mma.sp`` for 16-bit types,
        before the tile interleaving CUTLASS and cuSPARSELt apply):

        * ``values``: ``(R, C // 2)``, the two kept entries of every group of 4
          columns, in increasing column order (``self.values`` itself).
        * ``metadata``: ``uint16`` ``(R, C // 16)``. Word ``w`` of row ``r``
          describes columns ``16 w .. 16 w + 15``, four groups of 4; group ``j``
          (columns ``16 w + 4 j ..``) is the nibble at bits ``4 j .. 4 j + 3``, whose
          low 2 bits are the position of the first kept entry and high 2 bits the
          position of the second (so ``idx0 < idx1``). Little-endian within the word:
          the group of the lowest columns sits in the lowest bits.

        This is the packed ``positions`` leaf itself, two bytes to a word (byte
        ``2 w`` low, ``2 w + 1`` high): no positions are unpacked.

        Raises:
          ValueError: the matrix is not 2:4, not grouped along axis 1, or its number
            of columns is not a multiple of 16.
        """
        _check_2to4(self.shape, self.n, self.m, self.axis)
        rows, cols = self.shape
        b = self.positions.astype(jnp.uint16).reshape(rows, cols // 16, 2)
        metadata = b[..., 0] | (b[..., 1] << jnp.uint16(8))
        return self.values, metadata

    @classmethod
    def from_2to4_compressed(
        cls, values: jax.typing.ArrayLike, metadata: jax.typing.ArrayLike
    ) -> NM:
        """Import the layout of :meth:`to_2to4_compressed`: ``values (R, C // 2)`` and
        ``uint16`` ``metadata (R, C // 16)``; returns a 2:4 :class:`NM` of shape
        ``(R, C)`` grouped along axis 1. Bit-exact: exporting it gives back
        ``values`` and ``metadata``.

        Raises:
          ValueError: shapes disagree, or a nibble's two indices are not strictly
            increasing (checked when ``metadata`` is concrete).
          TypeError: ``metadata`` is not ``uint16`` or ``values`` not floating point.
        """
        values = jnp.asarray(values)
        metadata = jnp.asarray(metadata)
        if metadata.dtype != jnp.uint16:
            raise TypeError(f"2:4 metadata must be uint16, got {metadata.dtype}")
        if values.ndim != 2 or metadata.ndim != 2:
            raise ValueError(
                f"2:4 values and metadata must be 2-D, got {values.shape} and {metadata.shape}"
            )
        rows, half = values.shape
        if half % 8 or metadata.shape != (rows, half // 8):
            raise ValueError(
                f"2:4 values {values.shape} need metadata of shape (R, C // 16) = "
                f"({rows}, {half // 8}) with C = {2 * half} a multiple of 16; got "
                f"metadata {metadata.shape}"
            )
        low = (metadata & jnp.uint16(0xFF)).astype(jnp.uint8)
        high = (metadata >> jnp.uint16(8)).astype(jnp.uint8)
        packed = jnp.stack([low, high], axis=-1).reshape(rows, half // 4)
        return cls(values, packed, shape=(rows, 2 * half), n=2, m=4, axis=1, packed=True)


# ------------------------------------------------------------------ helpers
def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _as_packed(x):
    """The packed leaf as given (``uint8`` is checked by ``_validate_static``)."""
    if _is_float0(x) or _is_tracer(x):
        return x
    return jnp.asarray(x)


def _pack_natural(x, expected: tuple[int, int], m: int, n: int, axis: int):
    """Check unpacked positions (shape, dtype and, when concrete, range and order)
    and pack them."""
    if _is_float0(x):
        raise TypeError("NM positions: a float0 (cotangent) leaf cannot be packed")
    if not _is_tracer(x):
        x = x if isinstance(x, np.ndarray) else jnp.asarray(x)
    check_index_dtype("NM positions", x.dtype)
    if tuple(x.shape) != expected:
        raise ValueError(
            f"NM positions must have shape {expected} (unpacked: one per value; pass "
            f"packed=True for the packed leaf), got {tuple(x.shape)}"
        )
    if _is_concrete(x):
        xs = np.asarray(x)
        if xs.size and (xs.min() < 0 or xs.max() > 255):
            raise ValueError(
                f"NM positions must be in [0, m) with m <= 256 (they are stored as uint8); "
                f"got values in [{xs.min()}, {xs.max()}]"
            )
        # Before packing: an out-of-range position would lose its high bits.
        _check_positions_np(xs.astype(np.int64), n, m, axis)
    return xla.pack_positions(jnp.asarray(x), m=m)


def _unpack_np(packed: np.ndarray, bits: int) -> np.ndarray:
    """NumPy unpacking of every slot (padding included): ``(R, P * 8 // bits)``."""
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    full = (packed.astype(np.uint8)[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return full.reshape(packed.shape[0], -1).astype(np.int64)


def _check_positions_np(pos: np.ndarray, n: int, m: int, axis: int) -> None:
    """ValueError unless every position is in ``[0, m)`` and strictly increasing
    within each group (``pos``: unpacked, values-shaped)."""
    if pos.size == 0:
        return
    if pos.max() >= m:
        bad = np.argwhere(pos >= m)[0]
        raise ValueError(
            f"NM positions must be in [0, m) = [0, {m}); "
            f"positions[{bad[0]}, {bad[1]}] = {pos[tuple(bad)]}"
        )
    if n > 1:
        groups = np.moveaxis(pos, axis, -1).reshape(-1, n)
        steps = np.diff(groups, axis=1)
        if np.any(steps <= 0):
            g = int(np.argwhere(steps <= 0)[0, 0])
            raise ValueError(
                "NM positions must be strictly increasing within each group (sorted, "
                f"no repeats); a group has positions {groups[g].tolist()}"
            )


def _packed_shape_message(a: NM, got: tuple[int, ...]) -> str:
    rows, length = a.values_shape
    per = 8 // a.position_bits
    return (
        f"NM packed positions must have shape {a.packed_shape}: values_shape "
        f"({rows}, {length}) with the last axis packed {per} to a byte "
        f"({a.position_bits} bits each, m={a.m}), ceil({length} / {per}) = "
        f"{a.packed_shape[1]}; got {got} (pass packed=False for one position per value)"
    )


def _check_nm(n, m) -> tuple[int, int]:
    try:
        n, m = int(n), int(m)
    except (TypeError, ValueError) as e:
        raise TypeError(f"n and m must be ints, got n={n!r}, m={m!r}") from e
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= n < m, got n={n}, m={m}")
    if m > 256:
        raise ValueError(f"m must be at most 256 (positions are uint8), got m={m}")
    return n, m


def _check_axis(axis, ndim: int) -> int:
    try:
        axis = int(axis)
    except (TypeError, ValueError) as e:
        raise TypeError(f"axis must be an int, got {axis!r}") from e
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}-D matrix")
    return axis % ndim


def _check_divides(shape, m: int, axis: int) -> None:
    if shape[axis] % m:
        raise ValueError(
            f"m={m} does not divide the length {shape[axis]} of axis {axis} (shape {tuple(shape)})"
        )


def _check_2to4(shape, n, m, axis) -> None:
    if (n, m) != (2, 4) or axis != 1:
        raise ValueError(
            f"the 2:4 export needs n=2, m=4 grouped along axis 1, got n={n}, m={m}, "
            f"axis={axis} (use .T for a matrix grouped along axis 0)"
        )
    if shape[1] % 16:
        raise ValueError(
            f"the 2:4 export packs 4 groups per uint16, so the number of columns must be a "
            f"multiple of 16; got shape {tuple(shape)}"
        )


def _values_shape(shape, n, m, axis) -> tuple[int, int]:
    out = list(shape)
    out[axis] = shape[axis] // m * n
    return tuple(out)


def is_nm(x: jax.typing.ArrayLike, n: int = 2, m: int = 4, *, axis: int = -1) -> jax.Array:
    """Whether every group of ``m`` consecutive entries along ``axis`` has at most
    ``n`` nonzeros. Returns a boolean scalar array (works under ``jit``).

    An :class:`NM` argument is checked through its dense form.

    Raises:
      ValueError: ``n >= m``, a bad axis, ``x`` not 2-D, or ``m`` does not divide
        the axis length.
    """
    x = x.todense() if isinstance(x, AbstractSparseMatrix) else jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"is_nm expects a 2-D array, got shape {x.shape}")
    n, m = _check_nm(n, m)
    axis = _check_axis(axis, 2)
    _check_divides(x.shape, m, axis)
    return jnp.all(xla.group_counts(x, m=m, axis=axis) <= n)


def nm_mask(
    x: jax.typing.ArrayLike,
    n: int = 2,
    m: int = 4,
    *,
    axis: int = -1,
    transposable: bool = False,
) -> jax.Array:
    """Boolean mask of the N:M pattern of largest magnitude in ``x``.

    Args:
      x: dense 2-D real array.
      n, m: keep ``n`` of every ``m``.
      axis: the grouped axis (ignored when ``transposable``).
      transposable: a mask that is N:M along *both* axes (for a weight used in
        ``W @ x`` forward and ``W.T @ dy`` backward): in every ``m x m`` block, a
        greedy pass by decreasing magnitude keeps an entry while its row and column
        hold fewer than ``n`` (the rule of NVIDIA ASP's 2-D greedy). It may keep fewer
        than ``n`` in a row or column, never more. Needs ``m`` to divide both axes.

    Returns:
      A ``bool`` array of ``x.shape``: exactly ``n`` kept per group (ties to the lower
      position) without ``transposable``; at most ``n`` per row and column of every
      block with it. Works under ``jit``.

    Raises:
      ValueError: ``n >= m``, ``m`` does not divide the grouped axis (both axes when
        ``transposable``), a bad axis or ``x`` not 2-D.
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"nm_mask expects a 2-D array, got shape {x.shape}")
    n, m = _check_nm(n, m)
    if transposable:
        _check_divides(x.shape, m, 0)
        _check_divides(x.shape, m, 1)
        return xla.transposable_mask(x, n=n, m=m)
    axis = _check_axis(axis, 2)
    _check_divides(x.shape, m, axis)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return xla.topn_mask(x, n=n, m=m, axis=axis)


# ---------------------------------------------------------------- ops: matmul
@dataclasses.dataclass(frozen=True)
class Kernels:
    """The array-level kernels one implementation provides (hashable, static).

    ``spmm(values, positions, x, *, n, m, axis, transpose)`` computes ``A @ x`` or
    ``A.T @ x``; ``sampled(u, v, positions, *, n, m, axis)`` computes ``u @ v.T`` at
    the kept entries (values-shaped). Both receive the *unpacked* ``uint8``
    positions (:attr:`NM.unpacked_positions`, the shape of ``values``).
    """

    spmm: Callable[..., jax.Array]
    sampled: Callable[..., jax.Array]


XLA_KERNELS = Kernels(spmm=xla.spmm, sampled=xla.sampled)


def _unpack_for(values: jax.Array, packed: jax.Array, m: int) -> jax.Array:
    return xla.unpack_positions(packed, m=m, length=values.shape[1])


# ``positions`` is the packed leaf (small residual); the kernels get it unpacked.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _spmm(kernels: Kernels, config, transpose, values, positions, x):
    n, m, axis = config
    positions = _unpack_for(values, positions, m)
    return kernels.spmm(values, positions, x, n=n, m=m, axis=axis, transpose=transpose)


def _spmm_fwd(kernels, config, transpose, values, positions, x):
    y = _spmm(kernels, config, transpose, values, positions, x)
    return y, (values, positions, x)


def _spmm_bwd(kernels, config, transpose, res, dy):
    values, positions, x = res
    n, m, axis = config
    positions = _unpack_for(values, positions, m)
    # y = op(A) @ x  =>  dx = op(A).T @ dy and dA = dy @ x.T sampled at A's pattern.
    dx = kernels.spmm(values, positions, dy, n=n, m=m, axis=axis, transpose=not transpose)
    u, v = (x, dy) if transpose else (dy, x)
    dvalues = kernels.sampled(u, v, positions, n=n, m=m, axis=axis)
    return dvalues.astype(values.dtype), None, dx.astype(x.dtype)


_spmm.defvjp(_spmm_fwd, _spmm_bwd)


def spmm_with(kernels: Kernels, a: NM, x: jax.Array, *, transpose: bool) -> jax.Array:
    """``op(a) @ x`` through ``kernels`` with the sparse custom VJP (the kernels
    receive ``a.unpacked_positions``)."""
    return _spmm(kernels, (a.n, a.m, a.axis), transpose, a.values, a.positions, x)


@register_impl("matmul", NM, "xla")
def _matmul_xla(a: NM, x, *, transpose: bool):
    return spmm_with(XLA_KERNELS, a, x, transpose=transpose)


@register_impl("matmul", NM, "dense")
def _matmul_dense(a: NM, x, *, transpose: bool):
    w = a.todense()
    w = w.T if transpose else w
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.matmul(w, x, preferred_element_type=acc).astype(x.dtype)


def auto_order(a: NM) -> list[str]:
    """Implementations ``impl="auto"`` tries for ``a``, best first.

    ``"xla"`` first on CPU (docs/nm.md): its matrix-vector product reads only the
    stored bytes (~0.8x dense, ~7x faster than densifying first); for a wider operand
    both decompress and call a dense ``dot`` (``"xla"`` a cache-sized chunk at a time
    for a large matrix), at parity within measurement noise.
    """
    del a
    return ["xla", "dense"]


ops.register_matmul(NM, lambda a: with_pallas(auto_order(a)))


# ---------------------------------------------------------------- ops: sddmm
@register_impl("sddmm", NM, "xla")
def _sddmm_xla(pattern: NM, x, y):
    # Pure jnp/lax (scan, dot, where): JAX differentiates it directly.
    positions = pattern.unpacked_positions
    values = xla.sampled(x, y.T, positions, n=pattern.n, m=pattern.m, axis=pattern.axis)
    return pattern._replace(values=values)


@ops._sddmm.register
def _(pattern: NM, x, y):
    return run("sddmm", NM, "auto", ["xla"], pattern, x, y)


# ---------------------------------------------------------------- ops: elementwise
ops._scale.register(NM)(ops.scale_entries)
ops._map_values.register(NM)(ops.map_entries)


@ops._add.register
def _(a: NM, b: NM):
    same_config = (a.n, a.m, a.axis) == (b.n, b.m, b.axis)
    if not same_config or not ops.same_indices(a, b):
        raise ValueError(
            "add: NM operands must share the same pattern (n, m, axis and positions); got "
            f"{a.n}:{a.m} axis {a.axis} and {b.n}:{b.m} axis {b.axis}. Under jit, patterns "
            "can only be compared when they are the same arrays; use "
            "a.with_values(a.values + b.values) to assert it yourself."
        )
    return ops.add_entries(a, b)
