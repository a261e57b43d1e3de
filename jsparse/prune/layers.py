"""A pruned dense kernel as the jsparse layer that stores exactly its kept weights."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsparse.formats import BCSR, NM
from jsparse.nn import BCSRLinear, NMLinear
from jsparse.prune.structure import NMStructure, parse_structure

__all__ = ["to_sparse_layer"]


def to_sparse_layer(
    linear: nnx.Linear,
    pruned: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike,
    structure: Any = "unstructured",
    *,
    impl: str = "auto",
) -> BCSRLinear | NMLinear:
    """The jsparse layer replacing ``linear`` with the kernel ``pruned`` at ``mask``.

    Block and unstructured targets give a :class:`~jsparse.nn.BCSRLinear` storing
    exactly the blocks the mask touches (``(1, 1)`` blocks when unstructured); N:M
    gives a :class:`~jsparse.nn.NMLinear` (groups along the input axis) with the
    mask's positions, so a kept weight that happens to be zero stays in the pattern.
    The bias, dtypes, precision and metadata of ``linear`` are kept; ``linear`` itself
    is unchanged.

    Args:
      linear: the dense ``nnx.Linear``.
      pruned: ``(in, out)`` pruned kernel (zeros outside the mask).
      mask: ``(in, out)`` boolean kept mask (exactly ``n`` per group for N:M).
      structure: the target the mask was chosen for.
      impl: the new layer's matmul implementation.

    Returns:
      The new layer.

    Raises:
      ValueError: shapes disagree, or an N:M mask without exactly ``n`` per group.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.prune import magnitude_prune, to_sparse_layer
      >>> linear = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
      >>> pruned, mask = magnitude_prune(linear.kernel[...], structure="2:4")
      >>> layer = to_sparse_layer(linear, pruned, mask, "2:4")
      >>> type(layer).__name__, bool(jnp.all(layer.dense_kernel() == pruned))
      ('NMLinear', True)
    """
    structure = parse_structure(structure)
    kernel = linear.kernel[...]
    shape = tuple(kernel.shape)
    pruned = jnp.asarray(pruned)
    mask = np.asarray(mask, bool)
    if tuple(pruned.shape) != shape or mask.shape != shape:
        raise ValueError(
            f"pruned {tuple(pruned.shape)} and mask {mask.shape} must have the kernel's shape "
            f"{shape}"
        )
    dtype = linear.param_dtype
    # The layer's own constructor keeps the largest blocks / entries of the pruned
    # kernel, which is the mask unless a kept weight is exactly zero; then the
    # mask's pattern is installed explicitly.
    stand_in = nnx.clone(linear)
    stand_in.kernel[...] = pruned.astype(kernel.dtype)
    if isinstance(structure, NMStructure):
        n, m = structure.n, structure.m
        groups = mask.reshape(shape[0] // m, m, shape[1])
        if not np.all(groups.sum(axis=1) == n):
            raise ValueError(f"the mask does not keep exactly n={n} of every m={m} inputs")
        layer = NMLinear.from_linear(stand_in, n=n, m=m, impl=impl)
        if not np.array_equal(np.asarray(layer.kernel.mask()), mask):
            # The kept positions of each group, increasing (stable sort of "not kept").
            positions = np.argsort(~groups, axis=1, kind="stable")[:, :n, :]
            values = np.take_along_axis(
                np.asarray(pruned).reshape(shape[0] // m, m, shape[1]), positions, axis=1
            )
            layer.set_kernel(
                NM(
                    jnp.asarray(values.reshape(shape[0] // m * n, shape[1]), dtype),
                    positions.reshape(shape[0] // m * n, shape[1]).astype(np.uint8),
                    shape=shape,
                    n=n,
                    m=m,
                    axis=0,
                )  # fmt: skip
            )
        return layer
    bm, bn = structure.block_shape
    nbr, nbc = shape[0] // bm, shape[1] // bn
    kept = mask.reshape(nbr, bm, nbc, bn).any(axis=(1, 3))
    if not kept.any():
        kept[0, 0] = True  # a BCSR stores at least one block
    rows, cols = np.nonzero(kept)  # row-major order
    nse = len(rows)
    layer = BCSRLinear.from_linear(
        stand_in, sparsity=1.0 - nse / (nbr * nbc), block_shape=(bm, bn), impl=impl
    )
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=nbr))])
    same = layer.nse == nse and np.array_equal(np.asarray(layer.kernel_indices[...]), cols)
    if not (same and np.array_equal(np.asarray(layer.kernel_indptr[...]), indptr)):
        blocks = np.asarray(pruned).reshape(nbr, bm, nbc, bn).transpose(0, 2, 1, 3)[rows, cols]
        layer.set_kernel(
            BCSR(jnp.asarray(blocks, dtype), cols.astype(np.int32), indptr.astype(np.int32),
                 shape=shape),
            resize=True,
        )  # fmt: skip
    return layer
