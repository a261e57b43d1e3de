"""A sparse matrix split over the devices of one mesh axis (tensor parallel).

A :class:`Split` holds one shard per device: ``local`` is the format with every leaf
stacked along a new leading axis of size ``parts`` (``batch_shape == (parts,)``), so
``PartitionSpec(axis)`` on every leaf puts shard ``d`` on device ``d`` of the mesh axis
and, inside ``jax.shard_map``, each device sees its own shard (leading axis 1).

How each format is split (``along``):

* **BCSR**, ``"rows"`` (block-rows) or ``"cols"`` (block-columns): each shard is a
  BCSR of the local shape holding the blocks of its range. Shards store different
  numbers of blocks, so each is padded to the largest count with explicit zero blocks
  at positions the shard does not store (BCSR's invariants hold: sorted, one block per
  position). ``padding`` (a leaf, ``(parts, nse)`` bool) marks them; the product,
  :meth:`Split.todense`, :attr:`Split.nbytes` and :func:`jsparse.parallel.grow_and_drop`
  ignore them (the product multiplies padded blocks by zero, so their gradient is zero
  and an optimizer leaves them at zero).
* **N:M**, ``"rows"`` or ``"cols"``: along the grouped axis the split moves whole
  groups (``parts`` must divide the number of groups), along the other axis rows or
  columns; no padding.
* **Monarch**, ``"blocks"``: each device owns ``nblocks // parts`` diagonal blocks of
  both factors; ``local`` keeps Monarch's static fields (global shape and
  ``nblocks``) and stacks the factors as ``(parts, nblocks // parts, ...)``.
* **LowRankSparse**, ``"rows"`` or ``"cols"``: the sparse part is split like a BCSR
  (with padding), the low-rank factor on the split side (``U`` for rows, ``V`` for
  columns) likewise, and the other factor is replicated in every shard.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.core.matrix import AbstractSparseMatrix
from jsparse.formats import BCSR, NM, LowRankSparse, Monarch

__all__ = ["Split", "split"]

_ALONG = {
    BCSR: ("rows", "cols"),
    NM: ("rows", "cols"),
    Monarch: ("blocks",),
    LowRankSparse: ("rows", "cols"),
}


@jax.tree_util.register_pytree_with_keys_class
class Split:
    """A matrix split into ``parts`` shards along ``along`` (see the module docstring).

    Attributes:
      local: the format, every leaf stacked along a leading axis of size ``parts``.
      padding: ``(parts, nse)`` bool, True for the explicit zero blocks that pad a BCSR
        shard (LowRankSparse: of its sparse part) to the common count; ``None`` for
        formats without padding.
      along: ``"rows"``, ``"cols"`` or ``"blocks"``.
      shape: the global shape.

    Make one with :func:`split`; put it on a mesh with :meth:`on_mesh`.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(8), block_shape=(2, 2))
      >>> s = jsparse.parallel.split(a, 2, along="rows")
      >>> s.parts, s.local.batch_shape, s.local.shape, bool((s.todense() == a.todense()).all())
      (2, (2,), (4, 8), True)
    """

    def __init__(self, local: AbstractSparseMatrix, padding, along: str, shape):
        self.local = local
        self.padding = padding
        self.along = along
        self.shape = tuple(shape)

    # ------------------------------------------------------------ pytree glue
    def tree_flatten_with_keys(self):
        keys = jax.tree_util.GetAttrKey
        return [(keys("local"), self.local), (keys("padding"), self.padding)], (
            self.along,
            self.shape,
        )

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.local, obj.padding = children
        obj.along, obj.shape = aux
        return obj

    def __repr__(self) -> str:
        return (
            f"Split({type(self.local).__name__}, parts={self.parts}, along={self.along!r}, "
            f"shape={self.shape})"
        )

    # ------------------------------------------------------------ properties
    @property
    def parts(self) -> int:
        """The number of shards (the size of the leading axis of ``local``'s leaves).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.NM.fromdense(jnp.ones((8, 8)), n=2, m=4)
          >>> jsparse.parallel.split(a, 4, along="rows").parts
          4
        """
        return int(jax.tree.leaves(self.local)[0].shape[0])

    @property
    def dtype(self):
        """The dtype of the stored values.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.NM.fromdense(jnp.ones((8, 8)), n=2, m=4)
          >>> jsparse.parallel.split(a, 2, along="cols").dtype
          dtype('float32')
        """
        return self.local.dtype

    def shard(self, d: int) -> AbstractSparseMatrix:
        """Shard ``d`` as a plain (unstacked) format, padding zeroed. For Monarch the
        factors' blocks of device ``d`` (a Monarch with the global static fields, not a
        matrix of its own).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.eye(8), block_shape=(2, 2))
          >>> jsparse.parallel.split(a, 2, along="cols").shard(1).todense().shape
          (8, 4)
        """
        if not 0 <= d < self.parts:
            raise ValueError(f"shard index {d} out of range for {self.parts} parts")
        return _shard(self, d)

    def todense(self) -> jax.Array:
        """The dense global matrix (padding ignored): equal to the unsplit
        matrix's ``todense()``.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> x = jnp.arange(64.0).reshape(8, 8)
          >>> a = jsparse.BCSR.fromdense(x, block_shape=(2, 2))
          >>> bool((jsparse.parallel.split(a, 4, along="cols").todense() == x).all())
          True
        """
        return _todense(self)

    def merged(self) -> AbstractSparseMatrix:
        """The unsplit matrix, for Monarch (whose factors' blocks are only regrouped).

        Example:
          >>> import jax, jsparse
          >>> a = jsparse.Monarch.init(jax.random.key(0), (16, 16), nblocks=4)
          >>> jsparse.parallel.split(a, 2, along="blocks").merged().left.shape
          (4, 4, 4)
        """
        if self.along != "blocks":
            raise ValueError(
                f"merged() regroups Monarch blocks; a split along {self.along!r} has "
                "shards of their own shape: use todense()"
            )
        return jax.tree.map(lambda leaf: leaf.reshape(-1, *leaf.shape[2:]), self.local)

    @property
    def npadding(self) -> int:
        """The number of padding blocks over all shards (0 without padding). Needs a
        concrete ``padding`` (not under ``jit``).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.eye(8).at[0, 7].set(1.0), block_shape=(2, 2))
          >>> jsparse.parallel.split(a, 2, along="rows").npadding  # 3 and 2 blocks
          1
        """
        if self.padding is None:
            return 0
        if isinstance(self.padding, jax.core.Tracer):
            raise ValueError(
                "npadding, nstored and nbytes of a Split need a concrete padding mask "
                "(call them outside jit)"
            )
        return int(np.asarray(self.padding).sum())

    @property
    def nstored(self) -> int:
        """Stored values over all shards, padding excluded (a replicated LowRankSparse
        factor counted once).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.eye(8).at[0, 7].set(1.0), block_shape=(2, 2))
          >>> jsparse.parallel.split(a, 2, along="rows").nstored == a.nstored
          True
        """
        total = self.local.nstored - self.npadding * _block_size(self)
        return total - (self.parts - 1) * _replicated_size(self)

    @property
    def nbytes(self) -> int:
        """Bytes of every shard's leaves, without the padding blocks (their values and
        their per-block index entries), the padding mask, or the extra copies of a
        replicated LowRankSparse factor.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> a = jsparse.BCSR.fromdense(jnp.eye(8).at[0, 7].set(1.0), block_shape=(2, 2))
          >>> s = jsparse.parallel.split(a, 2, along="rows")
          >>> s.nbytes == a.block_rows(0, 2).nbytes + a.block_rows(2, 4).nbytes
          True
        """
        per_block = 0
        if self.padding is not None:
            leaves = _block_leaves(self.local)
            per_block = sum(int(math.prod(x.shape[2:])) * x.dtype.itemsize for x in leaves.values())
        replicated = _replicated_size(self) * self.dtype.itemsize
        return self.local.nbytes - self.npadding * per_block - (self.parts - 1) * replicated

    def on_mesh(self, mesh: jax.sharding.Mesh, axis: str) -> Split:
        """This split placed on ``mesh``: shard ``d`` on device ``d`` of ``axis``
        (``PartitionSpec(axis)`` on every leaf).

        Raises:
          ValueError: ``axis`` is not an axis of ``mesh``, or its size is not ``parts``.

        Example:
          >>> import jax, jax.numpy as jnp, jsparse
          >>> mesh = jax.make_mesh((1,), ("model",))
          >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
          >>> s = jsparse.parallel.split(a, 1, along="rows").on_mesh(mesh, "model")
          >>> s.local.data.sharding.spec
          P('model',)
        """
        check_axis(self, mesh, axis)
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
        return jax.device_put(self, sharding)


def check_axis(s: Split, mesh, axis: str) -> None:
    """ValueError unless ``axis`` is a mesh axis with ``s.parts`` devices."""
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    if axis not in sizes:
        raise ValueError(f"{axis!r} is not an axis of the mesh (axes {tuple(sizes)})")
    if sizes[axis] != s.parts:
        raise ValueError(
            f"this Split has {s.parts} parts but mesh axis {axis!r} has {sizes[axis]} "
            f"devices: split into {sizes[axis]} parts for this axis"
        )


def mask_padding(local: AbstractSparseMatrix, padding) -> AbstractSparseMatrix:
    """``local`` (one shard, or a stack with ``padding`` stacked alike) with its padding
    blocks' values multiplied by zero (differentiably: their gradient is zero)."""
    if padding is None:
        return local
    keep = (~padding)[..., None, None]
    if isinstance(local, LowRankSparse):
        return local.with_values(local.U, local.V, jnp.where(keep, local.S_data, 0))
    return local.with_values(jnp.where(keep, local.data, 0))


def _block_leaves(local) -> dict:
    """The BCSR leaves with one entry per block (LowRankSparse: of its sparse part)."""
    prefix = "S_" if isinstance(local, LowRankSparse) else ""
    return {f: getattr(local, prefix + f) for f in ("data", "indices", "row_ids", "col_order")}


def _block_size(s: Split) -> int:
    if s.padding is None:
        return 0
    return int(math.prod(_block_leaves(s.local)["data"].shape[-2:]))


def _replicated_size(s: Split) -> int:
    if not isinstance(s.local, LowRankSparse):
        return 0
    factor = s.local.V if s.along == "rows" else s.local.U
    return int(math.prod(factor.shape[1:]))


# ---------------------------------------------------------------- splitting
def split(a: AbstractSparseMatrix, parts: int, *, along: str) -> Split:
    """Split ``a`` into ``parts`` shards for tensor parallelism (module docstring).

    Works host-side on the pattern (the index arrays must be concrete: call it outside
    ``jit``); the values may be traced, so ``jax.grad`` flows from the shards' values
    back to ``a``'s.

    Args:
      a: a BCSR, NM, Monarch or LowRankSparse matrix (not stacked).
      parts: the number of shards (the size of the mesh axis it will live on).
      along: ``"rows"`` (output-parallel for ``a @ x``, input-parallel for ``x @ a``),
        ``"cols"`` (the reverse) or, for Monarch, ``"blocks"``.

    Returns:
      A :class:`Split`; ``split(a, ...).todense()`` equals ``a.todense()``.

    Raises:
      TypeError: ``a`` is not one of the four formats.
      ValueError: ``along`` is not offered for the format, ``parts`` is not a positive
        int, ``parts`` does not divide the block-rows / block-columns / groups / blocks
        (the message names both sizes), or the pattern is traced.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(8), block_shape=(2, 2))
      >>> s = jsparse.parallel.split(a, 2, along="cols")
      >>> s.local.data.shape, s.local.shape  # 2 shards of 2 blocks, each (8, 4)
      ((2, 2, 2, 2), (8, 4))
    """
    if not isinstance(a, tuple(_ALONG)):
        raise TypeError(
            "jsparse.parallel.split takes a BCSR, NM, Monarch or LowRankSparse matrix, "
            f"got {type(a).__name__}"
        )
    if along not in _ALONG[type(a)]:
        raise ValueError(
            f"a {type(a).__name__} splits along {' or '.join(map(repr, _ALONG[type(a)]))}, "
            f"got along={along!r}"
        )
    if isinstance(parts, bool) or not isinstance(parts, int | np.integer) or parts < 1:
        raise ValueError(f"parts must be a positive int, got {parts!r}")
    parts = int(parts)
    a._check_unstacked("jsparse.parallel.split")
    if isinstance(a, BCSR):
        local, padding = _split_bcsr(a, parts, along)
    elif isinstance(a, NM):
        local, padding = _split_nm(a, parts, along), None
    elif isinstance(a, Monarch):
        local, padding = _split_monarch(a, parts), None
    else:
        local, padding = _split_lowrank(a, parts, along)
    return Split(local, padding, along, a.shape)


def _divides(parts: int, total: int, what: str, a) -> int:
    if total % parts:
        raise ValueError(
            f"cannot split {type(a).__name__} of shape {tuple(a.shape)} into {parts} parts: "
            f"{parts} does not divide its {total} {what}"
        )
    return total // parts


def _split_bcsr(a: BCSR, parts: int, along: str):
    (bm, bn), (m, k) = a.block_shape, a.shape
    nbr, nbc = m // bm, k // bn
    if isinstance(a.indices, jax.core.Tracer) or isinstance(a.indptr, jax.core.Tracer):
        raise ValueError(
            "jsparse.parallel.split needs a concrete BCSR pattern (call it outside jit): "
            "how many blocks each shard holds depends on it"
        )
    rows = np.asarray(a.row_ids).astype(np.int64)
    cols = np.asarray(a.indices).astype(np.int64)
    if along == "rows":
        per = _divides(parts, nbr, "block-rows", a)
        owner, rows = rows // per, rows % per
        grid, shape = (per, nbc), (m // parts, k)
    else:
        per = _divides(parts, nbc, "block-columns", a)
        owner, cols = cols // per, cols % per
        grid, shape = (nbr, per), (m, k // parts)
    counts = np.bincount(owner, minlength=parts)
    nse = max(int(counts.max(initial=0)), 1)
    sources, positions = [], []
    for d in range(parts):
        mine = np.flatnonzero(owner == d)
        flat = rows[mine] * grid[1] + cols[mine]
        # Padding: the first positions this shard does not store (row-major).
        free = np.setdiff1d(np.arange(grid[0] * grid[1]), flat)[: nse - mine.size]
        pos = np.concatenate([flat, free])
        order = np.argsort(pos, kind="stable")
        positions.append(pos[order])
        sources.append(np.concatenate([mine, np.full(free.size, -1)])[order])
    source, positions = np.stack(sources), np.stack(positions)
    padding = source < 0
    local = _assemble_bcsr(
        a.data, np.maximum(source, 0), padding, positions // grid[1], positions % grid[1], shape
    )
    return local, jnp.asarray(padding)


@functools.partial(jax.jit, static_argnames=("shape",))
def _assemble_bcsr(data, source, padding, rows, cols, shape) -> BCSR:
    """The stacked shards (one compiled program, not a few dozen small ones)."""
    blocks = jnp.where(padding[..., None, None], 0, data[source])

    def one(blocks, rows, cols):
        return BCSR.from_positions(blocks, rows, cols, shape=shape)

    return jax.vmap(one)(blocks, rows, cols)


def _split_nm(a: NM, parts: int, along: str):
    axis = 0 if along == "rows" else 1
    if axis == a.axis:  # whole groups per shard
        _divides(parts, a.shape[axis] // a.m, f"groups of {a.m} along axis {axis}", a)
    else:
        _divides(parts, a.shape[axis], "rows" if axis == 0 else "columns", a)
    shape = list(a.shape)
    shape[axis] //= parts
    return _assemble_nm(
        a.values, a.unpacked_positions, parts=parts, axis=axis, shape=tuple(shape), n=a.n,
        m=a.m, grouped=a.axis,
    )  # fmt: skip


@functools.partial(jax.jit, static_argnames=("parts", "axis", "shape", "n", "m", "grouped"))
def _assemble_nm(values, positions, *, parts, axis, shape, n, m, grouped) -> NM:
    def chunks(x):  # (parts, ...): consecutive slices along ``axis``
        if axis == 0:
            return x.reshape(parts, x.shape[0] // parts, x.shape[1])
        return jnp.moveaxis(x.reshape(x.shape[0], parts, x.shape[1] // parts), 1, 0)

    def one(values, positions):
        return NM(values, positions, shape=shape, n=n, m=m, axis=grouped)

    return jax.vmap(one)(chunks(values), chunks(positions))


def _split_monarch(a: Monarch, parts: int):
    per = _divides(parts, a.nblocks, "diagonal blocks", a)
    return jax.tree.map(lambda leaf: leaf.reshape(parts, per, *leaf.shape[1:]), a)


def _split_lowrank(a: LowRankSparse, parts: int, along: str):
    s, padding = _split_bcsr(a.S, parts, along)
    return _assemble_lowrank(a.U, a.V, s, parts=parts, along=along), padding


@functools.partial(jax.jit, static_argnames=("parts", "along"))
def _assemble_lowrank(u, v, s: BCSR, *, parts, along) -> LowRankSparse:
    if along == "rows":
        u = u.reshape(parts, u.shape[0] // parts, u.shape[1])
        v = jnp.broadcast_to(v, (parts, *v.shape))
    else:
        u = jnp.broadcast_to(u, (parts, *u.shape))
        v = jnp.moveaxis(v.reshape(v.shape[0], parts, v.shape[1] // parts), 1, 0)
    return jax.vmap(LowRankSparse)(u, v, s)


@jax.jit
def _shard(s: Split, d) -> AbstractSparseMatrix:
    mine = jax.tree.map(lambda leaf: leaf[d], s)
    return mask_padding(mine.local, mine.padding)


@jax.jit
def _todense(s: Split) -> jax.Array:
    if s.along == "blocks":
        return s.merged().todense()
    dense = jax.vmap(lambda local, padding: mask_padding(local, padding).todense())(
        s.local, s.padding
    )
    parts, rows, cols = dense.shape
    if s.along == "rows":
        return dense.reshape(parts * rows, cols)
    return jnp.moveaxis(dense, 0, 1).reshape(rows, parts * cols)
