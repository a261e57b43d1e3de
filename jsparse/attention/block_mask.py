"""The block mask: which blocks of the score matrix attention computes, as a pytree.

The ``L x S`` score matrix is cut into ``bq x bk`` blocks (``nq = ceil(L / bq)`` query
blocks, ``nk = ceil(S / bk)`` key blocks). A block is **empty** (skipped), **full**
(every pair attends: computed without an element mask) or **partial** (computed with
its element mask). :class:`BlockMask` stores, per head (or once for all heads):

==================== =================== ==============================================
leaf                 shape               meaning
==================== =================== ==============================================
``full_kv``          ``(Hm, nq, F)``     key-block ids of the full blocks of each
                                         query block, ascending
``full_count``       ``(Hm, nq)``        how many of the ``F`` slots are valid
``partial_kv``       ``(Hm, nq, P)``     key-block ids of the partial blocks
``partial_count``    ``(Hm, nq)``        valid slots
``partial_mask``     ``(Hm, nq, P)``     index into ``mask_blocks`` of each partial
                                         block's element mask
``mask_blocks``      ``(M, bq, bk)``     element masks (bool, True = attend, tile
                                         ``[query row, key column]``), deduplicated
``full_q``           ``(Hm, nk, Ft)``    the transposed view: query-block ids of the
                                         full blocks of each key block, ascending
``full_q_count``     ``(Hm, nk)``        valid slots
``partial_q``        ``(Hm, nk, Pt)``    query-block ids of the partial blocks
``partial_q_count``  ``(Hm, nk)``        valid slots
``partial_q_mask``   ``(Hm, nk, Pt)``    index into ``mask_blocks`` (the same tile as
                                         the row view's, not transposed)
``plan``             :class:`XlaPlan`    the XLA implementation's schedule (below)
==================== =================== ==============================================

Index arrays are int32. ``Hm`` is 1 (one mask shared by every head) or the number of
query heads. **Padding:** ``F, P, Ft, Pt, M >= 1``; slots at or past a row's count
repeat the row's last valid entry (block id and mask id alike; 0 for an empty row), so
a kernel may loop ``for s in range(count)`` or run a fixed grid over every slot and
skip the compute of slots ``>= count`` (a repeated id needs no new copy).

**Lengths that are not multiples of the block** are padded: the mask describes the
padded ``nq * bq`` by ``nk * bk`` matrix, in which padded key columns (``>= S``) and
padded query rows (``>= L``) never attend. A key block cut by the end of the keys is
therefore always partial; :func:`~jsparse.attention.block_sparse_attention` pads
``q, k, v`` with zeros and slices the result.

**Compilation.** Static data are ``q_len``, ``kv_len`` and ``block_size``; the pattern
is in the leaves. A mask with other blocks but the same array shapes reuses the
compiled function; :meth:`BlockMask.unify` pads several masks to common shapes.

The XLA plan (:class:`XlaPlan`) splits every row of blocks into chunks of at most
``T`` slots ("virtual rows"), so a ``lax.scan`` of ``T`` steps processes all chunks
at once with large batched dots, whatever the rows' lengths (causal rows range from
1 to ``nk`` blocks), and merges the chunks of a row afterwards (log-sum-exp for the
forward, sums for the gradients). Kernels that loop over a row's blocks themselves
(Pallas) ignore it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.attention.masks import MaskFn, as_mask_fn

__all__ = ["BlockMask", "XlaPlan"]

# Evaluate element functions on at most this many elements at a time.
_TILE_BUDGET = 1 << 22


def _static_block_size(block_size) -> tuple[int, int]:
    try:
        bq, bk = block_size
    except (TypeError, ValueError):
        raise ValueError(f"block_size must be a pair (bq, bk), got {block_size!r}") from None
    for b in (bq, bk):
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or b < 1:
            raise ValueError(f"block_size must be two positive ints, got {block_size!r}")
    return int(bq), int(bk)


def _length(n, what) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{what} must be a positive int, got {n!r}")
    return int(n)


# ------------------------------------------------------------------ the XLA plan
@dataclasses.dataclass(frozen=True, eq=False)
class XlaPlan:
    """The XLA implementation's schedule of a :class:`BlockMask` (a pytree of int32
    arrays, built with the mask).

    Each of the four grids (row view full/partial, transposed view full/partial)
    cuts every row of stored blocks into "virtual rows" of at most ``T`` slots:

    * ``<grid>_ids`` ``(Hm, R, T)``: block ids along the other axis (padded like the
      canonical lists: repeated last entry);
    * ``<grid>_count`` ``(Hm, R)``: valid slots of each virtual row (0 for padding rows);
    * ``<grid>_owner`` ``(Hm, R)``: the query block (row grids) or key block
      (transposed grids) the virtual row belongs to;
    * ``<grid>_mask`` ``(Hm, R, T)`` (partial grids): index into ``mask_blocks``;
    * ``row_merge`` ``(Hm, nq, V)``, ``col_merge`` ``(Hm, nk, Vt)``: the virtual rows
      of each query / key block, as indices into the concatenation of the full grid's
      rows, the partial grid's rows and one empty row (the padding value).

    Grids: ``rf`` (row view, full), ``rp`` (row view, partial), ``cf``, ``cp``
    (transposed view).

    Example:
      >>> import jsparse.attention as ja
      >>> m = ja.BlockMask.from_fn(ja.causal(), 8, 8, block_size=(2, 2))
      >>> m.plan.rf_ids.shape[0], m.plan.row_merge.shape[:2]
      (1, (1, 4))
    """

    rf_ids: jax.Array
    rf_count: jax.Array
    rf_owner: jax.Array
    rp_ids: jax.Array
    rp_count: jax.Array
    rp_owner: jax.Array
    rp_mask: jax.Array
    row_merge: jax.Array
    cf_ids: jax.Array
    cf_count: jax.Array
    cf_owner: jax.Array
    cp_ids: jax.Array
    cp_count: jax.Array
    cp_owner: jax.Array
    cp_mask: jax.Array
    col_merge: jax.Array


jax.tree_util.register_dataclass(
    XlaPlan, data_fields=[f.name for f in dataclasses.fields(XlaPlan)], meta_fields=[]
)


def _pad_rows(ids: np.ndarray, count: np.ndarray, width: int) -> np.ndarray:
    """``ids[..., :width]`` with slots ``>= count`` repeating the last valid entry."""
    width = max(1, width)
    out = np.zeros(ids.shape[:-1] + (width,), np.int32)
    w = min(width, ids.shape[-1])
    out[..., :w] = ids[..., :w]
    slot = np.minimum(np.arange(width), np.maximum(count[..., None] - 1, 0))
    return np.take_along_axis(out, slot, axis=-1).astype(np.int32)


def _choose_chunk(counts: np.ndarray, n_owners: int) -> int:
    """The virtual-row length ``T`` minimising the XLA plan's cost for rows of these
    lengths: the slots it computes (``R * T``) plus a per-virtual-row cost (gathering
    the row's queries, merging its result: about ten slots, measured on CPU with
    block 64) plus a small per-step cost."""
    top = int(counts.max(initial=0))
    if top == 0:
        return 1
    best, best_cost = 1, None
    for t in range(1, top + 1):
        rows = int((-(-counts // t)).sum(axis=-1).max())
        cost = rows * t + 10 * rows + t
        if best_cost is None or cost < best_cost:
            best, best_cost = t, cost
    return best


def _grid(ids: np.ndarray, count: np.ndarray, mask_ids: np.ndarray | None):
    """Split each row of ``ids`` (Hm, n, W) with ``count`` (Hm, n) valid entries into
    virtual rows of ``T`` slots. Returns (ids, count, owner, mask, pieces (Hm, n))."""
    hm, n, _ = ids.shape
    t = _choose_chunk(count, n)
    pieces = -(-count // t)  # (Hm, n)
    r = max(1, int(pieces.sum(axis=-1).max()))
    g_ids = np.zeros((hm, r, t), np.int32)
    g_mask = np.zeros((hm, r, t), np.int32)
    g_count = np.zeros((hm, r), np.int32)
    g_owner = np.zeros((hm, r), np.int32)
    for h in range(hm):
        owner = np.repeat(np.arange(n), pieces[h])
        first = np.concatenate([[0], np.cumsum(pieces[h])[:-1]])
        chunk = np.arange(len(owner)) - first[owner]  # index of the piece within its row
        start = chunk * t
        c = np.minimum(count[h, owner] - start, t)
        slot = start[:, None] + np.minimum(np.arange(t)[None, :], np.maximum(c - 1, 0)[:, None])
        k = len(owner)
        g_owner[h, :k] = owner
        g_count[h, :k] = c
        g_ids[h, :k] = ids[h, owner[:, None], slot]
        if mask_ids is not None:
            g_mask[h, :k] = mask_ids[h, owner[:, None], slot]
    return g_ids, g_count, g_owner, g_mask, pieces


def _merge_table(pieces_full: np.ndarray, pieces_part: np.ndarray, r_full: int, r_part: int):
    """(Hm, n, V): the virtual rows of each owner in concat(full rows, partial rows,
    one empty row); padded with the empty row's index."""
    hm, n = pieces_full.shape
    total = pieces_full + pieces_part
    v = max(1, int(total.max(initial=0)))
    empty = r_full + r_part
    table = np.full((hm, n, v), empty, np.int32)
    for h in range(hm):
        f_first = np.concatenate([[0], np.cumsum(pieces_full[h])[:-1]])
        p_first = np.concatenate([[0], np.cumsum(pieces_part[h])[:-1]])
        for i in range(n):
            nf, npart = pieces_full[h, i], pieces_part[h, i]
            table[h, i, :nf] = f_first[i] + np.arange(nf)
            table[h, i, nf : nf + npart] = r_full + p_first[i] + np.arange(npart)
    return table


# ------------------------------------------------------------------ the block mask
_LEAVES = (
    "full_kv",
    "full_count",
    "partial_kv",
    "partial_count",
    "partial_mask",
    "mask_blocks",
    "full_q",
    "full_q_count",
    "partial_q",
    "partial_q_count",
    "partial_q_mask",
    "plan",
)
_STATIC = ("q_len", "kv_len", "block_size")


@dataclasses.dataclass(frozen=True, init=False, eq=False)
class BlockMask:
    """A block-sparse attention mask (a pytree: index arrays are leaves).

    Build one with :meth:`from_fn` (from mask functions, without forming ``L x S``)
    or :meth:`from_dense` (from a boolean array); see the module docstring for the
    layout. ``num_heads`` is 1 for a mask shared by every head.

    Example:
      >>> import jsparse.attention as ja
      >>> m = ja.BlockMask.from_fn(ja.causal(), 8, 8, block_size=(4, 4))
      >>> m
      BlockMask(q_len=8, kv_len=8, block_size=(4, 4), num_heads=1, full=1, partial=2)
      >>> m.full_kv[0, :, 0].tolist(), m.full_count[0].tolist()
      ([0, 0], [0, 1])
    """

    full_kv: jax.Array
    full_count: jax.Array
    partial_kv: jax.Array
    partial_count: jax.Array
    partial_mask: jax.Array
    mask_blocks: jax.Array
    full_q: jax.Array
    full_q_count: jax.Array
    partial_q: jax.Array
    partial_q_count: jax.Array
    partial_q_mask: jax.Array
    plan: XlaPlan
    q_len: int
    kv_len: int
    block_size: tuple[int, int]

    def __init__(self, **fields):
        missing = set(_LEAVES + _STATIC) - set(fields)
        if missing:
            raise TypeError(f"BlockMask is missing {sorted(missing)}")
        for name in _LEAVES + _STATIC:
            object.__setattr__(self, name, fields[name])

    # --- structure
    @property
    def num_heads(self) -> int:
        """1 for a mask shared by all heads, else the number of query heads.

        Example:
          >>> import jsparse.attention as ja
          >>> ja.BlockMask.from_fn([ja.causal(), ja.local(2)], 8, 8, block_size=(4, 4)).num_heads
          2
        """
        return int(self.full_count.shape[0])

    @property
    def num_blocks(self) -> tuple[int, int]:
        """``(nq, nk)``: query and key blocks (of the padded lengths).

        Example:
          >>> import jsparse.attention as ja
          >>> ja.BlockMask.from_fn(ja.causal(), 10, 8, block_size=(4, 4)).num_blocks
          (3, 2)
        """
        return int(self.full_count.shape[1]), int(self.full_q_count.shape[1])

    @property
    def shapes(self) -> tuple:
        """The shapes of every leaf: masks with equal ``shapes`` (and static data)
        share compiled functions.

        Example:
          >>> import jsparse.attention as ja
          >>> a = ja.BlockMask.from_fn(ja.local(3), 16, 16, block_size=(4, 4))
          >>> b = ja.BlockMask.from_fn(ja.local(3, 3), 16, 16, block_size=(4, 4))
          >>> a2, b2 = ja.BlockMask.unify(a, b)
          >>> a2.shapes == b2.shapes
          True
        """
        return tuple(x.shape for x in jax.tree.leaves(self))

    def nblocks(self) -> tuple[int, int]:
        """``(full, partial)``: stored blocks over all heads (concrete masks only).

        Example:
          >>> import jsparse.attention as ja
          >>> ja.BlockMask.from_fn(ja.causal(), 8, 8, block_size=(2, 2)).nblocks()
          (6, 4)
        """
        return int(np.sum(self.full_count)), int(np.sum(self.partial_count))

    def density(self) -> float:
        """Stored blocks over all blocks, averaged over heads (concrete masks only).

        Example:
          >>> import jsparse.attention as ja
          >>> ja.BlockMask.from_fn(ja.causal(), 8, 8, block_size=(2, 2)).density()
          0.625
        """
        nq, nk = self.num_blocks
        return sum(self.nblocks()) / (nq * nk * self.num_heads)

    def scheduled_fraction(self) -> float:
        """Slots the XLA plan computes over ``nq * nk`` (static: from shapes), the cost
        of the XLA path relative to dense attention.

        Example:
          >>> import jsparse.attention as ja
          >>> m = ja.BlockMask.from_fn(ja.local(3), 64, 64, block_size=(4, 4))
          >>> m.scheduled_fraction() < 0.2
          True
        """
        nq, nk = self.num_blocks
        p = self.plan
        slots = p.rf_ids.shape[1] * p.rf_ids.shape[2] + p.rp_ids.shape[1] * p.rp_ids.shape[2]
        return slots / (nq * nk)

    def __repr__(self):
        try:
            full, partial = self.nblocks()
            counts = f", full={full}, partial={partial}"
        except Exception:  # traced leaves
            counts = ""
        return (
            f"BlockMask(q_len={self.q_len}, kv_len={self.kv_len}, block_size={self.block_size}, "
            f"num_heads={self.num_heads}{counts})"
        )

    # --- dense views
    def block_kinds(self) -> jax.Array:
        """``(Hm, nq, nk)`` int8: 0 empty, 1 partial, 2 full (jit-friendly).

        Example:
          >>> import jsparse.attention as ja
          >>> ja.BlockMask.from_fn(ja.causal(), 4, 4, block_size=(2, 2)).block_kinds()[0].tolist()
          [[1, 0], [2, 1]]
        """
        hm = self.num_heads
        nq, nk = self.num_blocks
        kinds = jnp.zeros((hm, nq, nk), jnp.int8)
        h = jnp.arange(hm)[:, None, None]
        i = jnp.arange(nq)[None, :, None]
        for ids, count, value in (
            (self.partial_kv, self.partial_count, 1),
            (self.full_kv, self.full_count, 2),
        ):
            valid = jnp.arange(ids.shape[-1]) < count[..., None]
            cols = jnp.where(valid, ids, nk)  # out of range: dropped
            kinds = kinds.at[h, i, cols].set(jnp.int8(value), mode="drop")
        return kinds

    def to_dense(self) -> jax.Array:
        """The element mask, ``(Hm, q_len, kv_len)`` bool (materialises ``L x S``; for
        tests and the ``"dense"`` implementation).

        Example:
          >>> import jsparse.attention as ja
          >>> m = ja.BlockMask.from_fn(ja.causal(), 3, 3, block_size=(2, 2))
          >>> m.to_dense()[0].astype(int).tolist()
          [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
        """
        hm = self.num_heads
        nq, nk = self.num_blocks
        bq, bk = self.block_size
        tile = jnp.full((hm, nq, nk), -1, jnp.int32)
        valid = jnp.arange(self.partial_kv.shape[-1]) < self.partial_count[..., None]
        cols = jnp.where(valid, self.partial_kv, nk)
        h = jnp.arange(hm)[:, None, None]
        i = jnp.arange(nq)[None, :, None]
        tile = tile.at[h, i, cols].set(self.partial_mask, mode="drop")
        full = self.block_kinds() == 2
        tiles = jnp.where(
            (tile >= 0)[..., None, None],
            self.mask_blocks[jnp.maximum(tile, 0)],
            full[..., None, None],
        )  # (Hm, nq, nk, bq, bk)
        dense = tiles.transpose(0, 1, 3, 2, 4).reshape(hm, nq * bq, nk * bk)
        return dense[:, : self.q_len, : self.kv_len]

    # --- construction
    @classmethod
    def from_fn(
        cls,
        mask_fn: Callable | Sequence[Callable],
        q_len: int,
        kv_len: int,
        block_size: tuple[int, int] = (128, 128),
    ) -> BlockMask:
        """Build the block mask of a mask function, block by block.

        Built-in mask functions (:func:`~jsparse.attention.causal`, ...) and their
        combinations classify blocks from their bounds; only blocks that may be
        partial are evaluated, on ``bq x bk`` tiles (in chunks of bounded size), so no
        ``L x S`` array is formed. A plain function ``f(q_idx, kv_idx)`` is evaluated on
        every block, chunk by chunk (bounded memory, ``L * S`` work).

        Args:
          mask_fn: a mask function, or a sequence of them (one per query head).
          q_len, kv_len: the query and key lengths ``L`` and ``S``.
          block_size: ``(bq, bk)``.

        Returns:
          A :class:`BlockMask`.

        Raises:
          ValueError: bad lengths or block size; TypeError: a mask function that is not
          callable.

        Example:
          >>> import jsparse.attention as ja
          >>> m = ja.BlockMask.from_fn(ja.causal() & ja.local(255), 65536, 65536,
          ...                          block_size=(128, 128))
          >>> m.nblocks()
          (511, 1022)
        """
        L, S = _length(q_len, "q_len"), _length(kv_len, "kv_len")
        bq, bk = _static_block_size(block_size)
        fns = list(mask_fn) if isinstance(mask_fn, list | tuple) else [mask_fn]
        if not fns:
            raise ValueError("from_fn needs at least one mask function")
        fns = [as_mask_fn(f) for f in fns]
        nq, nk = -(-L // bq), -(-S // bk)
        q_lo = (np.arange(nq, dtype=np.int64) * bq)[:, None]
        q_hi = np.minimum(q_lo + bq - 1, L - 1)
        k_lo = (np.arange(nk, dtype=np.int64) * bk)[None, :]
        k_hi = np.minimum(k_lo + bk - 1, S - 1)
        kv_cut = (k_lo + bk > S)[0]  # a key block cut by the end is never full
        kinds, tiles = [], []
        for fn in fns:
            some, every = fn.blocks(q_lo, q_hi, k_lo, k_hi)
            some = np.array(some, bool)
            every = np.array(every, bool) & some & ~kv_cut[None, :]
            undecided = some & ~every
            kind = np.where(every, 2, 0).astype(np.int8)
            qi, kj = np.nonzero(undecided)
            t = _eval_tiles(fn, qi, kj, bq, bk, L, S)
            any_t = t.any(axis=(1, 2))
            all_t = _all_valid(t, qi, kj, bq, bk, L, S)
            kind[qi[all_t], kj[all_t]] = 2
            part = any_t & ~all_t
            kind[qi[part], kj[part]] = 1
            kinds.append(kind)
            tiles.append(t[part])
        return _assemble(np.stack(kinds), tiles, L, S, (bq, bk))

    @classmethod
    def from_dense(cls, mask, block_size: tuple[int, int] = (128, 128)) -> BlockMask:
        """Build the block mask of a dense boolean mask.

        Args:
          mask: ``(L, S)`` (shared by all heads) or ``(H, L, S)`` (one per head),
            True = attend (concrete, any dtype convertible to bool).
          block_size: ``(bq, bk)``.

        Returns:
          A :class:`BlockMask` (equal to :meth:`from_fn`'s for the same pattern).

        Raises:
          ValueError: a mask that is not 2-D or 3-D, or a bad block size.

        Example:
          >>> import numpy as np, jsparse.attention as ja
          >>> m = ja.BlockMask.from_dense(np.tril(np.ones((8, 8), bool)), block_size=(4, 4))
          >>> m.nblocks()
          (1, 2)
        """
        arr = np.asarray(mask)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise ValueError(f"mask must be (L, S) or (H, L, S), got shape {np.shape(mask)}")
        arr = arr.astype(bool)
        bq, bk = _static_block_size(block_size)
        hm, L, S = arr.shape
        if L < 1 or S < 1:
            raise ValueError(f"mask must have positive lengths, got shape {arr.shape}")
        nq, nk = -(-L // bq), -(-S // bk)
        padded = np.zeros((hm, nq * bq, nk * bk), bool)
        padded[:, :L, :S] = arr
        blocks = padded.reshape(hm, nq, bq, nk, bk).transpose(0, 1, 3, 2, 4)
        some = blocks.any(axis=(-1, -2))
        valid = np.zeros((nq * bq, nk * bk), bool)
        valid[:L, :] = True
        valid[:, S:] = False
        vblocks = valid.reshape(nq, bq, nk, bk).transpose(0, 2, 1, 3)
        every = (blocks | ~vblocks[None]).all(axis=(-1, -2))
        every &= ~(np.arange(nk) * bk + bk > S)[None, None, :]
        kind = np.where(every & some, 2, np.where(some, 1, 0)).astype(np.int8)
        tiles = [blocks[h][kind[h] == 1] for h in range(hm)]
        return _assemble(kind, tiles, L, S, (bq, bk))

    @staticmethod
    def unify(*masks: BlockMask) -> tuple[BlockMask, ...]:
        """Pad masks (same lengths, block size and heads) to common array shapes, so
        that one compiled function serves all of them.

        Raises:
          ValueError: masks with different lengths, block sizes or head counts.

        Example:
          >>> import jsparse.attention as ja
          >>> a = ja.BlockMask.from_fn(ja.causal(), 16, 16, block_size=(4, 4))
          >>> b = ja.BlockMask.from_fn(ja.local(4), 16, 16, block_size=(4, 4))
          >>> a2, b2 = ja.BlockMask.unify(a, b)
          >>> a2.shapes == b2.shapes, a2.nblocks() == a.nblocks()
          (True, True)
        """
        if not masks:
            return ()
        first = masks[0]
        for m in masks[1:]:
            if (m.q_len, m.kv_len, m.block_size, m.num_heads) != (
                first.q_len,
                first.kv_len,
                first.block_size,
                first.num_heads,
            ):
                raise ValueError(
                    "unify needs masks of equal q_len, kv_len, block_size and num_heads, got "
                    f"{first!r} and {m!r}"
                )
        return tuple(_pad_mask(m, masks) for m in masks)


# ------------------------------------------------------------------ helpers
def _eval_tiles(fn: MaskFn, qi, kj, bq, bk, L, S) -> np.ndarray:
    """The element masks of blocks ``(qi[n], kj[n])``, ``(n, bq, bk)`` bool, evaluated
    in chunks; padded rows and columns are False."""
    n = len(qi)
    out = np.zeros((n, bq, bk), bool)
    chunk = max(1, _TILE_BUDGET // (bq * bk))
    rows = np.arange(bq)[None, :, None]
    cols = np.arange(bk)[None, None, :]
    for s in range(0, n, chunk):
        q = qi[s : s + chunk, None, None] * bq + rows
        k = kj[s : s + chunk, None, None] * bk + cols
        ok = (q < L) & (k < S)
        val = np.asarray(fn(np.minimum(q, L - 1), np.minimum(k, S - 1)))
        out[s : s + chunk] = np.broadcast_to(val, ok.shape).astype(bool) & ok
    return out


def _all_valid(t, qi, kj, bq, bk, L, S) -> np.ndarray:
    """Whether each tile attends at every valid position and has no padded column."""
    if len(t) == 0:
        return np.zeros(0, bool)
    rows_pad = (qi[:, None] * bq + np.arange(bq)[None, :]) >= L  # (n, bq)
    cols_pad = (kj[:, None] * bk + np.arange(bk)[None, :]) >= S  # (n, bk)
    filled = t | rows_pad[:, :, None]
    return filled.all(axis=(1, 2)) & ~cols_pad.any(axis=1)


def _lists(kind_row: np.ndarray, value: int, tile_id: np.ndarray | None):
    """Ascending ids of blocks of ``kind == value`` per row of (Hm, n, m), their counts
    and (optionally) the tile ids at those blocks."""
    hit = kind_row == value
    count = hit.sum(-1).astype(np.int32)
    order = np.argsort(~hit, axis=-1, kind="stable").astype(np.int32)
    width = max(1, int(count.max(initial=0)))
    ids = _pad_rows(order, count, width)
    mids = None
    if tile_id is not None:
        mids = np.take_along_axis(tile_id, ids, axis=-1)
        mids = _pad_rows(np.maximum(mids, 0), count, width)
    return ids, count, mids


def _assemble(kind: np.ndarray, tiles: list[np.ndarray], L, S, block_size) -> BlockMask:
    """The BlockMask of block kinds (Hm, nq, nk) and the element masks of the partial
    blocks of each head (in row-major block order)."""
    hm, nq, nk = kind.shape
    bq, bk = block_size
    all_tiles = (
        np.concatenate(tiles, axis=0) if sum(len(t) for t in tiles) else np.zeros((0, bq, bk), bool)
    )
    if len(all_tiles):
        packed = np.packbits(all_tiles.reshape(len(all_tiles), -1), axis=1)
        uniq, inverse = np.unique(packed, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        first = np.zeros(len(uniq), np.int64)
        first[inverse[::-1]] = np.arange(len(inverse))[::-1]
        mask_blocks = all_tiles[first]
    else:
        inverse = np.zeros(0, np.int64)
        mask_blocks = np.zeros((1, bq, bk), bool)
    tile_id = np.full((hm, nq, nk), -1, np.int64)
    offset = 0
    for h in range(hm):
        qi, kj = np.nonzero(kind[h] == 1)
        tile_id[h, qi, kj] = inverse[offset : offset + len(qi)]
        offset += len(qi)
    kind_t = kind.transpose(0, 2, 1)
    tile_t = tile_id.transpose(0, 2, 1)
    full_kv, full_count, _ = _lists(kind, 2, None)
    partial_kv, partial_count, partial_mask = _lists(kind, 1, tile_id)
    full_q, full_q_count, _ = _lists(kind_t, 2, None)
    partial_q, partial_q_count, partial_q_mask = _lists(kind_t, 1, tile_t)
    plan = _make_plan(
        full_kv, full_count, partial_kv, partial_count, partial_mask,
        full_q, full_q_count, partial_q, partial_q_count, partial_q_mask,
    )  # fmt: skip
    return BlockMask(
        full_kv=jnp.asarray(full_kv),
        full_count=jnp.asarray(full_count),
        partial_kv=jnp.asarray(partial_kv),
        partial_count=jnp.asarray(partial_count),
        partial_mask=jnp.asarray(partial_mask),
        mask_blocks=jnp.asarray(mask_blocks),
        full_q=jnp.asarray(full_q),
        full_q_count=jnp.asarray(full_q_count),
        partial_q=jnp.asarray(partial_q),
        partial_q_count=jnp.asarray(partial_q_count),
        partial_q_mask=jnp.asarray(partial_q_mask),
        plan=plan,
        q_len=L,
        kv_len=S,
        block_size=(bq, bk),
    )


def _make_plan(fkv, fc, pkv, pc, pm, fq, fqc, pq, pqc, pqm) -> XlaPlan:
    rf = _grid(fkv, fc, None)
    rp = _grid(pkv, pc, pm)
    cf = _grid(fq, fqc, None)
    cp = _grid(pq, pqc, pqm)
    row_merge = _merge_table(rf[4], rp[4], rf[0].shape[1], rp[0].shape[1])
    col_merge = _merge_table(cf[4], cp[4], cf[0].shape[1], cp[0].shape[1])
    a = jnp.asarray
    return XlaPlan(
        rf_ids=a(rf[0]), rf_count=a(rf[1]), rf_owner=a(rf[2]),
        rp_ids=a(rp[0]), rp_count=a(rp[1]), rp_owner=a(rp[2]), rp_mask=a(rp[3]),
        row_merge=a(row_merge),
        cf_ids=a(cf[0]), cf_count=a(cf[1]), cf_owner=a(cf[2]),
        cp_ids=a(cp[0]), cp_count=a(cp[1]), cp_owner=a(cp[2]), cp_mask=a(cp[3]),
        col_merge=a(col_merge),
    )  # fmt: skip


def _pad_axis(x: np.ndarray, axis: int, size: int, mode: str, fill: int = 0) -> np.ndarray:
    """Pad ``x`` along ``axis`` to ``size``: ``"edge"`` repeats the last entry,
    ``"const"`` fills with ``fill``."""
    extra = size - x.shape[axis]
    if extra <= 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    if mode == "edge":
        return np.pad(x, widths, mode="edge")
    return np.pad(x, widths, constant_values=fill)


def _pad_mask(m: BlockMask, masks: Sequence[BlockMask]) -> BlockMask:
    """``m`` padded to the largest shapes among ``masks``."""

    def top(get, axis):
        return max(np.shape(get(x))[axis] for x in masks)

    def lists(name, axis=-1):
        return _pad_axis(np.asarray(getattr(m, name)), axis, top(lambda x: getattr(x, name), axis),
                         "edge")  # fmt: skip

    fields = {name: lists(name) for name in ("full_kv", "partial_kv", "partial_mask", "full_q",
                                              "partial_q", "partial_q_mask")}  # fmt: skip
    for name in ("full_count", "partial_count", "full_q_count", "partial_q_count"):
        fields[name] = np.asarray(getattr(m, name))
    fields["mask_blocks"] = _pad_axis(
        np.asarray(m.mask_blocks), 0, top(lambda x: x.mask_blocks, 0), "const"
    )
    p = m.plan
    new = {}
    # Each grid: pad T (edge-repeat ids / masks) and R (empty rows: count 0).
    empty_row = {}
    for g, has_mask in (("rf", False), ("rp", True), ("cf", False), ("cp", True)):
        names = [f"{g}_ids"] + ([f"{g}_mask"] if has_mask else [])
        r_new = top(lambda x, g=g: getattr(x.plan, f"{g}_ids"), 1)
        t_new = top(lambda x, g=g: getattr(x.plan, f"{g}_ids"), 2)
        for name in names:
            arr = _pad_axis(np.asarray(getattr(p, name)), 2, t_new, "edge")
            new[name] = _pad_axis(arr, 1, r_new, "const")
        new[f"{g}_count"] = _pad_axis(np.asarray(getattr(p, f"{g}_count")), 1, r_new, "const")
        new[f"{g}_owner"] = _pad_axis(np.asarray(getattr(p, f"{g}_owner")), 1, r_new, "const")
        empty_row[g] = (np.asarray(getattr(p, f"{g}_ids")).shape[1], r_new)
    for merge, (gf, gp) in (("row_merge", ("rf", "rp")), ("col_merge", ("cf", "cp"))):
        table = np.asarray(getattr(p, merge)).astype(np.int64)
        rf_old, rf_new = empty_row[gf]
        rp_old, rp_new = empty_row[gp]
        old_empty = rf_old + rp_old
        remapped = np.where(
            table == old_empty,
            rf_new + rp_new,
            np.where(table >= rf_old, table - rf_old + rf_new, table),
        )
        v_new = top(lambda x, merge=merge: getattr(x.plan, merge), 2)
        new[merge] = _pad_axis(remapped, 2, v_new, "const", fill=rf_new + rp_new)
    plan = XlaPlan(**{k: jnp.asarray(v, jnp.int32) for k, v in new.items()})
    return BlockMask(
        **{k: jnp.asarray(v) for k, v in fields.items()},
        plan=plan,
        q_len=m.q_len,
        kv_len=m.kv_len,
        block_size=m.block_size,
    )


def _flatten(m: BlockMask):
    children = tuple(getattr(m, name) for name in _LEAVES)
    aux = tuple(getattr(m, name) for name in _STATIC)
    return children, aux


def _flatten_with_keys(m: BlockMask):
    children = tuple((jax.tree_util.GetAttrKey(name), getattr(m, name)) for name in _LEAVES)
    aux = tuple(getattr(m, name) for name in _STATIC)
    return children, aux


def _unflatten(aux, children) -> BlockMask:
    obj = object.__new__(BlockMask)
    for name, value in zip(_LEAVES, children, strict=True):
        object.__setattr__(obj, name, value)
    for name, value in zip(_STATIC, aux, strict=True):
        object.__setattr__(obj, name, value)
    return obj


jax.tree_util.register_pytree_with_keys(BlockMask, _flatten_with_keys, _unflatten, _flatten)
