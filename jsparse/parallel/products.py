"""Tensor-parallel products of a :class:`~jsparse.parallel.Split` with a dense operand.

:func:`matmul` runs inside ``jax.shard_map`` (each device holds its shard, leading axis
1) and issues the collective the split needs:

* the split axis of the matrix is **not** contracted (``a @ x`` with ``along="rows"``,
  ``x @ a`` with ``along="cols"``): each device computes its own slice of the output;
  no collective (output-parallel, Megatron's "column-parallel" layer for ``x @ W``);
* it **is** contracted (``a @ x`` with ``along="cols"``, ``x @ a`` with
  ``along="rows"``): the dense operand's contracted axis is sharded alike, each device
  computes a partial product, and the partials are summed with one ``psum``
  (``scatter=True``: one ``psum_scatter``, the result split along the same axis, ready
  for the next input-parallel product) — Megatron's "row-parallel" layer;
* Monarch split by ``"blocks"``: the contracted axis and the result are both split by
  blocks; the block shuffle between the two factors is one ``all_to_all``.

:func:`sharded_matmul` builds that ``shard_map`` for a mesh and axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jsparse.core.verbs import matmul as sparse_matmul
from jsparse.formats import BCSR, Monarch
from jsparse.parallel.split import Split, check_axis, mask_padding
from jsparse.train import grow_and_drop as bcsr_grow_and_drop

__all__ = ["grow_and_drop", "matmul", "sharded_matmul"]


def _operands(a, b):
    if isinstance(a, Split) and not isinstance(b, Split):
        return a, b, True
    if isinstance(b, Split) and not isinstance(a, Split):
        return b, a, False
    raise TypeError(
        "jsparse.parallel.matmul takes one Split (jsparse.parallel.split) and one dense "
        f"array, got {type(a).__name__} and {type(b).__name__}"
    )


def _contracts(s: Split, left: bool) -> bool:
    return (s.along == "cols") if left else (s.along == "rows")


def _local(s: Split, axis_name: str):
    """The device's own shard (inside ``shard_map``) and the size of the axis, after
    checking that every leaf holds one shard: a Split of more parts than the axis has
    devices, or index arrays sharded unlike the values, hold several."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(s):
        if leaf.shape[0] != 1:
            raise ValueError(
                f"jsparse.parallel.matmul: leaf {jax.tree_util.keystr(path)} of the Split "
                f"has {leaf.shape[0]} shards on this device; every leaf must hold exactly "
                f"one (shard_map in_specs: PartitionSpec({axis_name!r}) for every leaf of the "
                "Split, values and index arrays alike)"
            )
    return jax.tree.map(lambda leaf: leaf[0], s), jax.lax.axis_size(axis_name)


def matmul(a, b, *, axis_name: str, scatter: bool = False, impl: str = "auto") -> jax.Array:
    """``a @ b`` inside ``jax.shard_map``, one operand a :class:`Split` over mesh axis
    ``axis_name`` (in_spec ``PartitionSpec(axis_name)`` on every leaf), the other the
    device's part of the dense operand (module docstring: which axis of it is split).

    Args:
      a, b: a Split and a dense array (either order: ``Split @ x`` or ``x @ Split``).
        The dense operand is 2-D for ``Split @ x``; for ``x @ Split`` it may have
        leading batch axes.
      axis_name: the mesh axis the Split lives on (``parts`` devices).
      scatter: for a contracted split, sum with ``psum_scatter`` instead of ``psum``:
        the result comes out split along the output's feature axis (rows of
        ``Split @ x``, last axis of ``x @ Split``), like the contracted axis was.
      impl: the local product's implementation (:func:`jsparse.matmul`).

    Returns:
      This device's part of the product.

    Raises:
      TypeError: not exactly one Split.
      ValueError: a leaf holding more than one shard (in_specs that shard the index
        arrays differently from the values, or a Split of more parts than the axis has
        devices), an axis of the wrong size, or ``scatter`` on an output-parallel split.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> from jax.sharding import PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> s = jsparse.parallel.split(a, 1, along="cols").on_mesh(mesh, "model")
      >>> x = jax.device_put(jnp.ones((4, 2)), jax.sharding.NamedSharding(mesh, P("model")))
      >>> f = jax.shard_map(lambda s, x: jsparse.parallel.matmul(s, x, axis_name="model"),
      ...                   mesh=mesh, in_specs=(P("model"), P("model")), out_specs=P())
      >>> f(s, x).tolist()
      [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    """
    s, x, left = _operands(a, b)
    mine, parts = _local(s, axis_name)
    local = mask_padding(mine.local, mine.padding)
    x = jnp.asarray(x)
    if s.along == "blocks":
        if scatter:
            raise ValueError("scatter applies to a contracted split; Monarch blocks issue none")
        return _monarch(local, x, left, axis_name, parts)
    y = sparse_matmul(local, x, impl=impl) if left else sparse_matmul(x, local, impl=impl)
    if not _contracts(s, left):
        if scatter:
            raise ValueError(
                f"scatter=True needs a contracted split (Split @ x along 'cols', x @ Split "
                f"along 'rows'); this product along {s.along!r} issues no reduction"
            )
        return y
    if not scatter:
        return jax.lax.psum(y, axis_name)
    dim = 0 if left else y.ndim - 1
    if y.shape[dim] % parts:
        raise ValueError(
            f"scatter=True splits the result's axis {dim} (size {y.shape[dim]}) over {parts} "
            "devices: it must divide"
        )
    return jax.lax.psum_scatter(y, axis_name, scatter_dimension=dim, tiled=True)


def _monarch(local: Monarch, x: jax.Array, left: bool, axis_name: str, parts: int):
    """This device's blocks of a Monarch product; x holds its input blocks."""
    if left:
        return _monarch_apply(local.left, local.right, x, axis_name, parts)
    lead = x.shape[:-1]
    cols = x.reshape(-1, x.shape[-1]).T
    # x @ M = (M^T x^T)^T, and M^T is the Monarch (right^T blocks, left^T blocks).
    out = _monarch_apply(
        jnp.swapaxes(local.right, 1, 2), jnp.swapaxes(local.left, 1, 2), cols, axis_name, parts
    )
    return out.T.reshape(*lead, out.shape[0])


def _monarch_apply(left, right, x, axis_name: str, parts: int):
    """``blockdiag(left) P blockdiag(right) @ x`` with this device's ``nb`` blocks of
    each factor (``left (nb, s, q)``, ``right (nb, q, p)``, ``q = b * g``) and its rows
    of ``x`` (``(nb * p, N)``)."""
    if x.ndim != 2:
        raise ValueError(f"Split @ x takes a 2-D x, got shape {x.shape}")
    nb, q, p = right.shape
    b = nb * parts
    g = q // b
    if x.shape[0] != nb * p:
        raise ValueError(
            f"this device's x has {x.shape[0]} rows; its {nb} Monarch blocks of {p} "
            f"columns need {nb * p}"
        )
    dtype = jnp.promote_types(x.dtype, right.dtype)
    xb = x.reshape(nb, p, -1)
    mid = jnp.einsum("kqp,kpn->kqn", right, xb, preferred_element_type=jnp.float32)
    mid = mid.reshape(nb, b, g, -1)  # (own k, every l, e, n)
    # The block shuffle: middle entry (k, l, e) goes to the device owning block l.
    mid = jax.lax.all_to_all(mid, axis_name, split_axis=1, concat_axis=0, tiled=True)
    mid = jnp.swapaxes(mid, 0, 1).reshape(nb, q, -1)  # (own l, every (k, e), n)
    out = jnp.einsum(
        "lsq,lqn->lsn", left, mid.astype(left.dtype), preferred_element_type=jnp.float32
    )
    return out.reshape(-1, out.shape[-1]).astype(dtype)


def sharded_matmul(
    a,
    b,
    *,
    mesh: jax.sharding.Mesh,
    axis: str,
    scatter: bool = False,
    impl: str = "auto",
) -> jax.Array:
    """``a @ b`` with the Split placed on mesh axis ``axis``: builds the
    ``jax.shard_map`` (``check_vma=True``) around :func:`matmul` for users who do not
    write one. The dense operand and the result are global arrays; the dense operand's
    contracted axis is split over ``axis`` when the split is contracted (and for
    Monarch), replicated otherwise.

    Args:
      a, b: a Split and a dense 2-D array (either order).
      mesh: the mesh; ``axis`` must have ``parts`` devices.
      axis: the mesh axis of the split.
      scatter: see :func:`matmul` (the result stays split over ``axis``).
      impl: the local product's implementation.

    Returns:
      The global product (sharded over ``axis`` along its split or scattered axis).

    Raises:
      ValueError: ``axis`` is not on the mesh or does not have ``parts`` devices.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> s = jsparse.parallel.split(a, 1, along="rows")
      >>> jsparse.parallel.sharded_matmul(jnp.ones((3, 4)), s, mesh=mesh, axis="model").shape
      (3, 4)
    """
    s, x, left = _operands(a, b)
    check_axis(s, mesh, axis)
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"sharded_matmul takes a 2-D dense operand, got shape {x.shape}")
    contracted = s.along == "blocks" or _contracts(s, left)
    # Specs of x and of the result: index 0 is x's axis for Split @ x (rows), 1 for x @ Split.
    x_spec = (P(axis, None) if left else P(None, axis)) if contracted else P()
    if s.along == "blocks" or not contracted:
        out_spec = P(axis, None) if left else P(None, axis)
    else:
        out_spec = (P(axis, None) if left else P(None, axis)) if scatter else P()

    def local(s, x):
        return (
            matmul(s, x, axis_name=axis, scatter=scatter, impl=impl)
            if left
            else matmul(x, s, axis_name=axis, scatter=scatter, impl=impl)
        )

    run = jax.shard_map(
        local, mesh=mesh, in_specs=(P(axis), x_spec), out_specs=out_spec, check_vma=True
    )
    # Explicit mesh axes: shard_map takes operands already laid out as in_specs say.
    # (jax.sharding.reshard: its transpose reshards the cotangent back to the operand's
    # own layout, so a Split stacked under grad gets an unsharded cotangent.)
    if dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[axis] == AxisType.Explicit:
        s = jax.sharding.reshard(s, NamedSharding(mesh, P(axis)))
        x = jax.sharding.reshard(x, NamedSharding(mesh, x_spec))
    return run(s, x)


def grow_and_drop(s: Split, *, k, k_max: int, grow_scores: jax.Array) -> Split:
    """One dynamic-sparse-training step on every shard of a BCSR :class:`Split`
    (:func:`jsparse.train.grow_and_drop` per shard; each device prunes and grows
    within its shard, with its own shard-local scores).

    Padding blocks hold zeros, so they have the smallest norm and are dropped first;
    a padding position is stored, so it is never grown into a second time while it is
    kept. A grown block is real; a padding block that survives stays padding (the mask
    follows the blocks as they are re-sorted). Each shard's count of real blocks thus
    never falls, and rises by the padding blocks replaced.

    Args:
      s: a Split of a BCSR.
      k: blocks to replace per shard (int, or a ``(parts,)`` array).
      k_max: static bound for ``k``.
      grow_scores: ``(parts, nblocks_per_shard)`` scores, row-major over each shard's
        block grid.

    Returns:
      The Split with the new patterns (same shapes).

    Raises:
      TypeError: ``s`` is not a Split of a BCSR.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4).at[0, 3].set(1.0), block_shape=(2, 2))
      >>> s = jsparse.parallel.split(a, 2, along="rows")
      >>> s.npadding, jsparse.parallel.grow_and_drop(
      ...     s, k=1, k_max=1, grow_scores=jnp.ones((2, 2))).npadding
      (1, 0)
    """
    if not (isinstance(s, Split) and isinstance(s.local, BCSR)):
        raise TypeError("jsparse.parallel.grow_and_drop takes a Split of a BCSR")
    k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (s.parts,))

    def one(local, padding, k, scores):
        new, remap = bcsr_grow_and_drop(
            mask_padding(local, padding), k=k, k_max=k_max, grow_scores=scores
        )
        return new, padding[remap.source] & ~remap.reset

    local, padding = jax.vmap(one)(s.local, s.padding, k, grow_scores)
    return Split(local, padding, s.along, s.shape)
