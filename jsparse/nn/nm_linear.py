"""``NMLinear``: a linear layer with an N:M structured sparse kernel."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init

from jsparse.formats.nm import NM
from jsparse.formats.nm.matrix import check_divides, check_nm
from jsparse.nn.format_linear import FormatLinear

__all__ = ["NMLinear", "check_input_groups"]


def check_input_groups(n: int, m: int, in_features: int) -> tuple[int, int]:
    """``(n, m)`` as ints for N:M groups along the input axis of an ``(in_features,
    out_features)`` kernel (:func:`jsparse.formats.nm.matrix.check_nm` and
    ``check_divides``, with the layer's wording).

    Raises:
      ValueError: ``n < 1``, ``n >= m``, ``m > 256``, or ``m`` does not divide
        ``in_features``.
      TypeError: ``n`` or ``m`` is not an int.

    Example:
      >>> from jsparse.nn.nm_linear import check_input_groups
      >>> check_input_groups(2, 4, 16)
      (2, 4)
    """
    n, m = check_nm(n, m)
    try:
        check_divides((int(in_features),), m, 0)
    except ValueError as e:
        raise ValueError(
            f"m={m} does not divide in_features={in_features} (N:M groups run along the input axis)"
        ) from e
    return n, m


class NMLinear(FormatLinear):
    """A linear layer ``y = x @ W + b`` whose kernel ``W (in_features, out_features)``
    keeps ``n`` of every ``m`` consecutive weights along the input axis (the
    contraction axis of ``x @ W``), stored as a :class:`jsparse.NM` (format name
    ``"nm"``).

    The kept values (``kernel_values``, ``(in_features // m * n, out_features)``) are
    an :class:`flax.nnx.Param`; their positions in each group (``kernel_positions``,
    ``uint8``) are a :class:`~jsparse.nn.SparsityPattern`. Both run along the dense
    kernel's axes (input groups, outputs; the positions packed along the outputs),
    so both get the kernel's sharding spec. Train N:M patterns with
    :class:`jsparse.train.SRSTE`, which ends in this layer.

    Args:
      in_features, out_features: the dense kernel shape; ``m`` divides ``in_features``.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init, promote_dtype,
        preferred_element_type, rngs, kernel_metadata, bias_metadata, impl: as in
        :class:`~jsparse.nn.FormatLinear` (``nnx.Linear``'s, without
        ``dot_general``). The pattern keeps the ``n`` largest of every group of the
        initial dense kernel.
      n, m: keep ``n`` of every ``m`` (``1 <= n < m``; 2:4 is the GPU sparse-tensor-core
        pattern).

    Raises:
      ValueError: ``n >= m``, ``n < 1``, or ``m`` does not divide ``in_features``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.nn import NMLinear
      >>> layer = NMLinear(16, 8, n=2, m=4, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((3, 16))).shape, layer.kernel_values.shape
      ((3, 8), (8, 8))
    """

    format_name = "nm"
    kernel_leaf_axes = MappingProxyType({"values": ("in", "out"), "positions": ("in", "out")})

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
        n: int = 2,
        m: int = 4,
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
            n=n,
            m=m,
        )

    def _init_kernel(self, kernel_init, key, *, n, m) -> NM:
        n, m = check_input_groups(n, m, self.in_features)
        dense = kernel_init(key, (self.in_features, self.out_features), self.param_dtype)
        return NM.fromdense(dense, n=n, m=m, axis=0)

    @classmethod
    def from_kernel(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        n: int = 2,
        m: int = 4,
        **layer_kwargs: Any,
    ) -> NMLinear:
        """Keep the ``n`` largest-magnitude weights of every ``m`` along the input axis.

        Args:
          kernel: dense ``(in_features, out_features)``.
          bias: ``(out_features,)`` or ``None`` (no bias).
          n, m: as in the constructor.
          **layer_kwargs: the constructor's other keyword arguments; ``param_dtype``
            defaults to ``kernel.dtype``.

        Returns:
          The layer.

        Raises:
          ValueError: as the constructor, or a kernel that is not 2-D.

        Example:
          >>> import jax.numpy as jnp
          >>> from jsparse.nn import NMLinear
          >>> kernel = jnp.array([[1.0], [-4.0], [3.0], [0.5]])
          >>> NMLinear.from_kernel(kernel, n=2, m=4).dense_kernel()[:, 0].tolist()
          [0.0, -4.0, 3.0, 0.0]
        """
        return cls._from_dense_kernel(kernel, bias, n=n, m=m, **layer_kwargs)

    @property
    def n(self) -> int:
        """Weights kept per group."""
        return self.kernel.n

    @property
    def m(self) -> int:
        """Group length along the input axis."""
        return self.kernel.m
