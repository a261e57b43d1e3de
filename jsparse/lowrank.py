"""LowRankSparse: a low-rank matrix plus a block-sparse one, ``A = U @ V + S``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsparse import bcsr as _bcsr
from jsparse import ops
from jsparse._base import (
    AbstractSparseMatrix,
    _is_float0,
    check_float_dtype,
    register_format,
)
from jsparse._dispatch import register_impl
from jsparse._xla.monarch import svd as _svd
from jsparse.bcsr import BCSR

__all__ = ["LowRankSparse"]


@register_format
@dataclasses.dataclass(frozen=True, init=False, repr=False, eq=False)
class LowRankSparse(AbstractSparseMatrix):
    """``A = U @ V + S``: a rank-``r`` part and a block-sparse part, shape ``(m, n)``.

    Leaves: ``U (m, r)``, ``V (r, n)`` and the three leaves of the :class:`BCSR`
    ``S`` stored flat as ``S_data``, ``S_indices``, ``S_indptr`` (so that every
    leaf-level tool, ``value_axes``-style ``in_axes`` prefixes and ``_replace``
    see one flat list; the :attr:`S` property rebuilds the BCSR view). Values:
    ``U``, ``V``, ``S_data``; ``S_indices``/``S_indptr`` are indices (they get
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
    shape: tuple[int, int]

    _leaf_fields = ("U", "V", "S_data", "S_indices", "S_indptr")
    _static_fields = ("shape",)
    _value_fields = ("U", "V", "S_data")

    def __init__(self, U: jax.typing.ArrayLike, V: jax.typing.ArrayLike, S: BCSR | None = None):  # noqa: N803
        """Build from ``U (m, r)``, ``V (r, n)`` and a :class:`BCSR` ``S (m, n)``.

        ``S=None`` stores no sparse part (an empty ``(1, 1)``-block BCSR).

        Raises:
          ValueError: the shapes of ``U``, ``V`` and ``S`` disagree (the message names
            them all).
          TypeError: ``S`` is not a BCSR, or the dtypes are not one floating dtype.
        """
        U, V = _as_leaf(U), _as_leaf(V)  # noqa: N806
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
        for name, value in (
            ("U", U),
            ("V", V),
            ("S_data", S.data),
            ("S_indices", S.indices),
            ("S_indptr", S.indptr),
        ):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "shape", shape)
        self.validate()

    # ------------------------------------------------------------ properties
    @property
    def S(self) -> BCSR:  # noqa: N802
        """The sparse part as a :class:`BCSR` (a view on the stored leaves)."""
        return BCSR._tree_unflatten((self.shape,), [self.S_data, self.S_indices, self.S_indptr])

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def nparams(self) -> int:
        """Stored values: ``r * (m + n) + nse * bm * bn``."""
        return int(self.U.size + self.V.size + self.S_data.size)

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
        dtypes = {v.dtype for v in values if not _is_float0(v)}
        if len(dtypes) > 1:
            raise TypeError(
                f"LowRankSparse U, V and S must share one dtype, got U {U.dtype}, "
                f"V {V.dtype} and S {S.data.dtype}"
            )

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
        has unit-variance entries) and ``S = BCSR.random(...)`` (standard normal)."""
        m, n = _check_shape(shape)
        rank = _check_rank(rank, (m, n))
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
        """
        x = jnp.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"LowRankSparse.fromdense expects a 2-D array, got shape {x.shape}")
        check_float_dtype("LowRankSparse.fromdense input", x.dtype)
        rank = _check_rank(rank, x.shape)
        bm, bn = _bcsr._check_block_shape(x.shape, block_shape)
        total = (x.shape[0] // bm) * (x.shape[1] // bn)
        nse = _resolve_nse(nse, density, total, x.shape, (bm, bn))
        if isinstance(iters, bool) or not isinstance(iters, int | np.integer) or iters < 0:
            raise ValueError(f"iters must be a non-negative int, got {iters!r}")
        U, V, S, err = _decompose(x, rank=rank, nse=nse, block_shape=(bm, bn), iters=int(iters))  # noqa: N806
        out = cls(U, V, S)
        return (out, err) if return_error else out

    # ------------------------------------------------------------ conversions
    def todense(self) -> jax.Array:
        acc = jnp.promote_types(self.dtype, jnp.float32)
        # Both operands contract their minor axis, so the transpose runs the same dot
        # with swapped operands: ``a.T.todense() == a.todense().T`` exactly.
        low = jax.lax.dot_general(
            self.U, self.V.T, (((1,), (1,)), ((), ())), preferred_element_type=acc
        )
        return (low + self.S.todense().astype(acc)).astype(self.dtype)

    def transpose(self) -> LowRankSparse:
        st = self.S.transpose()
        return self._replace(
            U=self.V.T,
            V=self.U.T,
            S_data=st.data,
            S_indices=st.indices,
            S_indptr=st.indptr,
            shape=self.shape[::-1],
        )

    def astype(self, dtype: Any) -> LowRankSparse:
        check_float_dtype("LowRankSparse.astype dtype", jnp.dtype(dtype))
        return self._replace(
            U=self.U.astype(dtype), V=self.V.astype(dtype), S_data=self.S_data.astype(dtype)
        )


# ---------------------------------------------------------------- helpers
def _as_leaf(x):
    if _is_float0(x) or isinstance(x, jax.core.Tracer):
        return x
    return jnp.asarray(x)


def _check_shape(shape) -> tuple[int, int]:
    from jsparse._base import as_shape

    shape = as_shape(shape)
    if len(shape) != 2:
        raise ValueError(f"LowRankSparse shape must be 2-D, got {shape}")
    return shape


def _check_rank(rank, shape) -> int:
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
        u, s, vt = _svd(r)
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
    rows, cols = _bcsr._sorted_positions(flat, nbc)
    s = BCSR._from_positions(blocks[rows, cols].astype(x.dtype), rows, cols, (m, n))
    norm = jnp.linalg.norm(xf)
    err = jnp.linalg.norm(resid - s.todense().astype(acc))
    rel = jnp.where(norm > 0, err / jnp.where(norm > 0, norm, 1), err)
    return u.astype(x.dtype), v.astype(x.dtype), s, rel


# ---------------------------------------------------------------- ops: matmul
def _sparse_part(a: LowRankSparse, x, transpose: bool):
    # Through BCSR's own hooks, so S gets BCSR's automatic choice of implementation.
    if transpose:  # S.T @ x = (x.T @ S).T; the transposes cancel under XLA.
        return ops.dense_sparse_matmul(a.S, x.T, impl="auto").T
    return ops.sparse_dense_matmul(a.S, x, impl="auto")


@register_impl("matmul", LowRankSparse, "xla")
def _matmul_xla(a: LowRankSparse, x, *, transpose: bool):
    acc = jnp.promote_types(x.dtype, jnp.float32)
    if transpose:  # A.T @ x = V.T @ (U.T @ x) + S.T @ x
        low = jnp.matmul(
            a.V.T, jnp.matmul(a.U.T, x, preferred_element_type=acc), preferred_element_type=acc
        )
    else:
        low = jnp.matmul(
            a.U, jnp.matmul(a.V, x, preferred_element_type=acc), preferred_element_type=acc
        )
    return (low + _sparse_part(a, x, transpose).astype(acc)).astype(x.dtype)


@register_impl("matmul", LowRankSparse, "dense")
def _matmul_dense(a: LowRankSparse, x, *, transpose: bool):
    w = a.todense()
    w = w.T if transpose else w
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.matmul(w, x, preferred_element_type=acc).astype(x.dtype)


def auto_order(a: LowRankSparse) -> list[str]:
    """The factored product unless it does more work than the dense one."""
    m, n = a.shape
    if a.nparams <= 0.6 * m * n:
        return ["xla", "dense"]
    return ["dense", "xla"]


ops.register_matmul(LowRankSparse, auto_order)


@ops._scale.register
def _(a: LowRankSparse, s):
    dtype = jnp.result_type(a.U, s)
    return a._replace(
        U=(a.U * s).astype(dtype), V=a.V.astype(dtype), S_data=(a.S_data * s).astype(dtype)
    )
