"""BCSR: block compressed sparse row matrices."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.core.checks import (
    as_index_leaf,
    as_leaf,
    as_shape,
    check_block_shape,
    check_float_dtype,
    check_index_dtype,
    is_concrete,
    is_float0,
)
from jsparse.core.matrix import AbstractSparseMatrix, register_format
from jsparse.formats.bcsr.pattern import BlockPattern, block_pattern, indptr_from_rows

__all__ = ["BCSR"]


@register_format
@dataclasses.dataclass(frozen=True, init=False, repr=False, eq=False)
class BCSR(AbstractSparseMatrix):
    """A block compressed sparse row (BCSR) matrix.

    The matrix of shape ``(M, K)`` is tiled into blocks of ``block_shape = (bm, bn)``;
    only ``nse`` blocks are stored. Block shape ``(1, 1)`` is plain CSR.

    Note: this is *block* CSR. ``jax.experimental.sparse.BCSR`` is a different
    thing (*batched* CSR, element granularity).

    Its leaves are all arrays, so a pattern can change under ``jit``.

    Attributes:
      data: ``(nse, bm, bn)`` the stored blocks (a real floating dtype).
      indices: ``(nse,)`` int32, block-column of each stored block.
      indptr: ``(M // bm + 1,)`` int32; the blocks of block-row ``i`` are
        ``data[indptr[i]:indptr[i + 1]]``.
      row_ids: ``(nse,)`` int32, the block-row of each stored block.
      col_ptr: ``(N // bn + 1,)`` int32, the CSC view: the stored blocks of
        block-column ``j`` are at CSC positions ``col_ptr[j]:col_ptr[j + 1]``.
      col_order: ``(nse,)`` int32, the stored block at each CSC position.

    ``row_ids``, ``col_ptr`` and ``col_order`` are derived from ``indptr`` and
    ``indices`` when the pattern is made (see
    :class:`~jsparse.formats.bcsr.pattern.BlockPattern`), so that no product
    recomputes them.

    Static: ``shape`` (``block_shape`` and ``nse`` follow from ``data``).

    Invariants (checked at construction on concrete index arrays, and by
    :meth:`validate`): ``block_shape`` divides ``shape``; ``indptr`` starts at 0,
    is non-decreasing and ends at ``nse``; within a block-row the block-columns
    are strictly increasing (sorted, no duplicates) and in ``[0, K // bn)``.
    Zero-valued stored blocks are allowed (they pad ``nse`` to a fixed count).

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> x = jnp.arange(16.0).reshape(4, 4) * (jnp.arange(4) < 2)
      >>> a = jsparse.BCSR.fromdense(x, block_shape=(2, 2))
      >>> a.nse, a.block_shape, float(a.density)
      (2, (2, 2), 0.5)
    """

    data: jax.Array
    indices: jax.Array
    indptr: jax.Array
    row_ids: jax.Array
    col_ptr: jax.Array
    col_order: jax.Array
    shape: tuple[int, int]

    _leaf_fields = ("data", "indices", "indptr", "row_ids", "col_ptr", "col_order")
    _static_fields = ("shape",)
    _value_fields = ("data",)
    _value_ndim = 3

    def __init__(self, data, indices, indptr, *, shape: Sequence[int]):
        object.__setattr__(self, "data", as_leaf(data))
        object.__setattr__(self, "indices", as_index_leaf(indices, "BCSR indices"))
        object.__setattr__(self, "indptr", as_index_leaf(indptr, "BCSR indptr"))
        object.__setattr__(self, "shape", as_shape(shape))
        self._validate_static()
        if is_concrete(self.indices) and is_concrete(self.indptr):
            self._validate_concrete()
        nbc = self.shape[1] // self.block_shape[1]
        derived = block_pattern(self.indptr, self.indices, nbc)
        for name, arr in zip(self._leaf_fields[1:], derived, strict=True):
            object.__setattr__(self, name, arr)

    # ------------------------------------------------------------ properties
    @property
    def block_shape(self) -> tuple[int, int]:
        """``(bm, bn)``, the shape of every stored block.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.BCSR.fromdense(jnp.ones((4, 6)), block_shape=(2, 3)).block_shape
          (2, 3)
        """
        return tuple(self.data.shape[1:])

    @property
    def nse(self) -> int:
        """Number of stored blocks.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2)).nse
          2
        """
        return self.data.shape[0]

    @property
    def density(self) -> float:
        """Stored fraction of the matrix (stored blocks over all blocks).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2)).density
          0.5
        """
        nbr, nbc = self._grid
        return self.nse / max(1, nbr * nbc)

    @property
    def _grid(self) -> tuple[int, int]:
        bm, bn = self.block_shape
        return self.shape[0] // bm, self.shape[1] // bn

    @property
    def pattern(self) -> BlockPattern:
        """The index arrays the kernels read (CSR pointer, block-columns, block-rows and
        the CSC view).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> p = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2)).pattern
          >>> p.indptr.tolist(), p.indices.tolist(), p.row_ids.tolist()
          ([0, 1, 2], [0, 1], [0, 1])
        """
        return BlockPattern(*(getattr(self, f) for f in self._leaf_fields[1:]))

    @property
    def kernel_config(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """The static configuration the kernels take: ``(shape, block_shape)``.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2)).kernel_config
          ((4, 4), (2, 2))
        """
        return tuple(self.shape), self.block_shape

    def auto_order(self, op: str):
        """``impl="auto"`` order: dense above a density threshold that grows with the
        block size (docs/benchmarks.md), the XLA scan below it; Pallas in place of XLA
        on GPU/TPU; on CPU the native kernels ahead of XLA (docs/native.md).

        Example:
          >>> import jax, jsparse
          >>> a = jsparse.BCSR.random(jax.random.key(0), (64, 64), density=0.1,
          ...                         block_shape=(32, 32))
          >>> a.auto_order("matmul")["cpu"], a.auto_order("matmul")["cuda"]
          (['cpu', 'xla', 'dense'], ['pallas', 'xla', 'dense'])
        """
        from jsparse.core.registry import with_pallas

        if op == "matmul" and self.density > _dense_threshold(self.block_shape):
            order = with_pallas(["dense", "xla"])
        elif op in ("matmul", "sddmm"):
            order = with_pallas(["xla", "dense"])
        else:
            return ["xla"]
        # On CPU the native kernels (docs/native.md) go ahead of "xla", with their own
        # (higher) density threshold for "dense".
        native_dense = op == "matmul" and self.density > _native_dense_threshold(self.block_shape)
        order["cpu"] = ["dense", "cpu", "xla"] if native_dense else ["cpu", "xla", "dense"]
        return order

    # ------------------------------------------------------------ validation
    def _validate_static(self) -> None:
        if len(self.shape) != 2:
            raise ValueError(f"BCSR shape must be 2-D, got {self.shape}")
        if self.data.ndim != 3:
            raise ValueError(f"BCSR data must have shape (nse, bm, bn), got {self.data.shape}")
        check_float_dtype("BCSR data", self.data.dtype)
        check_index_dtype("BCSR indices", self.indices.dtype)
        check_index_dtype("BCSR indptr", self.indptr.dtype)
        check_block_shape(self.shape, self.block_shape)
        nbr, _ = self._grid
        if self.indices.shape != (self.nse,):
            raise ValueError(
                f"BCSR indices must have shape (nse,) = ({self.nse},) to match data "
                f"{self.data.shape}, got {self.indices.shape}"
            )
        if self.indptr.shape != (nbr + 1,):
            raise ValueError(
                f"BCSR indptr must have shape (M // bm + 1,) = ({nbr + 1},) for shape "
                f"{self.shape} and block shape {self.block_shape}, got {self.indptr.shape}"
            )

    def _check_indices_traced(self) -> None:
        from jax.experimental import checkify

        if is_float0(self.indices) or is_float0(self.indptr):
            return
        nbr, nbc = self._grid
        indptr, indices = self.indptr, self.indices
        checkify.debug_check(
            (indptr[0] == 0) & (indptr[-1] == self.nse),
            f"BCSR indptr must start at 0 and end at nse={self.nse}; got indptr[0]={{}}, "
            "indptr[-1]={}",
            indptr[0],
            indptr[-1],
        )
        if nbr:
            steps = jnp.diff(indptr)
            checkify.debug_check(
                jnp.all(steps >= 0),
                "BCSR indptr must be non-decreasing; it decreases after block-row {}",
                jnp.argmax(steps < 0),
            )
        if self.nse:
            bad = (indices < 0) | (indices >= nbc)
            checkify.debug_check(
                ~jnp.any(bad),
                f"BCSR indices must be block-columns in [0, {nbc}) for shape {self.shape} "
                f"and block shape {self.block_shape}; found {{}} at position {{}}",
                indices[jnp.argmax(bad)],
                jnp.argmax(bad),
            )
        if self.nse > 1:
            same_row = self.row_ids[1:] == self.row_ids[:-1]
            unsorted = same_row & (indices[1:] <= indices[:-1])
            checkify.debug_check(
                ~jnp.any(unsorted),
                "BCSR indices must be strictly increasing within each block-row (sorted, "
                "no duplicates); position {} holds {} after {}",
                jnp.argmax(unsorted) + 1,
                indices[jnp.argmax(unsorted) + 1],
                indices[jnp.argmax(unsorted)],
            )

    def _validate_concrete(self) -> None:
        if is_float0(self.indices) or is_float0(self.indptr):
            return  # a cotangent: the structure lives in the primal
        indptr = np.asarray(self.indptr)
        indices = np.asarray(self.indices)
        nbr, nbc = self._grid
        if indptr[0] != 0 or indptr[-1] != self.nse:
            raise ValueError(
                f"BCSR indptr must start at 0 and end at nse={self.nse}, "
                f"got indptr[0]={indptr[0]}, indptr[-1]={indptr[-1]}"
            )
        steps = np.diff(indptr)
        if np.any(steps < 0):
            row = int(np.argmax(steps < 0))
            raise ValueError(
                f"BCSR indptr must be non-decreasing; indptr[{row}]={indptr[row]} > "
                f"indptr[{row + 1}]={indptr[row + 1]}"
            )
        if indices.size and (indices.min() < 0 or indices.max() >= nbc):
            bad = indices[(indices < 0) | (indices >= nbc)][0]
            raise ValueError(
                f"BCSR indices must be block-columns in [0, {nbc}) for shape {self.shape} "
                f"and block shape {self.block_shape}; found {bad}"
            )
        if indices.size > 1:
            same_row = np.repeat(np.arange(nbr), steps)
            bad = (same_row[1:] == same_row[:-1]) & (indices[1:] <= indices[:-1])
            if np.any(bad):
                pos = int(np.argmax(bad))
                raise ValueError(
                    f"BCSR indices must be strictly increasing within each block-row "
                    f"(sorted, no duplicates); block-row {same_row[pos]} has "
                    f"{indices[pos]} followed by {indices[pos + 1]}"
                )

    # ------------------------------------------------------------ construction
    @classmethod
    def fromdense(
        cls,
        x: jax.typing.ArrayLike,
        *,
        block_shape: Sequence[int] = (1, 1),
        nse: int | None = None,
    ) -> BCSR:
        """Build a BCSR from a dense matrix.

        Args:
          x: dense ``(M, K)`` real floating array.
          block_shape: ``(bm, bn)``, must divide ``x.shape``.
          nse: ``None`` stores every block holding a nonzero (``x`` must be
            concrete). An integer keeps the ``nse`` blocks of largest Frobenius norm
            (ties: first in row-major order; zero blocks pad when fewer are
            nonzero); this form works under ``jit``.

        Returns:
          A canonical BCSR (sorted, no duplicate blocks) in ``x``'s dtype.

        Raises:
          ValueError: ``block_shape`` does not divide the shape, ``nse`` is out of
            range, or ``nse=None`` with a traced ``x``.
          TypeError: ``x`` is not real floating point.

        Example:
          >>> import jax, jax.numpy as jnp, jsparse
          >>> x = jnp.arange(16.0).reshape(4, 4)
          >>> jsparse.BCSR.fromdense(x, block_shape=(2, 2), nse=1).indices.tolist()
          [1]
          >>> jax.jit(lambda x: jsparse.BCSR.fromdense(x, block_shape=(2, 2), nse=2))(x).nse
          2
        """
        x = jnp.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"BCSR.fromdense expects a 2-D array, got shape {x.shape}")
        check_float_dtype("BCSR.fromdense input", x.dtype)
        block_shape = check_block_shape(x.shape, block_shape)
        bm, bn = block_shape
        nbr, nbc = x.shape[0] // bm, x.shape[1] // bn
        blocks = x.reshape(nbr, bm, nbc, bn).transpose(0, 2, 1, 3)
        if nse is None:
            if not is_concrete(x):
                raise ValueError(
                    "BCSR.fromdense(x) with nse=None needs a concrete x (the number of "
                    "stored blocks must be static); pass nse=... under jit"
                )
            rows, cols = np.nonzero(np.asarray(jnp.any(blocks != 0, axis=(2, 3))))
            rows, cols = jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)
        else:
            nse = int(nse)
            if not 0 <= nse <= nbr * nbc:
                raise ValueError(
                    f"nse must be in [0, {nbr * nbc}] (the number of {block_shape} blocks "
                    f"in {x.shape}), got {nse}"
                )
            norms = jnp.sum(jnp.square(blocks.astype(jnp.float32)), axis=(2, 3))
            _, flat = jax.lax.top_k(norms.reshape(-1), nse)
            rows, cols = _sorted_positions(flat, nbc)
        return cls._from_positions(blocks[rows, cols], rows, cols, x.shape)

    @classmethod
    def random(
        cls,
        key: jax.Array,
        shape: Sequence[int],
        *,
        density: float,
        block_shape: Sequence[int] = (1, 1),
        dtype: Any = jnp.float32,
    ) -> BCSR:
        """A random BCSR: ``round(density * nblocks)`` blocks at uniformly random
        positions, standard-normal values.

        Args:
          key: a PRNG key.
          shape: ``(M, K)``.
          density: the stored fraction of blocks, in ``[0, 1]``.
          block_shape: ``(bm, bn)``, must divide ``shape``.
          dtype: a floating dtype.

        Raises:
          ValueError: ``density`` outside ``[0, 1]`` or a block shape that does not
            divide ``shape``.

        Example:
          >>> import jax, jsparse
          >>> a = jsparse.BCSR.random(jax.random.key(0), (8, 8), density=0.25,
          ...                         block_shape=(2, 2))
          >>> a.nse, a.data.shape
          (4, (4, 2, 2))
        """
        shape = as_shape(shape)
        if len(shape) != 2:
            raise ValueError(f"BCSR shape must be 2-D, got {shape}")
        if not 0.0 <= float(density) <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        check_float_dtype("BCSR.random dtype", jnp.dtype(dtype))
        bm, bn = check_block_shape(shape, block_shape)
        nbr, nbc = shape[0] // bm, shape[1] // bn
        nse = int(round(float(density) * nbr * nbc))
        k_pos, k_val = jax.random.split(key)
        _, flat = jax.lax.top_k(jax.random.uniform(k_pos, (nbr * nbc,)), nse)
        rows, cols = _sorted_positions(flat, nbc)
        data = jax.random.normal(k_val, (nse, bm, bn), dtype)
        return cls._from_positions(data, rows, cols, shape)

    @classmethod
    def eye(cls, n: int, *, block_size: int = 1, dtype: Any = jnp.float32) -> BCSR:
        """The ``n x n`` identity, stored as ``n // block_size`` diagonal blocks.

        Args:
          n: the size.
          block_size: the (square) block size; must divide ``n``.
          dtype: a real floating dtype.

        Returns:
          A BCSR of shape ``(n, n)`` and block shape ``(block_size, block_size)``.

        Raises:
          ValueError: a negative ``n`` or a ``block_size`` that does not divide it.
          TypeError: a non-floating ``dtype``.

        Example:
          >>> import jsparse
          >>> a = jsparse.BCSR.eye(4, block_size=2)
          >>> a.nse, a.todense()[3].tolist()
          (2, [0.0, 0.0, 0.0, 1.0])
        """
        (n,) = as_shape((n,), "n")
        check_float_dtype("BCSR.eye dtype", jnp.dtype(dtype))
        b = check_block_shape((n, n), (block_size, block_size))[0]
        nb = n // b
        data = jnp.broadcast_to(jnp.eye(b, dtype=dtype), (nb, b, b))
        ids = jnp.arange(nb, dtype=jnp.int32)
        return cls._from_positions(data, ids, ids, (n, n))

    def block_rows(self, start: int, stop: int) -> BCSR:
        """The block-rows ``start:stop`` as a BCSR of shape
        ``((stop - start) * bm, K)`` (``start``, ``stop`` static ints with
        ``0 <= start <= stop <= M // bm``).

        The pattern must be concrete (the number of blocks kept depends on it); the
        values may be traced (``grad`` through ``a.with_values(v).block_rows(...)``).

        Raises:
          ValueError: indices out of range, or a traced pattern (under ``jit``).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
          >>> a.block_rows(1, 2).todense().tolist()
          [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
        """
        nbr, _ = self._grid
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= nbr):
            raise ValueError(
                f"block_rows needs ints 0 <= start <= stop <= {nbr} (block-rows of shape "
                f"{self.shape} with block shape {self.block_shape}), got {start!r}, {stop!r}"
            )
        if not is_concrete(self.indptr):
            raise ValueError(
                "block_rows needs a concrete pattern (call it outside jit): the number "
                "of blocks it keeps depends on indptr"
            )
        indptr = np.asarray(self.indptr)
        lo, hi = int(indptr[start]), int(indptr[stop])
        shape = ((stop - start) * self.block_shape[0], self.shape[1])
        return BCSR(self.data[lo:hi], self.indices[lo:hi], indptr[start : stop + 1] - lo,
                    shape=shape)  # fmt: skip

    @classmethod
    def _from_positions(cls, data, rows, cols, shape) -> BCSR:
        """From blocks at (rows, cols) already sorted row-major."""
        indptr = indptr_from_rows(rows, shape[0] // data.shape[1])
        return cls(data, cols.astype(jnp.int32), indptr, shape=shape)

    @classmethod
    def from_positions(cls, data, rows, cols, *, shape: Sequence[int]) -> BCSR:
        """From blocks ``data (nse, bm, bn)`` at block positions ``(rows, cols)`` sorted
        row-major (strictly increasing columns within a row); works under ``jit``.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.from_positions(jnp.ones((2, 2, 2)), jnp.array([0, 1]),
          ...                                 jnp.array([1, 0]), shape=(4, 4))
          >>> a.todense()[0].tolist()
          [0.0, 0.0, 1.0, 1.0]
        """
        return cls._from_positions(
            jnp.asarray(data), jnp.asarray(rows), jnp.asarray(cols), as_shape(shape, ndim=2)
        )

    # ------------------------------------------------------------ conversions
    def todense(self) -> jax.Array:
        """The dense ``(M, K)`` matrix (the stored blocks scattered into zeros).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.from_positions(jnp.ones((1, 1, 2)), jnp.array([1]),
          ...                                 jnp.array([0]), shape=(2, 2))
          >>> a.todense().tolist()
          [[0.0, 0.0], [1.0, 1.0]]
        """
        return _scatter_blocks(self.data, self.row_ids, self.indices, shape=self.shape)

    def transpose(self) -> BCSR:
        """The transpose as a BCSR with block shape ``(bn, bm)`` (works under jit).

        The CSC view of the pattern is the transpose's CSR, and the CSR the
        transpose's CSC view: nothing is sorted.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.triu(jnp.ones((4, 4))), block_shape=(2, 2))
          >>> t = a.transpose()
          >>> t.block_shape, bool((t.todense() == a.todense().T).all())
          ((2, 2), True)
        """
        order = self.col_order
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(self.nse, dtype=order.dtype))
        return self._tree_unflatten(
            (tuple(self.shape[::-1]),),
            [
                jnp.swapaxes(self.data, 1, 2)[order],
                self.row_ids[order],
                self.col_ptr,
                self.indices[order],
                self.indptr,
                inverse,
            ],
        )

    def astype(self, dtype: Any) -> BCSR:
        """The blocks cast to ``dtype`` (a floating dtype); the pattern is kept.

        Raises:
          TypeError: ``dtype`` is not floating point.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.eye(2)).astype(jnp.bfloat16)
          >>> a.data.dtype, a.indices.dtype
          (dtype(bfloat16), dtype('int32'))
        """
        check_float_dtype("BCSR.astype dtype", jnp.dtype(dtype))
        return self._replace(data=self.data.astype(dtype))

    @classmethod
    def from_scipy(cls, s, *, block_shape: Sequence[int] | None = None) -> BCSR:
        """From any ``scipy.sparse`` matrix or array (duplicates are summed).

        ``block_shape=None`` keeps a BSR input's block size and uses ``(1, 1)``
        otherwise.

        Raises:
          TypeError: ``s`` is not a ``scipy.sparse`` matrix.
          ValueError: ``block_shape`` does not divide the shape.

        Example:
          >>> import scipy.sparse as sp, jsparse
          >>> a = jsparse.BCSR.from_scipy(sp.eye(4, format="csr"), block_shape=(2, 2))
          >>> a.nse, a.block_shape
          (2, (2, 2))
        """
        import scipy.sparse as sp

        if not sp.issparse(s):
            raise TypeError(f"from_scipy expects a scipy.sparse matrix, got {type(s).__name__}")
        if block_shape is None:
            block_shape = s.blocksize if s.format == "bsr" else (1, 1)
        coo = s.tocoo()
        return cls._from_coo(coo.row, coo.col, coo.data, s.shape, block_shape)

    @classmethod
    def from_format(cls, a: AbstractSparseMatrix) -> BCSR:
        """Any format's structurally stored entries (stored zeros kept) as a CSR
        (``(1, 1)`` blocks); host-only: ``a``'s arrays must be concrete.

        Raises:
          TypeError: ``a`` is not a jsparse format.
          ValueError: traced arrays (under ``jit``).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.NM.fromdense(jnp.array([[0.0, 3.0, 0.0, 1.0]]), n=2, m=4)
          >>> jsparse.BCSR.from_format(a).indices.tolist()
          [1, 3]
        """
        from jsparse.core.nonfinite import stored_mask

        if not isinstance(a, AbstractSparseMatrix):
            raise TypeError(f"from_format expects a jsparse format, got {type(a).__name__}")
        leaves = jax.tree_util.tree_leaves(a)
        if not all(is_concrete(x) for x in leaves):
            raise ValueError(
                f"{type(a).__name__} to BCSR/scipy needs concrete arrays (call it outside "
                "jit): the number of stored entries must be static"
            )
        rows, cols = np.nonzero(np.asarray(stored_mask(a)))
        dense = np.asarray(a.todense())
        data = jnp.asarray(dense[rows, cols].reshape(-1, 1, 1))
        return cls._from_positions(
            data, jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32), tuple(a.shape)
        )

    def to_scipy(self, format: str = "bsr"):  # noqa: A002 - scipy's own name
        """Convert to ``scipy.sparse.bsr_array`` (``format="bsr"``) or ``csr_array``.

        Stored zeros inside blocks are kept as explicit entries.

        Raises:
          ValueError: an unknown ``format``, or traced arrays (under ``jit``).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> s = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2)).to_scipy()
          >>> s.format, s.blocksize, float(s.toarray()[3, 3])
          ('bsr', (2, 2), 1.0)
        """
        import scipy.sparse as sp

        if format not in ("bsr", "csr"):
            raise ValueError(f"format must be 'bsr' or 'csr', got {format!r}")
        if not self._indices_concrete() or not is_concrete(self.data):
            raise ValueError("to_scipy needs concrete arrays (call it outside jit)")
        out = sp.bsr_array(
            (np.asarray(self.data), np.asarray(self.indices), np.asarray(self.indptr)),
            shape=self.shape,
            blocksize=self.block_shape,
        )
        return out if format == "bsr" else out.tocsr()

    @classmethod
    def from_bcoo(cls, b, *, block_shape: Sequence[int] = (1, 1)) -> BCSR:
        """From a 2-D ``jax.experimental.sparse.BCOO`` (no batch or dense dims).

        Duplicates are summed; entries padded out of range (as BCOO pads) are dropped.

        Raises:
          TypeError: ``b`` is not a BCOO, or holds complex values.
          ValueError: ``b`` has batch or dense dimensions, or is not 2-D, or its arrays
            are traced (under ``jit``: the pattern's size must be static).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> from jax.experimental import sparse
          >>> b = sparse.BCOO.fromdense(jnp.eye(4))
          >>> jsparse.BCSR.from_bcoo(b, block_shape=(2, 2)).nse
          2
        """
        from jax.experimental import sparse as jsp

        if not isinstance(b, jsp.BCOO):
            raise TypeError(f"from_bcoo expects a BCOO, got {type(b).__name__}")
        if b.n_batch or b.n_dense or b.ndim != 2:
            raise ValueError(
                f"from_bcoo needs a 2-D BCOO without batch or dense dims, got shape "
                f"{b.shape}, n_batch={b.n_batch}, n_dense={b.n_dense}"
            )
        if not (is_concrete(b.indices) and is_concrete(b.data)):
            raise ValueError(
                "from_bcoo needs concrete arrays (call it outside jit): the number of "
                "stored blocks depends on the BCOO's indices"
            )
        idx = np.asarray(b.indices)
        return cls._from_coo(idx[:, 0], idx[:, 1], np.asarray(b.data), b.shape, block_shape)

    def to_bcoo(self):
        """Every stored entry (zeros inside stored blocks too) as a ``BCOO``.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> b = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2)).to_bcoo()
          >>> b.nse, b.todense()[1, 1].item()
          (8, 1.0)
        """
        from jax.experimental import sparse as jsp

        bm, bn = self.block_shape
        i, j = jnp.meshgrid(jnp.arange(bm), jnp.arange(bn), indexing="ij")
        rows = self.row_ids[:, None, None] * bm + i
        cols = self.indices.astype(jnp.int32)[:, None, None] * bn + j
        idx = jnp.stack([rows.ravel(), cols.ravel()], axis=1)
        return jsp.BCOO((self.data.reshape(-1), idx), shape=self.shape)

    @classmethod
    def _from_coo(cls, rows, cols, vals, shape, block_shape) -> BCSR:
        shape = as_shape(shape)
        bm, bn = check_block_shape(shape, block_shape)
        rows, cols, vals = np.asarray(rows), np.asarray(cols), np.asarray(vals)
        keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        rows, cols, vals = rows[keep], cols[keep], vals[keep]  # BCOO pads out of range
        nbc = shape[1] // bn
        keys, inverse = np.unique((rows // bm) * nbc + cols // bn, return_inverse=True)
        if np.iscomplexobj(vals):
            check_float_dtype("BCSR import values", vals.dtype)  # raises: real only
        if not np.issubdtype(vals.dtype, np.floating):
            vals = vals.astype(np.float32)
        data = np.zeros((keys.size, bm, bn), vals.dtype)
        np.add.at(data, (inverse.ravel(), rows % bm, cols % bn), vals)
        return cls._from_positions(
            jnp.asarray(data),
            jnp.asarray(keys // nbc, jnp.int32),
            jnp.asarray(keys % nbc, jnp.int32),
            shape,
        )


# ---------------------------------------------------------------- helpers
# Above this stored fraction the dense matmul wins on CPU (docs/benchmarks.md).
# The scan pays a fixed cost per step, so small blocks need sparser patterns.
def _dense_threshold(block_shape: tuple[int, int]) -> float:
    elements = block_shape[0] * block_shape[1]
    if elements >= 4096:
        return 0.4
    if elements >= 1024:
        return 0.3
    if elements >= 256:
        return 0.15
    return 0.02


def _native_dense_threshold(block_shape: tuple[int, int]) -> float:
    """Where the native kernels stop beating the dense path (docs/native.md: measured
    2048² @ 2048×512 float32; 8×8 and larger blocks cross near 75% density)."""
    elements = block_shape[0] * block_shape[1]
    if elements >= 64:
        return 0.75
    if elements >= 16:
        return 0.45
    if elements >= 4:
        return 0.25
    return 0.17


def _sorted_positions(flat: jax.Array, nbc: int) -> tuple[jax.Array, jax.Array]:
    flat = jnp.sort(flat.astype(jnp.int32))
    return flat // nbc, flat % nbc


@functools.partial(jax.jit, static_argnames=("shape",))
def _scatter_blocks(
    data: jax.Array, row_ids: jax.Array, col_ids: jax.Array, *, shape: tuple[int, int]
) -> jax.Array:
    """Scatter the stored blocks into a dense ``shape`` array.

    The blocks are written straight into the ``(nbr, bm, nbc, bn)`` view of the
    output with a ``set`` scatter (positions are unique in a canonical BCSR): this is
    several times faster on CPU than an ``add`` scatter followed by a transpose, which
    matters because ``impl="dense"`` densifies on every call. Declaring the positions
    unique also makes it linear-transposable (``jax.linear_transpose``; a gather).
    """
    _, bm, bn = data.shape
    nbr, nbc = shape[0] // bm, shape[1] // bn
    out = jnp.zeros((nbr, bm, nbc, bn), data.dtype)
    out = out.at[row_ids, :, col_ids, :].set(data, unique_indices=True)
    return out.reshape(shape)
