"""``MonarchLinear``: a linear layer with a Monarch kernel."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import default_bias_init

from jsparse.monarch import Monarch
from jsparse.nn._format_linear import FormatLinear

__all__ = ["MonarchLinear"]


class MonarchLinear(FormatLinear):
    """A linear layer ``y = x @ W + b`` whose kernel ``W (in_features, out_features)``
    is a :class:`jsparse.Monarch` matrix (block-diagonal factors with a block shuffle
    between them).

    The two factors (``kernel_left``, ``kernel_right``) are :class:`flax.nnx.Param`;
    they hold ``nblocks * block_rank * (in_features + out_features)`` values instead
    of ``in_features * out_features``.

    Args:
      in_features, out_features: the dense kernel shape; ``nblocks`` divides both.
      nblocks: diagonal blocks per factor.
      block_rank: rank of each sub-block (default: :meth:`jsparse.Monarch.init`'s).
      kernel_init: ``None`` (default) draws the factors with
        :meth:`jsparse.Monarch.init`, which matches ``lecun_normal``'s variance;
        an initializer draws a dense kernel and projects it onto Monarch matrices.
      use_bias, dtype, param_dtype, bias_init, rngs, impl: as in
        :class:`~jsparse.nn.SparseLinear`.

    Raises:
      ValueError: ``nblocks`` or ``block_rank`` that do not fit the shape.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        nblocks: int,
        block_rank: int | None = None,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: nnx.Initializer | None = None,
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
        key = rngs.params()
        if kernel_init is None:
            w = Monarch.init(key, shape, nblocks=nblocks, block_rank=block_rank, dtype=param_dtype)
        else:
            dense = jnp.asarray(kernel_init(key, shape, param_dtype), param_dtype)
            w = Monarch.fromdense(dense, nblocks=nblocks, block_rank=block_rank)
        self._set_kernel(w)
        self._init_bias(bias_init, rngs)

    @classmethod
    def from_kernel(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        nblocks: int,
        block_rank: int | None = None,
        dtype: Any = None,
        param_dtype: Any = None,
        impl: str = "auto",
    ) -> MonarchLinear:
        """The Monarch projection (Frobenius-nearest) of a dense ``kernel``."""
        return cls._from_dense_kernel(
            kernel,
            bias,
            dtype=dtype,
            param_dtype=param_dtype,
            impl=impl,
            nblocks=nblocks,
            block_rank=block_rank,
        )

    @property
    def nblocks(self) -> int:
        return self.kernel_left.shape[0]
