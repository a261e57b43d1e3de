"""``MonarchLinear``: a linear layer with a Monarch kernel."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init

from jsparse.formats.monarch import Monarch
from jsparse.nn.format_linear import FormatLinear

__all__ = ["MonarchLinear"]


class MonarchLinear(FormatLinear):
    """A linear layer ``y = x @ W + b`` whose kernel ``W (in_features, out_features)``
    is a :class:`jsparse.Monarch` matrix (block-diagonal factors with a block shuffle
    between them; format name ``"monarch"``).

    The two factors (``kernel_left (nblocks, in // nblocks, q)``, ``kernel_right
    (nblocks, q, out // nblocks)``) are :class:`flax.nnx.Param`; they hold
    ``nblocks * block_rank * (in_features + out_features)`` values instead of
    ``in_features * out_features``. A sharding spec ``(a, b)`` of the kernel becomes
    ``(None, a, None)`` on ``kernel_left`` and ``(None, None, b)`` on
    ``kernel_right``.

    Args:
      in_features, out_features: the dense kernel shape; ``nblocks`` divides both.
      use_bias, dtype, param_dtype, precision, bias_init, promote_dtype,
        preferred_element_type, rngs, kernel_metadata, bias_metadata, impl: as in
        :class:`~jsparse.nn.FormatLinear` (``nnx.Linear``'s, without ``dot_general``).
      kernel_init: ``None`` (default) draws the factors with
        :meth:`jsparse.Monarch.init`, which matches ``lecun_normal``'s variance;
        an initializer draws a dense kernel and projects it onto Monarch matrices.
      nblocks: diagonal blocks per factor.
      block_rank: rank of each sub-block (default: :meth:`jsparse.Monarch.init`'s).

    Raises:
      ValueError: ``nblocks`` or ``block_rank`` that do not fit the shape.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.nn import MonarchLinear
      >>> layer = MonarchLinear(64, 32, nblocks=4, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 64))).shape, layer.kernel_left.shape, layer.nblocks
      ((2, 32), (4, 16, 8), 4)
    """

    format_name = "monarch"
    kernel_leaf_axes = MappingProxyType({"left": (None, "in", None), "right": (None, None, "out")})

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        kernel_init: nnx.Initializer | None = None,
        bias_init: nnx.Initializer = default_bias_init,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        impl: str = "auto",
        nblocks: int,
        block_rank: int | None = None,
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
            nblocks=nblocks,
            block_rank=block_rank,
        )

    def _init_kernel(self, kernel_init, key, *, nblocks, block_rank) -> Monarch:
        shape = (self.in_features, self.out_features)
        if kernel_init is None:
            return Monarch.init(
                key, shape, nblocks=nblocks, block_rank=block_rank, dtype=self.param_dtype
            )
        dense = kernel_init(key, shape, self.param_dtype)
        return Monarch.fromdense(dense, nblocks=nblocks, block_rank=block_rank)

    @classmethod
    def from_kernel(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        nblocks: int,
        block_rank: int | None = None,
        **layer_kwargs: Any,
    ) -> MonarchLinear:
        """The Monarch projection (Frobenius-nearest) of a dense ``kernel``.

        Args:
          kernel: dense ``(in_features, out_features)``.
          bias: ``(out_features,)`` or ``None`` (no bias).
          nblocks, block_rank: as in the constructor.
          **layer_kwargs: the constructor's other keyword arguments; ``param_dtype``
            defaults to ``kernel.dtype``.

        Returns:
          The layer.

        Raises:
          ValueError: as the constructor, or a kernel that is not 2-D.

        Example:
          >>> import jax.numpy as jnp
          >>> from jsparse.nn import MonarchLinear
          >>> layer = MonarchLinear.from_kernel(jnp.eye(8), nblocks=2, block_rank=4)
          >>> bool(jnp.allclose(layer.dense_kernel(), jnp.eye(8), atol=1e-6))
          True
        """
        return cls._from_dense_kernel(
            kernel, bias, nblocks=nblocks, block_rank=block_rank, **layer_kwargs
        )

    @property
    def nblocks(self) -> int:
        """Diagonal blocks per factor."""
        return self.kernel_left.shape[0]
