"""Mask functions: which query position may attend to which key position.

A mask function is a callable ``f(q_idx, kv_idx) -> bool array`` on broadcasting
integer arrays (True = attend). The built-in ones are :class:`MaskFn` objects: they
also know their **block structure** (for a rectangle of query positions and key
positions, whether *some* pair attends and whether *every* pair does), which is what
lets :meth:`BlockMask.from_fn <jsparse.attention.BlockMask.from_fn>` build a mask for
long sequences without ever forming the ``L x S`` matrix. They combine with ``&``,
``|`` and ``~``; a plain Python function of ``(q_idx, kv_idx)`` combines with them too
(its block structure is then found by evaluating it, block by block).

The element functions use only operators (``>=``, ``%``, ``&``, indexing), so they work
on NumPy arrays (how masks are built) and on JAX arrays (traced or not).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "MaskFn",
    "as_mask_fn",
    "causal",
    "full",
    "global_tokens",
    "local",
    "prefix_lm",
    "segments",
    "strided",
]

# block_fn(q_lo, q_hi, kv_lo, kv_hi) -> (any, all): inclusive position bounds of
# query blocks (shape (nq, 1)) and key blocks (shape (1, nk)), int64 NumPy arrays,
# each axis partitioned into consecutive blocks in order. ``any`` may over-estimate
# (True where no pair attends) and ``all`` may under-estimate: both are refined by
# evaluating the element function on the undecided blocks.
BlockFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[Any, Any]]


class MaskFn:
    """A mask function with (optionally) its block structure; combine with ``&``, ``|``, ``~``.

    Args:
      fn: ``fn(q_idx, kv_idx) -> bool array`` on broadcasting integer arrays.
      block_fn: ``block_fn(q_lo, q_hi, kv_lo, kv_hi) -> (any, all)`` on inclusive
        position bounds of blocks (query bounds shaped ``(nq, 1)``, key bounds
        ``(1, nk)``): whether some / every pair of the block attends. ``any`` may
        over-estimate and ``all`` under-estimate (they are refined by evaluating
        ``fn`` on the undecided blocks). ``None``: unknown (every block is evaluated).
      name: the ``repr``.

    Example:
      >>> import numpy as np
      >>> from jsparse.attention import causal, local
      >>> m = causal() & local(1, 0)
      >>> m
      (causal() & local(1, 0))
      >>> m(np.arange(3)[:, None], np.arange(3)[None, :]).astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """

    def __init__(self, fn: Callable[..., Any], block_fn: BlockFn | None = None, name=None):
        if not callable(fn):
            raise TypeError(f"a mask function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.block_fn = block_fn
        self.name = name or getattr(fn, "__name__", "mask_fn")

    def __call__(self, q_idx, kv_idx):
        return self.fn(q_idx, kv_idx)

    def blocks(self, q_lo, q_hi, kv_lo, kv_hi) -> tuple[np.ndarray, np.ndarray]:
        """``(any, all)`` boolean arrays of shape ``(nq, nk)`` for blocks with the given
        inclusive bounds (``(nq, 1)`` and ``(1, nk)``); ``(True, False)`` everywhere
        when the structure is unknown.

        Example:
          >>> import numpy as np
          >>> from jsparse.attention import causal
          >>> lo, hi = np.array([[0], [2]]), np.array([[1], [3]])
          >>> some, every = causal().blocks(lo, hi, lo.T, hi.T)
          >>> some.tolist(), every.tolist()
          ([[True, False], [True, True]], [[False, False], [True, False]])
        """
        shape = np.broadcast_shapes(np.shape(q_lo), np.shape(kv_lo))
        if self.block_fn is None:
            return np.ones(shape, bool), np.zeros(shape, bool)
        some, every = self.block_fn(q_lo, q_hi, kv_lo, kv_hi)
        return np.broadcast_to(some, shape), np.broadcast_to(every, shape)

    def __and__(self, other):
        other = as_mask_fn(other)
        a, b = self, other

        def block_fn(*bounds):
            sa, ea = a.blocks(*bounds)
            sb, eb = b.blocks(*bounds)
            return sa & sb, ea & eb

        return MaskFn(lambda q, k: a(q, k) & b(q, k), block_fn, f"({a.name} & {b.name})")

    def __or__(self, other):
        other = as_mask_fn(other)
        a, b = self, other

        def block_fn(*bounds):
            sa, ea = a.blocks(*bounds)
            sb, eb = b.blocks(*bounds)
            return sa | sb, ea | eb

        return MaskFn(lambda q, k: a(q, k) | b(q, k), block_fn, f"({a.name} | {b.name})")

    def __rand__(self, other):
        return as_mask_fn(other) & self

    def __ror__(self, other):
        return as_mask_fn(other) | self

    def __invert__(self):
        a = self

        def block_fn(*bounds):
            some, every = a.blocks(*bounds)
            return ~every, ~some

        return MaskFn(lambda q, k: ~a(q, k), block_fn, f"~{a.name}")

    def __repr__(self):
        return self.name


def as_mask_fn(fn) -> MaskFn:
    """``fn`` as a :class:`MaskFn` (a plain callable gets an unknown block structure).

    Raises:
      TypeError: ``fn`` is not callable.

    Example:
      >>> from jsparse.attention import as_mask_fn
      >>> def diagonal(q, k):
      ...     return q == k
      >>> as_mask_fn(diagonal)
      diagonal
    """
    return fn if isinstance(fn, MaskFn) else MaskFn(fn)


def _int(value, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def full() -> MaskFn:
    """Every query attends to every key.

    Example:
      >>> from jsparse.attention import full
      >>> bool(full()(0, 5))
      True
    """
    return MaskFn(lambda q, k: (q >= 0) | (k >= 0), lambda *b: (True, True), "full()")


def causal() -> MaskFn:
    """Query ``i`` attends to keys ``j <= i``.

    Example:
      >>> from jsparse.attention import causal
      >>> bool(causal()(3, 2)), bool(causal()(2, 3))
      (True, False)
    """

    def block_fn(q_lo, q_hi, k_lo, k_hi):
        return k_lo <= q_hi, k_hi <= q_lo

    return MaskFn(lambda q, k: k <= q, block_fn, "causal()")


def local(left: int | None, right: int | None = 0) -> MaskFn:
    """A sliding window: query ``i`` attends to keys ``i - left <= j <= i + right``.

    Args:
      left: how far back (``None``: unbounded).
      right: how far ahead (``None``: unbounded; default 0).

    Raises:
      TypeError, ValueError: a bound that is not a non-negative int or None.

    Example:
      A causal window of 512 keys (the query and the 511 before it):

      >>> from jsparse.attention import local
      >>> w = local(511, 0)
      >>> bool(w(1000, 489)), bool(w(1000, 488)), bool(w(1000, 1001))
      (True, False, False)
    """
    lo = None if left is None else -_int(left, "local(left, ...)")
    hi = None if right is None else _int(right, "local(..., right)")

    def fn(q, k):
        d = k - q
        ok = d == d
        if lo is not None:
            ok = ok & (d >= lo)
        if hi is not None:
            ok = ok & (d <= hi)
        return ok

    def block_fn(q_lo, q_hi, k_lo, k_hi):
        d_min, d_max = k_lo - q_hi, k_hi - q_lo
        some, every = True, True
        if lo is not None:
            some, every = some & (d_max >= lo), every & (d_min >= lo)
        if hi is not None:
            some, every = some & (d_min <= hi), every & (d_max <= hi)
        return some, every

    return MaskFn(fn, block_fn, f"local({left}, {right})")


def strided(stride: int, width: int = 1) -> MaskFn:
    """A dilated (strided) pattern: query ``i`` attends to keys ``j`` with
    ``(i - j) mod stride < width``.

    ``width=1`` is plain dilation (every ``stride``-th key counting back from the
    query, the Sparse Transformer's strided head); a larger ``width`` keeps a band of
    ``width`` keys every ``stride``. Combine with :func:`causal` and :func:`local`.

    Args:
      stride: the period (>= 1).
      width: the band kept in each period (1 <= width <= stride).

    Raises:
      TypeError, ValueError: bad ``stride`` or ``width``.

    Example:
      >>> import numpy as np
      >>> from jsparse.attention import strided
      >>> strided(4)(np.array(9), np.arange(10)).astype(int).tolist()
      [0, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    """
    stride = _int(stride, "strided(stride)", 1)
    width = _int(width, "strided(..., width)", 1)
    if width > stride:
        raise ValueError(f"strided: width must be <= stride, got width={width}, stride={stride}")

    def block_fn(q_lo, q_hi, k_lo, k_hi):
        d_lo = q_lo - k_hi
        n = (q_hi - k_lo) - d_lo + 1  # how many consecutive differences the block holds
        r = d_lo % stride
        some = (n >= stride) | (r < width) | (r + n - 1 >= stride)
        every = (width >= stride) | (r + n - 1 < width)
        return some, every

    return MaskFn(lambda q, k: (q - k) % stride < width, block_fn, f"strided({stride}, {width})")


def global_tokens(n: int) -> MaskFn:
    """The first ``n`` positions are global: they attend to every key and every query
    attends to them (Longformer / BigBird global tokens). Combine with ``|``.

    Args:
      n: the number of global tokens (>= 0).

    Raises:
      TypeError, ValueError: bad ``n``.

    Example:
      >>> from jsparse.attention import global_tokens, local
      >>> m = local(1, 1) | global_tokens(2)
      >>> bool(m(100, 1)), bool(m(1, 100)), bool(m(100, 50))
      (True, True, False)
    """
    n = _int(n, "global_tokens(n)")

    def block_fn(q_lo, q_hi, k_lo, k_hi):
        return (q_lo < n) | (k_lo < n), (q_hi < n) | (k_hi < n)

    return MaskFn(lambda q, k: (q < n) | (k < n), block_fn, f"global_tokens({n})")


def prefix_lm(prefix_len: int) -> MaskFn:
    """Prefix-LM: every query attends to the first ``prefix_len`` keys
    (bidirectional prefix) and causally after that.

    Args:
      prefix_len: the length of the prefix (>= 0).

    Raises:
      TypeError, ValueError: bad ``prefix_len``.

    Example:
      >>> from jsparse.attention import prefix_lm
      >>> m = prefix_lm(4)
      >>> bool(m(0, 3)), bool(m(5, 6)), bool(m(6, 5))
      (True, False, True)
    """
    p = _int(prefix_len, "prefix_lm(prefix_len)")

    def block_fn(q_lo, q_hi, k_lo, k_hi):
        return (k_lo < p) | (k_lo <= q_hi), (k_hi < p) | (k_hi <= q_lo)

    return MaskFn(lambda q, k: (k < p) | (k <= q), block_fn, f"prefix_lm({p})")


def segments(segment_ids, kv_segment_ids=None) -> MaskFn:
    """Document masking: query ``i`` attends to key ``j`` iff they carry the same
    segment id (packed sequences).

    The block structure is exact when the ids are sorted (documents stored one after
    another); unsorted ids are handled too (undecided blocks are evaluated).

    Args:
      segment_ids: integer ids of the query positions, shape ``(L,)``.
      kv_segment_ids: ids of the key positions, shape ``(S,)``; default: the same.

    Raises:
      ValueError, TypeError: ids that are not 1-D integer arrays.

    Example:
      >>> import numpy as np
      >>> from jsparse.attention import causal, segments
      >>> m = segments(np.array([0, 0, 1, 1])) & causal()
      >>> m(np.arange(4)[:, None], np.arange(4)[None, :]).astype(int).tolist()
      [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    """
    q_ids = _ids(segment_ids, "segment_ids")
    k_ids = q_ids if kv_segment_ids is None else _ids(kv_segment_ids, "kv_segment_ids")

    def fn(q, k):
        if isinstance(q, np.ndarray | int | np.integer) and isinstance(
            k, np.ndarray | int | np.integer
        ):
            return q_ids[q] == k_ids[k]
        import jax.numpy as jnp

        return jnp.asarray(q_ids)[q] == jnp.asarray(k_ids)[k]

    def block_fn(q_lo, q_hi, k_lo, k_hi):
        q_min, q_max = _range_min_max(q_ids, q_lo.reshape(-1), q_hi.reshape(-1))
        k_min, k_max = _range_min_max(k_ids, k_lo.reshape(-1), k_hi.reshape(-1))
        q_min, q_max = q_min[:, None], q_max[:, None]
        k_min, k_max = k_min[None, :], k_max[None, :]
        some = (q_min <= k_max) & (k_min <= q_max)
        every = (q_min == q_max) & (k_min == k_max) & (q_min == k_min)
        return some, every

    return MaskFn(fn, block_fn, f"segments(<{q_ids.shape[0]} ids>)")


def _ids(ids, what):
    try:
        arr = np.asarray(ids)
    except Exception as e:  # a tracer: masks are built from concrete ids
        raise TypeError(f"{what} must be a concrete integer array (not traced)") from e
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be a 1-D integer array, got shape {arr.shape} {arr.dtype}")
    return arr


def _range_min_max(ids, lo, hi):
    """Min and max of ``ids[lo[i]:hi[i] + 1]`` for consecutive, ordered ranges."""
    starts = np.clip(lo, 0, len(ids) - 1)
    mins = np.minimum.reduceat(ids, starts)
    maxs = np.maximum.reduceat(ids, starts)
    # reduceat runs each range to the next start; the last one to the end of ids.
    # Blocks partition the axis, so that is the block itself (hi clipped to the end).
    del hi
    return mins, maxs
