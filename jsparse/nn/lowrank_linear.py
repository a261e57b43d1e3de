"""``LowRankSparseLinear``: a linear layer with a low-rank + block-sparse kernel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import default_bias_init, default_kernel_init

from jsparse.lowrank import LowRankSparse
from jsparse.nn._format_linear import FormatLinear
from jsparse.nn.sparse_linear import block_count, random_pattern_bcsr

__all__ = ["LowRankSparseLinear"]


class LowRankSparseLinear(FormatLinear):
    """A linear layer ``y = x @ (U @ V + S) + b`` with ``U (in_features, rank)``,
    ``V (rank, out_features)`` and a block-sparse ``S`` (a :class:`jsparse.LowRankSparse`).

    ``U``, ``V`` and ``S``'s stored blocks are :class:`flax.nnx.Param`
    (``kernel_U``, ``kernel_V``, ``kernel_S_data``); ``S``'s pattern is a
    :class:`~jsparse.nn.SparsityPattern`.

    Args:
      in_features, out_features: the dense kernel shape.
      rank: the rank of ``U @ V`` (``0 <= rank <= min(in_features, out_features)``).
      sparsity, block_shape: ``S``'s fraction of blocks not stored, and its blocks,
        as in :class:`~jsparse.nn.SparseLinear`.
      use_bias, dtype, param_dtype, kernel_init, bias_init, rngs, impl: as in
        :class:`~jsparse.nn.SparseLinear`.

    At initialisation ``S`` holds ``kernel_init``'s kernel at a random pattern, ``U``
    is drawn like a ``(in_features, rank)`` kernel and ``V`` is zero (as LoRA starts),
    so the layer starts as its sparse part and ``U @ V`` learns the rest. Use
    :meth:`from_kernel` / ``sparsify(format="lowrank")`` to split a trained kernel.

    Raises:
      ValueError: a rank out of range, sparsity outside ``[0, 1)``, or a block shape
        that does not divide the kernel.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        sparsity: float,
        block_shape: Sequence[int] = (1, 1),
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: nnx.Initializer = default_kernel_init,
        bias_init: nnx.Initializer = default_bias_init,
        impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self._init_common(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            impl=impl,
        )
        shape = (self.in_features, self.out_features)
        rank = _check_rank(rank, shape)
        nse, _ = block_count(shape, block_shape, sparsity)
        dense = jnp.asarray(kernel_init(rngs.params(), shape, param_dtype), param_dtype)
        s = random_pattern_bcsr(
            dense, rngs.params(), block_shape=tuple(int(b) for b in block_shape), nse=nse
        )
        u = jnp.asarray(kernel_init(rngs.params(), (shape[0], rank), param_dtype), param_dtype)
        v = jnp.zeros((rank, shape[1]), param_dtype)
        self._set_kernel(LowRankSparse(u, v, s))
        self._init_bias(bias_init, rngs)

    @classmethod
    def from_kernel(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        rank: int,
        sparsity: float,
        block_shape: Sequence[int] = (1, 1),
        dtype: Any = None,
        param_dtype: Any = None,
        impl: str = "auto",
    ) -> LowRankSparseLinear:
        """Split ``kernel`` into rank-``rank`` + block-sparse parts
        (:meth:`jsparse.LowRankSparse.fromdense`)."""
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2:
            raise ValueError(f"kernel must be 2-D (in_features, out_features), got {kernel.shape}")
        rank = _check_rank(rank, kernel.shape)
        nse, _ = block_count(kernel.shape, block_shape, sparsity)
        param_dtype = kernel.dtype if param_dtype is None else param_dtype
        w = LowRankSparse.fromdense(
            kernel.astype(param_dtype), rank=rank, nse=nse, block_shape=block_shape
        )
        layer = cls(
            kernel.shape[0],
            kernel.shape[1],
            rank=rank,
            sparsity=sparsity,
            block_shape=block_shape,
            use_bias=bias is not None,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=lambda _, shape, dtype: jnp.zeros(shape, dtype),
            bias_init=lambda *_: bias,
            impl=impl,
            rngs=nnx.Rngs(0),
        )
        for name, leaf in zip(layer._kernel_leaf_names, jax.tree.leaves(w), strict=True):
            getattr(layer, name).set_value(leaf)
        return layer

    @property
    def rank(self) -> int:
        return self.kernel_U.shape[1]


def _check_rank(rank, shape) -> int:
    rank = int(rank)
    if not 0 <= rank <= min(shape):
        raise ValueError(
            f"rank must be in [0, {min(shape)}] for a {tuple(shape)} kernel, got {rank}"
        )
    return rank
