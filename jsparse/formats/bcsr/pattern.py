"""What the BCSR kernels need from a pattern, computed once when the pattern is made.

A block pattern is the CSR pointer and block-columns (``indptr``, ``indices``) plus
three derived arrays: the block-row of each stored block (``row_ids``, for the XLA
scan and the SDDMM) and a CSC view (``col_ptr`` and ``col_order``: the stored blocks
sorted by block-column, stable), which ``A.T @ X`` kernels walk. They are leaves of
the matrix, so a product never sorts or searches the pattern again; a pattern change
(dynamic sparse training) builds them anew with :func:`block_pattern`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["BlockPattern", "block_pattern", "indptr_from_rows", "row_ids_from_indptr"]


class BlockPattern(NamedTuple):
    """The index arrays of a BCSR pattern (a pytree of int32 arrays).

    The fields are in the order of the matrix's index leaves.

    Attributes:
      indices: ``(nse,)`` block-column of each stored block (sorted within a row).
      indptr: ``(nbr + 1,)`` the blocks of block-row ``i`` are ``indptr[i]:indptr[i+1]``.
      row_ids: ``(nse,)`` block-row of each stored block.
      col_ptr: ``(nbc + 1,)`` the CSC positions of block-column ``j`` are
        ``col_ptr[j]:col_ptr[j+1]``.
      col_order: ``(nse,)`` the stored block at each CSC position (row order kept
        within a column).
    """

    indices: jax.Array
    indptr: jax.Array
    row_ids: jax.Array
    col_ptr: jax.Array
    col_order: jax.Array


def row_ids_from_indptr(indptr: jax.Array, nse: int) -> jax.Array:
    """Block-row of each of ``nse`` stored blocks from a CSR pointer (jit-friendly)."""
    pos = jnp.arange(nse, dtype=jnp.int32)
    return (jnp.searchsorted(indptr.astype(jnp.int32), pos, side="right") - 1).astype(jnp.int32)


def indptr_from_rows(rows: jax.Array, nrows: int) -> jax.Array:
    """CSR pointer ``(nrows + 1,)`` from the (sorted) row of each entry (jit-friendly)."""
    counts = jnp.bincount(rows.astype(jnp.int32), length=nrows).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])


def block_pattern(indptr: jax.Array, indices: jax.Array, nbc: int) -> BlockPattern:
    """The full :class:`BlockPattern` of a CSR block pattern with ``nbc`` block-columns."""
    indptr = indptr.astype(jnp.int32)
    indices = indices.astype(jnp.int32)
    nse = indices.shape[0]
    row_ids = row_ids_from_indptr(indptr, nse)
    col_order = jnp.argsort(indices, stable=True).astype(jnp.int32)
    col_ptr = indptr_from_rows(indices[col_order], nbc)
    return BlockPattern(indices, indptr, row_ids, col_ptr, col_order)
