"""BCSR: block compressed sparse row matrices, with exact sparse gradients."""

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
from jsparse._xla import bcsr as xla

__all__ = ["BCSR"]


@register_format
@dataclasses.dataclass(frozen=True, init=False, repr=False, eq=False)
class BCSR(AbstractSparseMatrix):
    """A block compressed sparse row (BCSR) matrix.

    The matrix of shape ``(M, K)`` is tiled into blocks of ``block_shape = (bm, bn)``;
    only ``nse`` blocks are stored. Block shape ``(1, 1)`` is plain CSR.

    Note: this is *block* CSR. ``jax.experimental.sparse.BCSR`` is a different
    thing (*batched* CSR, element granularity).

    Leaves (all arrays, so a pattern can change under ``jit``):
      data: ``(nse, bm, bn)`` the stored blocks (a real floating dtype).
      indices: ``(nse,)`` int32, block-column of each stored block.
      indptr: ``(M // bm + 1,)`` int32; the blocks of block-row ``i`` are
        ``data[indptr[i]:indptr[i + 1]]``.

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
    shape: tuple[int, int]

    _leaf_fields = ("data", "indices", "indptr")
    _static_fields = ("shape",)
    _value_fields = ("data",)

    def __init__(self, data, indices, indptr, *, shape: Sequence[int]):
        object.__setattr__(self, "data", _as_leaf(data))
        object.__setattr__(self, "indices", _as_index_leaf(indices))
        object.__setattr__(self, "indptr", _as_index_leaf(indptr))
        object.__setattr__(self, "shape", as_shape(shape))
        self.validate()

    # ------------------------------------------------------------ properties
    @property
    def block_shape(self) -> tuple[int, int]:
        return tuple(self.data.shape[1:])

    @property
    def nse(self) -> int:
        """Number of stored blocks."""
        return self.data.shape[0]

    @property
    def density(self) -> float:
        """Stored fraction of the matrix (stored blocks over all blocks)."""
        nbr, nbc = self._grid
        return self.nse / max(1, nbr * nbc)

    @property
    def _grid(self) -> tuple[int, int]:
        bm, bn = self.block_shape
        return self.shape[0] // bm, self.shape[1] // bn

    @property
    def row_ids(self) -> jax.Array:
        """Block-row of each stored block, ``(nse,)`` int32 (computed from indptr)."""
        return xla.row_ids_from_indptr(self.indptr, self.nse)

    # ------------------------------------------------------------ validation
    def _validate_static(self) -> None:
        if len(self.shape) != 2:
            raise ValueError(f"BCSR shape must be 2-D, got {self.shape}")
        if self.data.ndim != 3:
            raise ValueError(f"BCSR data must have shape (nse, bm, bn), got {self.data.shape}")
        check_float_dtype("BCSR data", self.data.dtype)
        check_index_dtype("BCSR indices", self.indices.dtype)
        check_index_dtype("BCSR indptr", self.indptr.dtype)
        _check_block_shape(self.shape, self.block_shape)
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

    def _validate_concrete(self) -> None:
        if _is_float0(self.indices) or _is_float0(self.indptr):
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

        Raises:
          ValueError: ``block_shape`` does not divide the shape, ``nse`` is out of
            range, or ``nse=None`` with a traced ``x``.
          TypeError: ``x`` is not real floating point.
        """
        x = jnp.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"BCSR.fromdense expects a 2-D array, got shape {x.shape}")
        check_float_dtype("BCSR.fromdense input", x.dtype)
        block_shape = _check_block_shape(x.shape, block_shape)
        bm, bn = block_shape
        nbr, nbc = x.shape[0] // bm, x.shape[1] // bn
        blocks = x.reshape(nbr, bm, nbc, bn).transpose(0, 2, 1, 3)
        if nse is None:
            if not _is_concrete(x):
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

        Raises:
          ValueError: ``density`` outside ``[0, 1]`` or a block shape that does not
            divide ``shape``.
        """
        shape = as_shape(shape)
        if len(shape) != 2:
            raise ValueError(f"BCSR shape must be 2-D, got {shape}")
        if not 0.0 <= float(density) <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        check_float_dtype("BCSR.random dtype", jnp.dtype(dtype))
        bm, bn = _check_block_shape(shape, block_shape)
        nbr, nbc = shape[0] // bm, shape[1] // bn
        nse = int(round(float(density) * nbr * nbc))
        k_pos, k_val = jax.random.split(key)
        _, flat = jax.lax.top_k(jax.random.uniform(k_pos, (nbr * nbc,)), nse)
        rows, cols = _sorted_positions(flat, nbc)
        data = jax.random.normal(k_val, (nse, bm, bn), dtype)
        return cls._from_positions(data, rows, cols, shape)

    @classmethod
    def _from_positions(cls, data, rows, cols, shape) -> BCSR:
        """From blocks at (rows, cols) already sorted row-major."""
        nbr = shape[0] // data.shape[1]
        counts = jnp.bincount(rows, length=nbr).astype(jnp.int32)
        indptr = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])
        return cls(data, cols.astype(jnp.int32), indptr, shape=shape)

    def with_data(self, data: jax.typing.ArrayLike) -> BCSR:
        """The same pattern holding new values ``data`` of shape ``(nse, bm, bn)``."""
        data = jnp.asarray(data)
        if data.shape != self.data.shape:
            raise ValueError(
                f"with_data: new data has shape {data.shape}, the pattern needs {self.data.shape}"
            )
        check_float_dtype("BCSR data", data.dtype)
        return self._replace(data=data)

    # ------------------------------------------------------------ conversions
    def todense(self) -> jax.Array:
        return xla.todense(self.data, self.row_ids, self.indices, shape=self.shape)

    def transpose(self) -> BCSR:
        """The transpose as a BCSR with block shape ``(bn, bm)`` (works under jit)."""
        nbr, nbc = self._grid
        rows, cols = self.row_ids, self.indices.astype(jnp.int32)
        order = jnp.argsort(cols * nbr + rows, stable=True)
        data = jnp.swapaxes(self.data, 1, 2)[order]
        return BCSR._from_positions(data, cols[order], rows[order], self.shape[::-1])

    def astype(self, dtype: Any) -> BCSR:
        check_float_dtype("BCSR.astype dtype", jnp.dtype(dtype))
        return self._replace(data=self.data.astype(dtype))

    @classmethod
    def from_scipy(cls, s, *, block_shape: Sequence[int] | None = None) -> BCSR:
        """From any ``scipy.sparse`` matrix or array (duplicates are summed).

        ``block_shape=None`` keeps a BSR input's block size and uses ``(1, 1)``
        otherwise.
        """
        import scipy.sparse as sp

        if not sp.issparse(s):
            raise TypeError(f"from_scipy expects a scipy.sparse matrix, got {type(s).__name__}")
        if block_shape is None:
            block_shape = s.blocksize if s.format == "bsr" else (1, 1)
        coo = s.tocoo()
        return cls._from_coo(coo.row, coo.col, coo.data, s.shape, block_shape)

    def to_scipy(self, format: str = "bsr"):  # noqa: A002 - scipy's own name
        """Convert to ``scipy.sparse.bsr_array`` (``format="bsr"``) or ``csr_array``."""
        import scipy.sparse as sp

        if format not in ("bsr", "csr"):
            raise ValueError(f"format must be 'bsr' or 'csr', got {format!r}")
        if not self._indices_concrete() or not _is_concrete(self.data):
            raise ValueError("to_scipy needs concrete arrays (call it outside jit)")
        out = sp.bsr_array(
            (np.asarray(self.data), np.asarray(self.indices), np.asarray(self.indptr)),
            shape=self.shape,
            blocksize=self.block_shape,
        )
        return out if format == "bsr" else out.tocsr()

    @classmethod
    def from_bcoo(cls, b, *, block_shape: Sequence[int] = (1, 1)) -> BCSR:
        """From a 2-D ``jax.experimental.sparse.BCOO`` (no batch or dense dims)."""
        from jax.experimental import sparse as jsp

        if not isinstance(b, jsp.BCOO):
            raise TypeError(f"from_bcoo expects a BCOO, got {type(b).__name__}")
        if b.n_batch or b.n_dense or b.ndim != 2:
            raise ValueError(
                f"from_bcoo needs a 2-D BCOO without batch or dense dims, got shape "
                f"{b.shape}, n_batch={b.n_batch}, n_dense={b.n_dense}"
            )
        idx = np.asarray(b.indices)
        return cls._from_coo(idx[:, 0], idx[:, 1], np.asarray(b.data), b.shape, block_shape)

    def to_bcoo(self):
        """Every stored entry (zeros inside stored blocks too) as a ``BCOO``."""
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
        bm, bn = _check_block_shape(shape, block_shape)
        rows, cols, vals = np.asarray(rows), np.asarray(cols), np.asarray(vals)
        keep = (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])
        rows, cols, vals = rows[keep], cols[keep], vals[keep]  # BCOO pads out of range
        nbc = shape[1] // bn
        keys, inverse = np.unique((rows // bm) * nbc + cols // bn, return_inverse=True)
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
def _as_leaf(x):
    if _is_float0(x) or isinstance(x, jax.core.Tracer):
        return x
    return jnp.asarray(x)


def _as_index_leaf(x):
    if _is_float0(x) or isinstance(x, jax.core.Tracer):
        return x
    x = jnp.asarray(x)
    check_index_dtype("BCSR index array", x.dtype)
    return x.astype(jnp.int32)


def _check_block_shape(shape, block_shape) -> tuple[int, int]:
    try:
        bm, bn = (int(b) for b in block_shape)
    except (TypeError, ValueError) as e:
        raise TypeError(f"block_shape must be a pair of ints, got {block_shape!r}") from e
    if bm <= 0 or bn <= 0:
        raise ValueError(f"block_shape must be positive, got {(bm, bn)}")
    if shape[0] % bm or shape[1] % bn:
        raise ValueError(f"block_shape {(bm, bn)} does not divide the shape {tuple(shape)}")
    return bm, bn


def _sorted_positions(flat: jax.Array, nbc: int) -> tuple[jax.Array, jax.Array]:
    flat = jnp.sort(flat.astype(jnp.int32))
    return flat // nbc, flat % nbc


# ---------------------------------------------------------------- ops: matmul
@dataclasses.dataclass(frozen=True)
class Kernels:
    """The array-level kernels one implementation provides (hashable, static).

    ``spmm(data, row_ids, col_ids, x, *, shape, transpose)`` computes ``A @ x`` or
    ``A.T @ x``; ``sddmm(u, v, row_ids, col_ids, *, block_shape)`` computes the
    blocks of ``u @ v.T`` at the stored positions.
    """

    spmm: Callable[..., jax.Array]
    sddmm: Callable[..., jax.Array]


XLA_KERNELS = Kernels(spmm=xla.spmm, sddmm=xla.sddmm)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _spmm(kernels: Kernels, shape, transpose, data, row_ids, col_ids, x):
    return kernels.spmm(data, row_ids, col_ids, x, shape=shape, transpose=transpose)


def _spmm_fwd(kernels, shape, transpose, data, row_ids, col_ids, x):
    y = _spmm(kernels, shape, transpose, data, row_ids, col_ids, x)
    return y, (data, row_ids, col_ids, x)


def _spmm_bwd(kernels, shape, transpose, res, dy):
    data, row_ids, col_ids, x = res
    # y = op(A) @ x  =>  dx = op(A).T @ dy and dA = (dy @ x.T) sampled at A's blocks.
    dx = kernels.spmm(data, row_ids, col_ids, dy, shape=shape, transpose=not transpose)
    u, v = (x, dy) if transpose else (dy, x)
    ddata = kernels.sddmm(u, v, row_ids, col_ids, block_shape=data.shape[1:])
    return ddata.astype(data.dtype), None, None, dx.astype(x.dtype)


_spmm.defvjp(_spmm_fwd, _spmm_bwd)


def spmm_with(kernels: Kernels, a: BCSR, x: jax.Array, *, transpose: bool) -> jax.Array:
    """``op(a) @ x`` through ``kernels`` with the sparse custom VJP."""
    return _spmm(kernels, a.shape, transpose, a.data, a.row_ids, a.indices, x)


@register_impl("matmul", BCSR, "xla")
def _matmul_xla(a: BCSR, x, *, transpose: bool):
    return spmm_with(XLA_KERNELS, a, x, transpose=transpose)


@register_impl("matmul", BCSR, "dense")
def _matmul_dense(a: BCSR, x, *, transpose: bool):
    w = a.todense()
    w = w.T if transpose else w
    return jnp.matmul(w, x, preferred_element_type=jnp.promote_types(x.dtype, jnp.float32)).astype(
        x.dtype
    )


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


def auto_order(a: BCSR) -> list[str]:
    """Implementations ``impl="auto"`` tries for ``a``, best first."""
    if a.density > _dense_threshold(a.block_shape):
        return ["dense", "xla"]
    return ["xla", "dense"]


ops.register_matmul(BCSR, lambda a: with_pallas(auto_order(a)))


# ---------------------------------------------------------------- ops: sddmm
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sddmm(kernels: Kernels, block_shape, row_ids, col_ids, x, yt):
    return kernels.sddmm(x, yt, row_ids, col_ids, block_shape=block_shape)


def _sddmm_fwd(kernels, block_shape, row_ids, col_ids, x, yt):
    out = _sddmm(kernels, block_shape, row_ids, col_ids, x, yt)
    return out, (row_ids, col_ids, x, yt)


def _sddmm_bwd(kernels, block_shape, res, g):
    row_ids, col_ids, x, yt = res
    shape = (x.shape[0], yt.shape[0])
    # out_b = x[r] @ yt[c].T  =>  dx = G @ yt and dyt = G.T @ x, G the blocks g.
    dx = kernels.spmm(g, row_ids, col_ids, yt, shape=shape, transpose=False)
    dyt = kernels.spmm(g, row_ids, col_ids, x, shape=shape, transpose=True)
    return None, None, dx.astype(x.dtype), dyt.astype(yt.dtype)


_sddmm.defvjp(_sddmm_fwd, _sddmm_bwd)


@register_impl("sddmm", BCSR, "xla")
def _sddmm_xla(pattern: BCSR, x, y):
    data = _sddmm(XLA_KERNELS, pattern.block_shape, pattern.row_ids, pattern.indices, x, y.T)
    return pattern._replace(data=data)


@ops._sddmm.register
def _(pattern: BCSR, x, y):
    return run("sddmm", BCSR, "auto", with_pallas(["xla"]), pattern, x, y)


# ---------------------------------------------------------------- ops: elementwise
ops._scale.register(BCSR)(ops.scale_entries)
ops._map_values.register(BCSR)(ops.map_entries)


@ops._add.register
def _(a: BCSR, b: BCSR):
    if a.block_shape != b.block_shape or a.nse != b.nse or not ops.same_indices(a, b):
        raise ValueError(
            "add: BCSR operands must share the same pattern (block shape, indices and "
            f"indptr); got block shapes {a.block_shape} / {b.block_shape} and nse "
            f"{a.nse} / {b.nse}. Under jit, patterns can only be compared when they are "
            "the same arrays; use a.with_data(a.data + b.data) to assert it yourself."
        )
    return ops.add_entries(a, b)
