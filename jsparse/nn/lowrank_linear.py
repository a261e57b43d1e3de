"""``LowRankSparseLinear``: a linear layer with a low-rank + block-sparse kernel."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init

from jsparse.formats.lowrank import LowRankSparse
from jsparse.formats.lowrank.matrix import check_rank
from jsparse.nn.bcsr_linear import block_count, initial_bcsr
from jsparse.nn.format_linear import FormatLinear

__all__ = ["LowRankSparseLinear"]


class LowRankSparseLinear(FormatLinear):
    """A linear layer ``y = x @ (U @ V + S) + b`` with ``U (in_features, rank)``,
    ``V (rank, out_features)`` and a block-sparse ``S`` (a :class:`jsparse.LowRankSparse`;
    format name ``"lowrank"``).

    ``U``, ``V`` and ``S``'s stored blocks are :class:`flax.nnx.Param`
    (``kernel_U``, ``kernel_V``, ``kernel_S_data``); ``S``'s pattern
    (``kernel_S_indices``, ``kernel_S_indptr`` and the derived ``kernel_S_row_ids``,
    ``kernel_S_col_ptr``, ``kernel_S_col_order``) is a
    :class:`~jsparse.nn.SparsityPattern`. A sharding spec ``(a, b)`` of the kernel
    becomes ``(a, None)`` on ``U``, ``(None, b)`` on ``V`` and ``(None, a, b)`` on
    ``S_data``; the pattern is replicated.

    Args:
      in_features, out_features: the dense kernel shape.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init, promote_dtype,
        preferred_element_type, rngs, kernel_metadata, bias_metadata, impl: as in
        :class:`~jsparse.nn.FormatLinear` (``nnx.Linear``'s, without ``dot_general``).
      rank: the rank of ``U @ V`` (``0 <= rank <= min(in_features, out_features)``).
      sparsity, block_shape: ``S``'s fraction of blocks not stored, and its blocks,
        as in :class:`~jsparse.nn.BCSRLinear`.

    At initialisation ``S`` holds ``kernel_init``'s kernel at a random pattern, ``U``
    is drawn like a ``(in_features, rank)`` kernel and ``V`` is zero (as LoRA starts),
    so the layer starts as its sparse part and ``U @ V`` learns the rest. Use
    :meth:`from_kernel` / ``sparsify(format="lowrank")`` to split a trained kernel.

    Raises:
      ValueError: a rank out of range, sparsity outside ``[0, 1)``, or a block shape
        that does not divide the kernel.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.nn import LowRankSparseLinear
      >>> layer = LowRankSparseLinear(32, 16, rank=2, sparsity=0.75, block_shape=(8, 8),
      ...                             rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((3, 32))).shape, layer.rank, layer.kernel_S_data.shape
      ((3, 16), 2, (2, 8, 8))
    """

    format_name = "lowrank"
    kernel_leaf_axes = MappingProxyType(
        {"U": ("in", None), "V": (None, "out"), "S_data": (None, "in", "out")}
    )

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        kernel_init: nnx.Initializer = default_kernel_init,
        bias_init: nnx.Initializer = default_bias_init,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        impl: str = "auto",
        rank: int,
        sparsity: float,
        block_shape: Sequence[int] = (1, 1),
    ):
        super().__init__(
            in_features,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
            promote_dtype=promote_dtype,
            preferred_element_type=preferred_element_type,
            rngs=rngs,
            kernel_metadata=kernel_metadata,
            bias_metadata=bias_metadata,
            impl=impl,
            rank=rank,
            sparsity=sparsity,
            block_shape=block_shape,
        )

    def _init_kernel(self, kernel_init, key, *, rank, sparsity, block_shape) -> LowRankSparse:
        shape = (self.in_features, self.out_features)
        rank = check_rank(rank, shape)
        nse, _ = block_count(shape, block_shape, sparsity)
        bm, bn = (int(b) for b in block_shape)
        dense = kernel_init(key, shape, self.param_dtype)
        s = initial_bcsr(dense, jax.random.fold_in(key, 1), block_shape=(bm, bn), nse=nse)
        u = kernel_init(jax.random.fold_in(key, 2), (shape[0], rank), self.param_dtype)
        v = jnp.zeros((rank, shape[1]), self.param_dtype)
        return LowRankSparse(u, v, s)

    @classmethod
    def from_kernel(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        rank: int,
        sparsity: float,
        block_shape: Sequence[int] = (1, 1),
        **layer_kwargs: Any,
    ) -> LowRankSparseLinear:
        """Split ``kernel`` into rank-``rank`` + block-sparse parts
        (:meth:`jsparse.LowRankSparse.fromdense`, ``S`` with the constructor's
        number of blocks).

        Args:
          kernel: dense ``(in_features, out_features)``.
          bias: ``(out_features,)`` or ``None`` (no bias).
          rank, sparsity, block_shape: as in the constructor.
          **layer_kwargs: the constructor's other keyword arguments; ``param_dtype``
            defaults to ``kernel.dtype``.

        Returns:
          The layer.

        Raises:
          ValueError: as the constructor, or a kernel that is not 2-D.

        Example:
          >>> import jax.numpy as jnp
          >>> from jsparse.nn import LowRankSparseLinear
          >>> kernel = jnp.ones((8, 8)).at[0, 7].set(5.0)  # rank 1 + one entry
          >>> layer = LowRankSparseLinear.from_kernel(kernel, rank=1, sparsity=63 / 64)
          >>> bool(jnp.allclose(layer.dense_kernel(), kernel, atol=1e-5))
          True
        """
        kernel = jnp.asarray(kernel)
        layer = cls._from_dense_kernel(
            kernel,
            bias,
            kernel_init=lambda _, shape, dtype: jnp.zeros(shape, dtype),
            rank=rank,
            sparsity=sparsity,
            block_shape=block_shape,
            **layer_kwargs,
        )
        w = LowRankSparse.fromdense(
            kernel.astype(layer.param_dtype),
            rank=layer.rank,
            nse=layer.kernel_S_data.shape[0],
            block_shape=block_shape,
        )
        layer.set_kernel(w)
        return layer

    @property
    def rank(self) -> int:
        """The rank of ``U @ V``."""
        return self.kernel_U.shape[1]
