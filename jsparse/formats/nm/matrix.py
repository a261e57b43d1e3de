"""NM: N:M structured sparsity (``n`` kept of every ``m`` along one axis)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.core.checks import (
    as_shape,
    check_float_dtype,
    check_index_dtype,
    is_concrete,
    is_float0,
)
from jsparse.core.matrix import AbstractSparseMatrix, register_format
from jsparse.core.registry import check_impl, run, with_pallas
from jsparse.formats.bcsr.matrix import BCSR
from jsparse.formats.nm import packing

__all__ = ["NM", "check_axis", "check_divides", "check_nm", "prune"]

# ``fromdense``'s implementations per platform: the native pruning on CPU (docs/native.md,
# *N:M pruning*), else lax.top_k.
_FROMDENSE_ORDER = {"default": ["xla"], "cpu": ["cpu", "xla"]}


@register_format
@dataclasses.dataclass(frozen=True, init=False, repr=False, eq=False)
class NM(AbstractSparseMatrix):
    """An N:M structured sparse matrix: ``n`` entries kept in every group of ``m``
    consecutive entries along ``axis``.

    Grouping along the contraction axis of the product the matrix serves:
    ``axis=1`` (the default, ``-1``) for ``W @ x``, ``axis=0`` for ``x @ W``. Both
    products work for either axis; the grouped one is the fast one.

    Its leaves are arrays, so values *and* pattern can change under ``jit``.

    Attributes:
      values: the kept entries, of the dense shape with ``shape[axis]`` shrunk to
        ``shape[axis] // m * n`` (``values_shape``, ``(R, S)``); group after group,
        in increasing position. Zeros are allowed (a group with fewer than ``n``
        nonzeros still stores ``n``).
      positions: the position in ``[0, m)`` of each kept entry inside its group
        (strictly increasing within a group), *bit-packed* into ``uint8`` (below).

    The packing of ``positions``:

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
    _value_ndim = 2

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
        n, m = check_nm(n, m)
        axis = check_axis(axis, len(shape))
        if len(shape) != 2:
            raise ValueError(f"NM shape must be 2-D, got {shape}")
        check_divides(shape, m, axis)
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
        """Stored fraction of the matrix, ``n / m``.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.NM.fromdense(jnp.ones((2, 8)), n=1, m=4).density
          0.25
        """
        return self.n / self.m

    @property
    def kernel_config(self) -> tuple[int, int, int]:
        """The static configuration the kernels take: ``(n, m, axis)``.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.NM.fromdense(jnp.ones((8, 2)), n=2, m=4, axis=0).kernel_config
          (2, 4, 0)
        """
        return self.n, self.m, self.axis

    def auto_order(self, op: str):
        """On CPU the native kernels first for ``matmul`` (docs/native.md: faster than
        ``"xla"`` at every measured width) and ``sddmm``, then ``"xla"`` (docs/nm.md: its
        matrix-vector product reads only the stored bytes; for a wider operand it
        decompresses a cache-sized chunk at a time); Pallas in place of XLA on GPU. For
        ``fromdense``, the native pruning on CPU, else ``lax.top_k``.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.NM.fromdense(jnp.ones((4, 8)))
          >>> a.auto_order("matmul")["cpu"], a.auto_order("matmul")["default"]
          (['cpu', 'xla', 'dense'], ['xla', 'dense'])
          >>> a.auto_order("sddmm")["cpu"], a.auto_order("scale")
          (['cpu', 'xla'], ['xla'])
          >>> a.auto_order("fromdense")["cpu"], a.auto_order("fromdense")["default"]
          (['cpu', 'xla'], ['xla'])
        """
        if op == "matmul":
            order = with_pallas(["xla", "dense"])
            order["cpu"] = ["cpu", "xla", "dense"]
            return order
        if op == "sddmm":
            return {"default": ["xla"], "cpu": ["cpu", "xla"]}
        if op == "fromdense":
            return _FROMDENSE_ORDER
        return ["xla"]

    @property
    def values_shape(self) -> tuple[int, int]:
        """Shape of ``values`` and of :attr:`unpacked_positions`.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.NM.fromdense(jnp.ones((4, 8)), n=2, m=4).values_shape
          (4, 4)
        """
        return _values_shape(self.shape, self.n, self.m, self.axis)

    @property
    def position_bits(self) -> int:
        """Bits per packed position: 2 (``m <= 4``), 4 (``m <= 16``) or 8.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.NM.fromdense(jnp.ones((2, 8)), n=2, m=8).position_bits
          4
        """
        return packing.position_bits(self.m)

    @property
    def packed_shape(self) -> tuple[int, int]:
        """Shape of the packed ``positions`` leaf: ``(R, ceil(S / (8 // bits)))``.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.NM.fromdense(jnp.ones((4, 16)), n=2, m=4).packed_shape  # 8 per row
          (4, 2)
        """
        rows, length = self.values_shape
        return rows, packing.packed_length(length, self.m)

    @property
    def unpacked_positions(self) -> jax.Array:
        """The positions as ``uint8`` of :attr:`values_shape`: the position in
        ``[0, m)`` of every stored value inside its group. Shifts and masks only, so
        it works (and fuses) under ``jit``; a ``float0`` cotangent gives ``float0``.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.NM.fromdense(jnp.array([[0.0, 3.0, 0.0, 1.0]]), n=2, m=4)
          >>> a.unpacked_positions.tolist()
          [[1, 3]]
        """
        if is_float0(self.positions):
            return np.zeros(self.values_shape, jax.dtypes.float0)
        return packing.unpack_positions(self.positions, m=self.m, length=self.values_shape[1])

    # ------------------------------------------------------------ validation
    def _validate_static(self) -> None:
        if len(self.shape) != 2:
            raise ValueError(f"NM shape must be 2-D, got {self.shape}")
        check_divides(self.shape, self.m, self.axis)
        check_float_dtype("NM values", self.values.dtype)
        expected = self.values_shape
        if tuple(self.values.shape) != expected:
            raise ValueError(
                f"NM values must have shape {expected} (shape {self.shape} with axis "
                f"{self.axis} shrunk by n/m = {self.n}/{self.m}), got {tuple(self.values.shape)}"
            )
        if is_float0(self.positions):
            return
        if self.positions.dtype != jnp.uint8:
            raise TypeError(
                f"NM packed positions must be uint8, got {jnp.dtype(self.positions.dtype).name}"
            )
        if tuple(self.positions.shape) != self.packed_shape:
            raise ValueError(_packed_shape_message(self, tuple(self.positions.shape)))

    def _check_indices_traced(self) -> None:
        from jax.experimental import checkify

        if is_float0(self.positions) or not self.values_shape[1]:
            return
        n, m = self.n, self.m
        pos = packing.unpack_positions(self.positions, m=m, length=self.values_shape[1])
        pos = pos.astype(jnp.int32)
        bad = pos >= m
        checkify.debug_check(
            ~jnp.any(bad),
            f"NM positions must be in [0, m) = [0, {m}); found {{}} at flat position {{}}",
            pos.reshape(-1)[jnp.argmax(bad.reshape(-1))],
            jnp.argmax(bad.reshape(-1)),
        )
        if n > 1:
            groups = jnp.moveaxis(pos, self.axis, -1).reshape(-1, n)
            unsorted = jnp.any(jnp.diff(groups, axis=1) <= 0, axis=1)
            g = jnp.argmax(unsorted)
            checkify.debug_check(
                ~jnp.any(unsorted),
                "NM positions must be strictly increasing within each group (sorted, no "
                "repeats); group {} has positions {}",
                g,
                groups[g],
            )

    def _validate_concrete(self) -> None:
        if is_float0(self.positions):
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
    def fromdense(
        cls,
        x: jax.typing.ArrayLike,
        *,
        n: int = 2,
        m: int = 4,
        axis: int = -1,
        impl: str = "auto",
    ) -> NM:
        """Prune a dense matrix to N:M: keep the ``n`` entries of largest magnitude in
        every group of ``m`` consecutive entries along ``axis``.

        Ties go to the lower position and NaN ranks above every number, so the result
        is deterministic. Works under ``jit`` (``n``, ``m`` and ``axis`` are static),
        ``vmap``, ``grad`` and ``jvp`` (the values' tangent is the input's at the kept
        positions).

        Args:
          x: dense ``(M, K)`` real floating array.
          n, m: keep ``n`` of every ``m`` (``1 <= n < m <= 256``).
          axis: the grouped axis (0, 1 or -1, -2).
          impl: ``"auto"`` (on CPU the native pruning for float32 / bfloat16 and
            ``m <= 16``, one pass over ``x``; else ``"xla"``), ``"cpu"`` or ``"xla"``
            (``lax.top_k``).

        Returns:
          The N:M matrix, in ``x``'s dtype.

        Raises:
          ValueError: ``n >= m``, ``m`` does not divide ``x.shape[axis]``, a bad axis,
            ``x`` not 2-D, or an ``impl`` that cannot prune ``x``.
          TypeError: ``x`` is not real floating point, or ``impl`` is not a string.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> x = jnp.array([[1.0, 2.0], [-3.0, 0.5], [0.0, 1.0], [4.0, 0.0]])
          >>> a = jsparse.NM.fromdense(x, n=1, m=2, axis=0)  # groups down the columns
          >>> a.values.tolist(), a.todense()[:, 0].tolist()
          ([[-3.0, 2.0], [4.0, 1.0]], [0.0, -3.0, 0.0, 4.0])
        """
        return prune(x, n=n, m=m, axis=axis, impl=impl)[0]

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
        """A random N:M matrix: uniformly random positions, standard-normal values.

        Args:
          key: a PRNG key.
          shape: ``(M, K)``; ``m`` divides ``shape[axis]``.
          n, m, axis: as in :meth:`fromdense`.
          dtype: a floating dtype.

        Raises:
          ValueError: bad ``n``, ``m``, ``axis`` or ``shape``.

        Example:
          >>> import jax, jsparse
          >>> a = jsparse.NM.random(jax.random.key(0), (4, 8), n=2, m=4)
          >>> a.values.shape, bool(jsparse.is_nm(a, 2, 4))
          ((4, 4), True)
        """
        shape = as_shape(shape)
        if len(shape) != 2:
            raise ValueError(f"NM shape must be 2-D, got {shape}")
        n, m = check_nm(n, m)
        axis = check_axis(axis, 2)
        check_divides(shape, m, axis)
        check_float_dtype("NM.random dtype", jnp.dtype(dtype))
        k_pos, k_val = jax.random.split(key)
        _, positions = packing.compress(jax.random.uniform(k_pos, shape), n=n, m=m, axis=axis)
        values = jax.random.normal(k_val, positions.shape, dtype)
        packed = packing.pack_positions(positions, m=m)
        return cls(values, packed, shape=shape, n=n, m=m, axis=axis, packed=True)

    # ------------------------------------------------------------ conversions
    def todense(self) -> jax.Array:
        """The dense matrix: the stored values at their positions, zeros elsewhere.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.NM(jnp.array([[5.0]]), jnp.array([[2]]), shape=(1, 4), n=1, m=4)
          >>> a.todense().tolist()
          [[0.0, 0.0, 5.0, 0.0]]
        """
        return packing.decompress(
            self.values, self.unpacked_positions, n=self.n, m=self.m, axis=self.axis
        )

    def transpose(self) -> NM:
        """The transpose, grouped along the other axis: ``values`` transposed, the
        positions unpacked, transposed and packed again along the new last axis.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> t = jsparse.NM.fromdense(jnp.ones((2, 8)), n=2, m=4).transpose()
          >>> t.shape, t.axis, t.values.shape
          ((8, 2), 0, (4, 2))
        """
        if is_float0(self.positions):
            positions = np.zeros(
                (self.values_shape[1], packing.packed_length(self.values_shape[0], self.m)),
                jax.dtypes.float0,
            )
        else:
            positions = packing.pack_positions(self.unpacked_positions.T, m=self.m)
        return self._replace(
            values=self.values.T,
            positions=positions,
            shape=self.shape[::-1],
            axis=1 - self.axis,
        )

    def to_scipy(self, format: str = "csr"):  # noqa: A002 - scipy's own name
        """Convert to ``scipy.sparse`` (``"csr"`` or ``"bsr"`` with ``(1, 1)`` blocks)
        through :meth:`BCSR.from_format <jsparse.BCSR.from_format>`: every
        structurally stored entry, stored zeros included. Host-only.

        Raises:
          ValueError: an unknown ``format``, or traced arrays (under ``jit``).

        Example:
          >>> import jax, jax.numpy as jnp, jsparse
          >>> s = jsparse.NM.fromdense(jnp.ones((2, 4)), n=2, m=4).to_scipy()
          >>> s.nnz, s.format
          (4, 'csr')
        """
        return BCSR.from_format(self).to_scipy(format)

    def astype(self, dtype: Any) -> NM:
        """The values cast to ``dtype`` (a floating dtype); the positions are kept.

        Raises:
          TypeError: ``dtype`` is not floating point.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.NM.fromdense(jnp.ones((2, 4))).astype(jnp.float16).values.dtype
          dtype('float16')
        """
        check_float_dtype("NM.astype dtype", jnp.dtype(dtype))
        return self._replace(values=self.values.astype(dtype))

    def mask(self) -> jax.Array:
        """The boolean ``(M, K)`` mask of the stored positions.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.NM.fromdense(jnp.array([[0.0, 3.0, 0.0, 1.0]])).mask().tolist()
          [[False, True, False, True]]
        """
        ones = jnp.ones(self.values.shape, jnp.bool_)
        return packing.decompress(ones, self.unpacked_positions, n=self.n, m=self.m, axis=self.axis)

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

        Returns:
          ``(values, metadata)``.

        Raises:
          ValueError: the matrix is not 2:4, not grouped along axis 1, or its number
            of columns is not a multiple of 16.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.NM.fromdense(jnp.tile(jnp.array([0.0, 3.0, 0.0, 1.0]), (2, 4)))
          >>> values, metadata = a.to_2to4_compressed()
          >>> values.shape, metadata.dtype, hex(int(metadata[0, 0]))  # (1, 3): 0b1101
          ((2, 8), dtype('uint16'), '0xdddd')
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

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.NM.from_2to4_compressed(jnp.ones((1, 8)),
          ...                                     jnp.full((1, 1), 0xdddd, jnp.uint16))
          >>> a.shape, a.todense()[0, :4].tolist()
          ((1, 16), [0.0, 1.0, 0.0, 1.0])
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


# ------------------------------------------------------------------ pruning
def prune(
    x: jax.typing.ArrayLike,
    *,
    n: int = 2,
    m: int = 4,
    axis: int = -1,
    impl: str = "auto",
    with_mask: bool = False,
) -> tuple[NM, jax.Array | None]:
    """:meth:`NM.fromdense`, and with ``with_mask`` also the dense ``bool`` keep mask
    (from the same pass: the native pruning writes it beside the values).

    Returns:
      ``(nm, mask)``; ``mask`` is ``None`` without ``with_mask``.

    Raises:
      As :meth:`NM.fromdense`.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.formats.nm.matrix import prune
      >>> a, mask = prune(jnp.array([[1.0, -5.0, 2.0, 0.5]]), with_mask=True)
      >>> a.values.tolist(), mask.tolist()
      ([[-5.0, 2.0]], [[False, True, True, False]])
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"NM.fromdense expects a 2-D array, got shape {x.shape}")
    check_float_dtype("NM.fromdense input", x.dtype)
    n, m = check_nm(n, m)
    axis = check_axis(axis, 2)
    check_divides(x.shape, m, axis)
    check_impl(impl)
    values, packed, mask = _prune(x, n, m, axis, impl, bool(with_mask))
    return _from_parts(values, packed, x.shape, n, m, axis), mask


def _from_parts(values, packed, shape, n, m, axis) -> NM:
    return NM(values, packed, shape=shape, n=n, m=m, axis=axis, packed=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3, 4, 5))
def _prune(x, n, m, axis, impl, with_mask):
    order = _FROMDENSE_ORDER if impl == "auto" else ()
    return run("fromdense", NM, impl, order, x, n=n, m=m, axis=axis, with_mask=with_mask)


@_prune.defjvp
def _prune_jvp(n, m, axis, impl, with_mask, primals, tangents):
    (x,), (dx,) = primals, tangents
    values, packed, mask = _prune(x, n, m, axis, impl, with_mask)
    from jsparse.formats.nm.xla import gather  # the values' tangent: dx at the kept entries

    dvalues = gather(_from_parts(values, packed, x.shape, n, m, axis), dx)
    zero = lambda a: None if a is None else np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731
    return (values, packed, mask), (dvalues, zero(packed), zero(mask))


# ------------------------------------------------------------------ helpers
def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _as_packed(x):
    """The packed leaf as given (``uint8`` is checked by ``_validate_static``)."""
    if is_float0(x) or _is_tracer(x):
        return x
    return jnp.asarray(x)


def _pack_natural(x, expected: tuple[int, int], m: int, n: int, axis: int):
    """Check unpacked positions (shape, dtype and, when concrete, range and order)
    and pack them."""
    if is_float0(x):
        raise TypeError("NM positions: a float0 (cotangent) leaf cannot be packed")
    if not _is_tracer(x):
        x = x if isinstance(x, np.ndarray) else jnp.asarray(x)
    check_index_dtype("NM positions", x.dtype)
    if tuple(x.shape) != expected:
        raise ValueError(
            f"NM positions must have shape {expected} (unpacked: one per value; pass "
            f"packed=True for the packed leaf), got {tuple(x.shape)}"
        )
    if is_concrete(x):
        xs = np.asarray(x)
        if xs.size and (xs.min() < 0 or xs.max() > 255):
            raise ValueError(
                f"NM positions must be in [0, m) with m <= 256 (they are stored as uint8); "
                f"got values in [{xs.min()}, {xs.max()}]"
            )
        # Before packing: an out-of-range position would lose its high bits.
        _check_positions_np(xs.astype(np.int64), n, m, axis)
    return packing.pack_positions(jnp.asarray(x), m=m)


def _unpack_np(packed: np.ndarray, bits: int) -> np.ndarray:
    """NumPy unpacking of every slot (padding included): ``(R, P * 8 // bits)``."""
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    full = (packed.astype(np.uint8)[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return full.reshape(packed.shape[0], packed.shape[1] * per).astype(np.int64)


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


def check_nm(n, m) -> tuple[int, int]:
    try:
        n, m = int(n), int(m)
    except (TypeError, ValueError) as e:
        raise TypeError(f"n and m must be ints, got n={n!r}, m={m!r}") from e
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= n < m, got n={n}, m={m}")
    if m > 256:
        raise ValueError(f"m must be at most 256 (positions are uint8), got m={m}")
    return n, m


def check_axis(axis, ndim: int) -> int:
    try:
        axis = int(axis)
    except (TypeError, ValueError) as e:
        raise TypeError(f"axis must be an int, got {axis!r}") from e
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for a {ndim}-D matrix")
    return axis % ndim


def check_divides(shape, m: int, axis: int) -> None:
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
