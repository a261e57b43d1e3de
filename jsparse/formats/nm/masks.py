"""N:M masks: the N:M pattern of largest magnitude in a dense array, and the test
whether an array already is N:M."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jsparse.core.matrix import AbstractSparseMatrix
from jsparse.formats.nm.matrix import check_axis, check_divides, check_nm
from jsparse.formats.nm.packing import compress, decompress

__all__ = ["is_nm", "nm_mask"]


def is_nm(x: jax.typing.ArrayLike, n: int = 2, m: int = 4, *, axis: int = -1) -> jax.Array:
    """Whether every group of ``m`` consecutive entries along ``axis`` has at most
    ``n`` nonzeros. Returns a boolean scalar array (works under ``jit``).

    An :class:`NM` argument is checked through its dense form.

    Args:
      x: a dense 2-D array or a jsparse format.
      n, m: at most ``n`` nonzeros in every ``m``.
      axis: the grouped axis.

    Raises:
      ValueError: ``n >= m``, a bad axis, ``x`` not 2-D, or ``m`` does not divide
        the axis length.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> x = jnp.array([[1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
      >>> bool(jsparse.is_nm(x, 2, 4)), bool(jsparse.is_nm(x[:1], 2, 4))
      (False, True)
    """
    x = x.todense() if isinstance(x, AbstractSparseMatrix) else jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"is_nm expects a 2-D array, got shape {x.shape}")
    n, m = check_nm(n, m)
    axis = check_axis(axis, 2)
    check_divides(x.shape, m, axis)
    return jnp.all(group_counts(x, m=m, axis=axis) <= n)


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

    NaN ranks above every magnitude (``inf`` included), as in :meth:`NM.fromdense`,
    so a NaN weight is kept (and stays visible); never more than ``n`` per group.

    Returns:
      A ``bool`` array of ``x.shape``: exactly ``n`` kept per group (ties to the lower
      position) without ``transposable``; at most ``n`` per row and column of every
      block with it. Works under ``jit``.

    Raises:
      ValueError: ``n >= m``, ``m`` does not divide the grouped axis (both axes when
        ``transposable``), a bad axis or ``x`` not 2-D.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> x = jnp.array([[1.0, -5.0, 2.0, 0.5]])
      >>> jsparse.nm_mask(x, 2, 4).tolist()
      [[False, True, True, False]]
      >>> bool(jsparse.is_nm(jsparse.nm_mask(jnp.ones((8, 8)), transposable=True).T))
      True
    """
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"nm_mask expects a 2-D array, got shape {x.shape}")
    n, m = check_nm(n, m)
    if transposable:
        check_divides(x.shape, m, 0)
        check_divides(x.shape, m, 1)
        return transposable_mask(x, n=n, m=m)
    axis = check_axis(axis, 2)
    check_divides(x.shape, m, axis)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return topn_mask(x, n=n, m=m, axis=axis)


@functools.partial(jax.jit, static_argnames=("n", "m", "axis"))
def topn_mask(x: jax.Array, *, n: int, m: int, axis: int) -> jax.Array:
    """Boolean mask of the ``n`` largest magnitudes in every group of ``m`` along
    ``axis`` (ties to the lower position, like :func:`compress`).

    Training recomputes this mask every step (SR-STE), so for ``m <= 16`` each entry is
    ranked inside its group by pairwise comparison: ``m * m`` elementwise ops that XLA
    fuses, about 100x faster on CPU than the sort in ``compress`` for 2:4 at 2048x2048.
    """
    if m > 16:
        _, positions = compress(x, n=n, m=m, axis=axis)
        return decompress(jnp.ones(positions.shape, jnp.bool_), positions, n=n, m=m, axis=axis)
    # Split the grouped axis in place, (G, m), so the other axis stays minor (for
    # axis=0 the comparisons vectorise along the long output axis).
    shape = list(x.shape)
    shape[axis : axis + 1] = [shape[axis] // m, m]
    # NaN ranks above every magnitude (as in lax.top_k and compress): NaN -> +inf,
    # with the NaN flag breaking the tie against a true infinity.
    g = jnp.abs(x).reshape(shape)
    nan = jnp.isnan(g)
    g = jnp.where(nan, jnp.inf, g)
    mine, mine_nan = jnp.expand_dims(g, axis + 2), jnp.expand_dims(nan, axis + 2)
    other, other_nan = jnp.expand_dims(g, axis + 1), jnp.expand_dims(nan, axis + 1)
    idx = jnp.arange(m)
    earlier = (idx[None, :] < idx[:, None]).reshape((m, m) + (1,) * (g.ndim - axis - 2))
    tie = (other == mine) & (other_nan == mine_nan)
    above = (other > mine) | ((other == mine) & other_nan & ~mine_nan)
    rank = jnp.sum(above | (tie & earlier), axis=axis + 2)
    return (rank < n).reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("m", "axis"))
def group_counts(x: jax.Array, *, m: int, axis: int) -> jax.Array:
    """Number of nonzeros in every group of ``m`` along ``axis``."""
    xt = jnp.moveaxis(x, axis, -1)
    return jnp.sum(xt.reshape(*xt.shape[:-1], xt.shape[-1] // m, m) != 0, axis=-1)


@functools.partial(jax.jit, static_argnames=("n", "m"))
def transposable_mask(x: jax.Array, *, n: int, m: int) -> jax.Array:
    """Greedy magnitude mask that keeps at most ``n`` per row and per column of every
    ``m x m`` block (so it is N:M along both axes).

    In every block the entries are visited by decreasing magnitude (ties: row-major
    order) and an entry is kept while its row and its column hold fewer than ``n``
    kept entries (the greedy rule of NVIDIA ASP's ``m4n2_2d_greedy``). Greedy can get
    stuck with fewer than ``n`` in a row or column; it never keeps more.
    """
    rows, cols = x.shape
    nb = rows // m * (cols // m)
    blocks = x.reshape(rows // m, m, cols // m, m).transpose(0, 2, 1, 3).reshape(nb, m * m)
    # Decreasing magnitude, NaN first (NaN ranks above every magnitude, as in nm_mask).
    order = jnp.lexsort((-jnp.abs(blocks), ~jnp.isnan(blocks)), axis=-1)

    def step(carry, flat):
        row_count, col_count, keep = carry
        r, c = flat // m, flat % m
        ok = (jnp.take_along_axis(row_count, r[:, None], 1)[:, 0] < n) & (
            jnp.take_along_axis(col_count, c[:, None], 1)[:, 0] < n
        )
        hit_r = (jnp.arange(m) == r[:, None]) & ok[:, None]
        hit_c = (jnp.arange(m) == c[:, None]) & ok[:, None]
        keep = keep | ((jnp.arange(m * m) == flat[:, None]) & ok[:, None])
        return (row_count + hit_r, col_count + hit_c, keep), None

    init = (
        jnp.zeros((nb, m), jnp.int32),
        jnp.zeros((nb, m), jnp.int32),
        jnp.zeros((nb, m * m), bool),
    )
    (_, _, keep), _ = lax.scan(step, init, order.T)
    return keep.reshape(rows // m, cols // m, m, m).transpose(0, 2, 1, 3).reshape(rows, cols)
