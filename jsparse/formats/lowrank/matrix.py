"""LowRankSparse: a low-rank matrix plus a block-sparse one, ``A = U @ V + S``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.core.checks import (
    as_leaf,
    as_shape,
    check_block_shape,
    check_float_dtype,
    is_float0,
)
from jsparse.core.linalg import relative_error, thin_svd
from jsparse.core.matrix import AbstractSparseMatrix, register_format
from jsparse.formats.bcsr.matrix import BCSR
from jsparse.formats.monarch.matrix import FLOP_RATIO_MAX

__all__ = ["LowRankSparse", "check_rank"]

# S's leaves, stored flat on the LowRankSparse as ``S_<leaf>``.
_S_FIELDS = tuple("S_" + f for f in BCSR._leaf_fields)


@register_format
@dataclasses.dataclass(frozen=True, init=False, repr=False, eq=False)
class LowRankSparse(AbstractSparseMatrix):
    """``A = U @ V + S``: a rank-``r`` part and a block-sparse part, shape ``(m, n)``.

    Leaves: ``U (m, r)``, ``V (r, n)`` and the leaves of the :class:`BCSR` ``S``
    stored flat as ``S_data``, ``S_indices``, ``S_indptr``, ``S_row_ids``,
    ``S_col_ptr``, ``S_col_order`` (so that every leaf-level tool, ``in_axes``
    prefixes and ``_replace`` see one flat list; the :attr:`S` property rebuilds the
    BCSR view). Values: ``U``, ``V``, ``S_data``; the rest are indices (they get
    ``float0`` cotangents). Static: ``shape``.

    Matmul: ``A @ x = U @ (V @ x) + S @ x`` and ``x @ A = (x @ U) @ V + x @ S``;
    ``2 * r * (m + n) + 2 * nse * bm * bn`` FLOPs per dense column.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> u = jnp.ones((6, 1)); v = jnp.ones((1, 4))
      >>> s = jsparse.BCSR.fromdense(jnp.eye(6, 4))
      >>> a = jsparse.LowRankSparse(u, v, s)
      >>> a.rank, a.S.nse, float(a.todense()[0, 0])
      (1, 4, 2.0)
    """

    U: jax.Array
    V: jax.Array
    S_data: jax.Array
    S_indices: jax.Array
    S_indptr: jax.Array
    S_row_ids: jax.Array
    S_col_ptr: jax.Array
    S_col_order: jax.Array
    shape: tuple[int, int]

    _leaf_fields = ("U", "V", *_S_FIELDS)
    _static_fields = ("shape",)
    _value_fields = ("U", "V", "S_data")
    _value_ndim = 2

    def __init__(self, U: jax.typing.ArrayLike, V: jax.typing.ArrayLike, S: BCSR | None = None):  # noqa: N803
        """Build from ``U (m, r)``, ``V (r, n)`` and a :class:`BCSR` ``S (m, n)``.

        ``S=None`` stores no sparse part (an empty ``(1, 1)``-block BCSR).

        Raises:
          ValueError: the shapes of ``U``, ``V`` and ``S`` disagree (the message names
            them all).
          TypeError: ``S`` is not a BCSR, or the dtypes are not one floating dtype.
        """
        U, V = as_leaf(U), as_leaf(V)  # noqa: N806
        if U.ndim != 2 or V.ndim != 2:
            raise ValueError(
                f"LowRankSparse needs 2-D U (m, r) and V (r, n), got U {U.shape} and V {V.shape}"
            )
        shape = (U.shape[0], V.shape[1])
        if S is None:
            S = BCSR(  # noqa: N806
                jnp.zeros((0, 1, 1), U.dtype),
                jnp.zeros((0,), jnp.int32),
                jnp.zeros((shape[0] + 1,), jnp.int32),
                shape=shape,
            )
        if not isinstance(S, BCSR):
            raise TypeError(f"LowRankSparse S must be a jsparse.BCSR, got {type(S).__name__}")
        if tuple(S.shape) != shape:
            raise ValueError(
                f"LowRankSparse S has shape {tuple(S.shape)}, but U {U.shape} @ V {V.shape} "
                f"has shape {shape}"
            )
        object.__setattr__(self, "U", U)
        object.__setattr__(self, "V", V)
        for name, field in zip(_S_FIELDS, BCSR._leaf_fields, strict=True):
            object.__setattr__(self, name, getattr(S, field))
        object.__setattr__(self, "shape", shape)
        self.validate()

    # ------------------------------------------------------------ properties
    @property
    def S(self) -> BCSR:  # noqa: N802
        """The sparse part as a :class:`BCSR` (a view on the stored leaves).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.LowRankSparse(jnp.ones((4, 1)), jnp.ones((1, 4)),
          ...                           jsparse.BCSR.fromdense(jnp.eye(4)))
          >>> type(a.S).__name__, a.S.nse
          ('BCSR', 4)
        """
        return BCSR._tree_unflatten((self.shape,), [getattr(self, f) for f in _S_FIELDS])

    @property
    def rank(self) -> int:
        """``r``, the number of columns of ``U`` (rows of ``V``).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> jsparse.LowRankSparse(jnp.ones((4, 2)), jnp.ones((2, 3))).rank
          2
        """
        return self.U.shape[1]

    def auto_order(self, op: str):
        """The factored product unless it does more work than one dense dot. (``S``'s
        own product chooses its implementation by ``S``'s pattern.)

        Example:
          >>> import jax, jsparse
          >>> a = jsparse.LowRankSparse.random(jax.random.key(0), (32, 32), rank=2,
          ...                                  density=0.05)
          >>> a.auto_order("matmul")
          ['factored', 'dense']
        """
        if op != "matmul":
            return ["xla"]
        m, n = self.shape
        if self.nstored <= FLOP_RATIO_MAX * m * n:
            return ["factored", "dense"]
        return ["dense", "factored"]

    # ------------------------------------------------------------ validation
    def _validate_static(self) -> None:
        U, V, shape = self.U, self.V, self.shape  # noqa: N806
        if U.ndim != 2 or V.ndim != 2:
            raise ValueError(
                f"LowRankSparse needs 2-D U (m, r) and V (r, n), got U {U.shape} and V {V.shape}"
            )
        if U.shape[1] != V.shape[0]:
            raise ValueError(
                f"LowRankSparse rank mismatch: U {U.shape} has {U.shape[1]} columns but "
                f"V {V.shape} has {V.shape[0]} rows"
            )
        if tuple(shape) != (U.shape[0], V.shape[1]):
            raise ValueError(
                f"LowRankSparse shape {tuple(shape)} does not match U {U.shape} @ V {V.shape}"
            )
        S = self.S  # noqa: N806
        S._validate_static()
        for name in self._value_fields:
            check_float_dtype(f"LowRankSparse {name}", getattr(self, name).dtype)
        values = [getattr(self, f) for f in self._value_fields]
        dtypes = {v.dtype for v in values if not is_float0(v)}
        if len(dtypes) > 1:
            raise TypeError(
                f"LowRankSparse U, V and S must share one dtype, got U {U.dtype}, "
                f"V {V.dtype} and S {S.data.dtype}"
            )

    def _check_indices_traced(self) -> None:
        self.S._check_indices_traced()

    def _validate_concrete(self) -> None:
        self.S._validate_concrete()

    # ------------------------------------------------------------ construction
    @classmethod
    def random(
        cls,
        key: jax.Array,
        shape,
        *,
        rank: int,
        density: float,
        block_shape=(1, 1),
        dtype: Any = jnp.float32,
    ) -> LowRankSparse:
        """Random parts: ``U``, ``V`` with ``N(0, 1/sqrt(r))`` entries (so ``U @ V``
        has unit-variance entries) and ``S = BCSR.random(...)`` (standard normal).

        Args:
          key: a PRNG key.
          shape: ``(m, n)``.
          rank: ``r`` in ``[0, min(m, n)]``.
          density, block_shape: ``S``'s, as in :meth:`jsparse.BCSR.random`.
          dtype: a floating dtype.

        Raises:
          ValueError: a bad shape, rank, density or block shape.
          TypeError: a non-integer rank or a non-floating dtype.

        Example:
          >>> import jax, jsparse
          >>> a = jsparse.LowRankSparse.random(jax.random.key(0), (8, 6), rank=2,
          ...                                  density=0.5, block_shape=(2, 2))
          >>> a.U.shape, a.V.shape, a.S.nse
          ((8, 2), (2, 6), 6)
        """
        m, n = _check_shape(shape)
        rank = check_rank(rank, (m, n))
        check_float_dtype("LowRankSparse.random dtype", jnp.dtype(dtype))
        ku, kv, ks = jax.random.split(key, 3)
        scale = 1.0 / np.sqrt(np.sqrt(max(rank, 1)))
        U = jax.random.normal(ku, (m, rank), dtype) * jnp.asarray(scale, dtype)  # noqa: N806
        V = jax.random.normal(kv, (rank, n), dtype) * jnp.asarray(scale, dtype)  # noqa: N806
        S = BCSR.random(ks, (m, n), density=density, block_shape=block_shape, dtype=dtype)  # noqa: N806
        return cls(U, V, S)

    @classmethod
    def fromdense(
        cls,
        x: jax.typing.ArrayLike,
        *,
        rank: int,
        nse: int | None = None,
        density: float | None = None,
        block_shape=(1, 1),
        iters: int = 10,
        return_error: bool = False,
    ) -> LowRankSparse | tuple[LowRankSparse, jax.Array]:
        """Approximate ``x`` by a rank-``rank`` matrix plus ``nse`` blocks.

        Alternating projections (GoDec-style, exact steps): the low-rank part is the
        truncated SVD of ``x - S``, the sparse part the ``nse`` largest-Frobenius-norm
        blocks of ``x - U @ V``. Two starts are tried (SVD first; sparse first) and
        the better one is refined for ``iters`` rounds. Each step can only lower the
        error, so the result is never worse than the best rank-``rank`` matrix alone
        nor than the best ``nse``-block matrix alone. Works under ``jit`` (all sizes
        are static); uses full SVDs, ``O(m n min(m, n))`` each.

        Args:
          x: dense ``(m, n)`` floating array.
          rank: ``r`` in ``[0, min(m, n)]``.
          nse: number of stored blocks of ``S``; or
          density: the stored fraction of blocks (``round(density * nblocks)``).
            Exactly one of ``nse`` and ``density`` must be given.
          block_shape: ``S``'s block shape, must divide ``x.shape``.
          iters: refinement rounds (each one SVD).
          return_error: also return the relative error ``||x - A||_F / ||x||_F``.

        Returns:
          The ``LowRankSparse`` ``A`` (``x``'s dtype; ``U = u sqrt(s)``,
          ``V = sqrt(s) v^T``), or ``(A, rel_error)``.

        Raises:
          ValueError: ``x`` is not 2-D; ``rank``, ``nse``, ``density``, ``iters`` or
            ``block_shape`` out of range (the message names the shape).
          TypeError: ``x`` is not floating point.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> x = jnp.ones((6, 6)) + 5 * jnp.eye(6)  # rank 1 plus a diagonal
          >>> a, err = jsparse.LowRankSparse.fromdense(x, rank=1, nse=6, return_error=True)
          >>> a.rank, a.S.nse, float(err) < 1e-5
          (1, 6, True)
        """
        x = jnp.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"LowRankSparse.fromdense expects a 2-D array, got shape {x.shape}")
        check_float_dtype("LowRankSparse.fromdense input", x.dtype)
        rank = check_rank(rank, x.shape)
        bm, bn = check_block_shape(x.shape, block_shape)
        total = (x.shape[0] // bm) * (x.shape[1] // bn)
        nse = _resolve_nse(nse, density, total, x.shape, (bm, bn))
        if isinstance(iters, bool) or not isinstance(iters, int | np.integer) or iters < 0:
            raise ValueError(f"iters must be a non-negative int, got {iters!r}")
        U, V, S, err = _decompose(x, rank=rank, nse=nse, block_shape=(bm, bn), iters=int(iters))  # noqa: N806
        out = cls(U, V, S)
        return (out, err) if return_error else out

    # ------------------------------------------------------------ conversions
    def todense(self) -> jax.Array:
        """``U @ V + S`` as a dense array (accumulated in float32).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.LowRankSparse(jnp.ones((2, 1)), jnp.ones((1, 2)),
          ...                           jsparse.BCSR.fromdense(jnp.eye(2)))
          >>> a.todense().tolist()
          [[2.0, 1.0], [1.0, 2.0]]
        """
        acc = jnp.promote_types(self.dtype, jnp.float32)
        # Both operands contract their minor axis, so the transpose runs the same dot
        # with swapped operands: ``a.T.todense() == a.todense().T`` exactly.
        low = jax.lax.dot_general(
            self.U, self.V.T, (((1,), (1,)), ((), ())), preferred_element_type=acc
        )
        return (low + self.S.todense().astype(acc)).astype(self.dtype)

    def transpose(self) -> LowRankSparse:
        """``V.T @ U.T + S.T``: the factors swapped and transposed, ``S`` transposed.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> t = jsparse.LowRankSparse(jnp.ones((4, 1)), jnp.ones((1, 2))).transpose()
          >>> t.shape, t.U.shape, t.V.shape
          ((2, 4), (2, 1), (1, 4))
        """
        st = self.S.transpose()
        return self._replace(
            U=self.V.T,
            V=self.U.T,
            shape=self.shape[::-1],
            **{name: getattr(st, f) for name, f in zip(_S_FIELDS, BCSR._leaf_fields, strict=True)},
        )

    def astype(self, dtype: Any) -> LowRankSparse:
        """``U``, ``V`` and ``S``'s blocks cast to ``dtype`` (a floating dtype).

        Raises:
          TypeError: ``dtype`` is not floating point.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.LowRankSparse(jnp.ones((2, 1)), jnp.ones((1, 2)))
          >>> a.astype(jnp.bfloat16).S_data.dtype
          dtype(bfloat16)
        """
        check_float_dtype("LowRankSparse.astype dtype", jnp.dtype(dtype))
        return self._replace(
            U=self.U.astype(dtype), V=self.V.astype(dtype), S_data=self.S_data.astype(dtype)
        )


# ---------------------------------------------------------------- helpers
def _check_shape(shape) -> tuple[int, int]:
    shape = as_shape(shape)
    if len(shape) != 2:
        raise ValueError(f"LowRankSparse shape must be 2-D, got {shape}")
    return shape


def check_rank(rank, shape) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise TypeError(f"rank must be an int, got {rank!r}")
    if not 0 <= int(rank) <= min(shape):
        raise ValueError(f"rank must be in [0, {min(shape)}] for shape {tuple(shape)}, got {rank}")
    return int(rank)


def _resolve_nse(nse, density, total, shape, block_shape) -> int:
    if (nse is None) == (density is None):
        raise ValueError(
            "LowRankSparse.fromdense needs exactly one of nse= and density= "
            f"(got nse={nse!r}, density={density!r})"
        )
    if density is not None:
        if not 0.0 <= float(density) <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        return int(round(float(density) * total))
    if not 0 <= int(nse) <= total:
        raise ValueError(
            f"nse must be in [0, {total}] (the number of {block_shape} blocks in "
            f"{tuple(shape)}), got {nse}"
        )
    return int(nse)


def _decompose(x, *, rank, nse, block_shape, iters):
    """``(U, V, S, rel_error)`` by alternating exact projections (see ``fromdense``)."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(acc)
    m, n = x.shape
    bm, bn = block_shape
    nbr, nbc = m // bm, n // bn

    def low_rank(r):
        if rank == 0:
            return jnp.zeros((m, 0), acc), jnp.zeros((0, n), acc)
        u, s, vt = thin_svd(r)
        root = jnp.sqrt(s[:rank])
        return u[:, :rank] * root, root[:, None] * vt[:rank]

    def top_blocks(r):
        blocks = r.reshape(nbr, bm, nbc, bn).transpose(0, 2, 1, 3)
        norms = jnp.sum(jnp.square(blocks), axis=(2, 3)).reshape(-1)
        _, flat = jax.lax.top_k(norms, nse)
        return blocks, flat

    def sparse_part(r):
        blocks, flat = top_blocks(r)
        mask = jnp.zeros((nbr * nbc,), bool).at[flat].set(True).reshape(nbr, nbc)
        kept = jnp.where(mask[:, :, None, None], blocks, 0)
        return kept.transpose(0, 2, 1, 3).reshape(m, n)

    def error_after_sparse(u, v):
        resid = xf - u @ v
        return jnp.sum(jnp.square(resid - sparse_part(resid)))

    # Start A: the best rank-r matrix; start B: rank-r fit after the best nse blocks.
    ua, va = low_rank(xf)
    ub, vb = low_rank(xf - sparse_part(xf))
    pick_a = error_after_sparse(ua, va) <= error_after_sparse(ub, vb)
    u = jnp.where(pick_a, ua, ub)
    v = jnp.where(pick_a, va, vb)

    def step(_, uv):
        u, v = uv
        return low_rank(xf - sparse_part(xf - u @ v))

    u, v = jax.lax.fori_loop(0, iters, step, (u, v))
    resid = xf - u @ v
    blocks, flat = top_blocks(resid)
    flat = jnp.sort(flat.astype(jnp.int32))
    rows, cols = flat // nbc, flat % nbc
    s = BCSR.from_positions(blocks[rows, cols].astype(x.dtype), rows, cols, shape=(m, n))
    error = relative_error(xf, s.todense().astype(acc) + u @ v)
    return u.astype(x.dtype), v.astype(x.dtype), s, error
