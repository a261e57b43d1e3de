"""Tensor parallelism: sparse matrices split over the devices of a mesh axis.

:func:`split` cuts a BCSR, N:M, Monarch or LowRankSparse matrix into one shard per
device (a :class:`Split`, every leaf stacked along a leading axis); :func:`matmul`
multiplies inside ``jax.shard_map`` and issues the collective the split needs (none,
one ``psum`` / ``psum_scatter``, or Monarch's one ``all_to_all``);
:func:`sharded_matmul` builds the ``shard_map`` for you. :class:`ParallelLinear` is the
NNX layer (column- or row-parallel) holding a Split kernel. docs/scale.md ("Tensor
parallel") says how each format is split and why.

Example:
  >>> import jax, jax.numpy as jnp, jsparse
  >>> mesh = jax.make_mesh((1,), ("model",))
  >>> a = jsparse.BCSR.fromdense(jnp.eye(8), block_shape=(2, 2))
  >>> s = jsparse.parallel.split(a, 1, along="rows").on_mesh(mesh, "model")
  >>> y = jsparse.parallel.sharded_matmul(s, jnp.ones((8, 2)), mesh=mesh, axis="model")
  >>> y.shape
  (8, 2)
"""

from jsparse.parallel.layers import ParallelLinear, ShardRemap
from jsparse.parallel.products import grow_and_drop, matmul, sharded_matmul
from jsparse.parallel.split import Split, split

__all__ = [
    "ParallelLinear",
    "ShardRemap",
    "Split",
    "grow_and_drop",
    "matmul",
    "sharded_matmul",
    "split",
]
