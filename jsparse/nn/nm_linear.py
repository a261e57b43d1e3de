"""``NMLinear``: a linear layer with an N:M structured sparse kernel."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import default_bias_init, default_kernel_init

from jsparse.nm import NM
from jsparse.nn._format_linear import FormatLinear

__all__ = ["NMLinear"]


def check_nm(n: int, m: int, in_features: int) -> tuple[int, int]:
    """``(n, m)`` as ints, or a ``ValueError`` naming the problem."""
    n, m = int(n), int(m)
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity needs 1 <= n < m, got n={n}, m={m}")
    if in_features % m:
        raise ValueError(
            f"m={m} does not divide in_features={in_features} (N:M groups run along the input axis)"
        )
    return n, m


class NMLinear(FormatLinear):
    """A linear layer ``y = x @ W + b`` whose kernel ``W (in_features, out_features)``
    keeps ``n`` of every ``m`` consecutive weights along the input axis (the
    contraction axis of ``x @ W``), stored as a :class:`jsparse.NM`.

    The kept values (``kernel_values``, ``(in_features // m * n, out_features)``) are
    an :class:`flax.nnx.Param`; their positions in each group (``kernel_positions``,
    ``uint8``) are a :class:`~jsparse.nn.SparsityPattern`. Train N:M patterns with
    :class:`jsparse.train.SRSTE`, which ends in this layer.

    Args:
      in_features, out_features: the dense kernel shape; ``m`` divides ``in_features``.
      n, m: keep ``n`` of every ``m`` (``1 <= n < m``; 2:4 is the GPU sparse-tensor-core
        pattern).
      use_bias, dtype, param_dtype, kernel_init, bias_init, rngs, impl: as in
        :class:`~jsparse.nn.SparseLinear`. The pattern keeps the ``n`` largest of every
        group of the initial dense kernel.

    Raises:
      ValueError: ``n >= m``, ``n < 1``, or ``m`` does not divide ``in_features``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        n: int = 2,
        m: int = 4,
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
        n, m = check_nm(n, m, self.in_features)
        shape = (self.in_features, self.out_features)
        dense = jnp.asarray(kernel_init(rngs.params(), shape, param_dtype), param_dtype)
        self._set_kernel(NM.fromdense(dense, n=n, m=m, axis=0))
        self._init_bias(bias_init, rngs)

    @classmethod
    def from_kernel(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        n: int = 2,
        m: int = 4,
        dtype: Any = None,
        param_dtype: Any = None,
        impl: str = "auto",
    ) -> NMLinear:
        """Keep the ``n`` largest-magnitude weights of every ``m`` along the input axis."""
        return cls._from_dense_kernel(
            kernel, bias, dtype=dtype, param_dtype=param_dtype, impl=impl, n=n, m=m
        )

    @property
    def n(self) -> int:
        return self.kernel.n

    @property
    def m(self) -> int:
        return self.kernel.m
