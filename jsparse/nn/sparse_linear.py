"""``SparseLinear``: a linear layer with a block-sparse (BCSR) kernel."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import default_bias_init, default_kernel_init

from jsparse.bcsr import BCSR
from jsparse.nn._format_linear import FormatLinear, check_sparsity

__all__ = ["SparseLinear", "block_count"]


class SparseLinear(FormatLinear):
    """A linear layer ``y = x @ W + b`` whose kernel ``W (in_features, out_features)``
    is a :class:`jsparse.BCSR` with a fixed number of stored blocks.

    Written like :class:`flax.nnx.Linear`. The stored blocks ``kernel_data
    (nse, bm, bn)`` are an :class:`flax.nnx.Param`; the pattern (``kernel_indices``,
    ``kernel_indptr``) is a :class:`~jsparse.nn.SparsityPattern`, so an optimizer
    built with ``wrt=nnx.Param`` holds state for the stored values only. ``nse`` is
    ``round((1 - sparsity) * number of blocks)`` (at least 1); dynamic sparse
    training moves blocks around without changing it.

    Args:
      in_features, out_features: the dense kernel is ``(in_features, out_features)``.
      sparsity: fraction of blocks *not* stored, in ``[0, 1)``.
      block_shape: ``(bm, bn)``; must divide ``(in_features, out_features)``.
        ``(1, 1)`` is unstructured (CSR). Blocks of 32x32 or more are fast on CPU.
      use_bias, dtype, param_dtype, kernel_init, bias_init, rngs: as in
        :class:`flax.nnx.Linear`. The initial values are ``kernel_init``'s dense
        kernel at the pattern chosen by ``pattern``.
      pattern: ``"random"`` (uniformly random blocks, as SET and RigL start) or
        ``"magnitude"`` (the blocks of the initial kernel with the largest L2 norm).
      impl: the matmul implementation (``"auto"``, ``"xla"``, ``"dense"``, ``"pallas"``).

    Raises:
      ValueError: sparsity outside ``[0, 1)`` or a block shape that does not divide.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.nn import SparseLinear
      >>> layer = SparseLinear(64, 32, sparsity=0.75, block_shape=(8, 8), rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((4, 64))).shape, layer.kernel.nse
      ((4, 32), 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        sparsity: float,
        block_shape: Sequence[int] = (1, 1),
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: nnx.Initializer = default_kernel_init,
        bias_init: nnx.Initializer = default_bias_init,
        pattern: str = "random",
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
        nse, _ = block_count(shape, block_shape, sparsity)
        if pattern not in ("random", "magnitude"):
            raise ValueError(f"pattern must be 'random' or 'magnitude', got {pattern!r}")
        dense = jnp.asarray(kernel_init(rngs.params(), shape, param_dtype), param_dtype)
        key = rngs.params() if pattern == "random" else None
        w = _initial_bcsr(dense, key, block_shape=tuple(int(b) for b in block_shape), nse=nse)
        self._set_kernel(w)
        self._init_bias(bias_init, rngs)

    @classmethod
    def from_kernel(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        sparsity: float,
        block_shape: Sequence[int] = (1, 1),
        dtype: Any = None,
        param_dtype: Any = None,
        impl: str = "auto",
    ) -> SparseLinear:
        """A ``SparseLinear`` keeping the ``nse`` blocks of ``kernel`` with the largest
        L2 norm (one-shot magnitude pruning).

        Args:
          kernel: dense ``(in_features, out_features)``.
          bias: ``(out_features,)`` or ``None`` (no bias).
          sparsity, block_shape, dtype, impl: as in the constructor.
          param_dtype: defaults to ``kernel.dtype``.
        """
        return cls._from_dense_kernel(
            kernel,
            bias,
            dtype=dtype,
            param_dtype=param_dtype,
            impl=impl,
            sparsity=sparsity,
            block_shape=block_shape,
            pattern="magnitude",
        )

    @property
    def block_shape(self) -> tuple[int, int]:
        return tuple(self.kernel_data.shape[1:])

    @property
    def nse(self) -> int:
        """Number of stored blocks (fixed for the life of the layer)."""
        return self.kernel_data.shape[0]

    @property
    def density(self) -> float:
        """Stored values over the dense size."""
        bm, bn = self.block_shape
        return self.nse * bm * bn / (self.in_features * self.out_features)


@functools.partial(jax.jit, static_argnames=("block_shape", "nse"))
def _initial_bcsr(dense, key, *, block_shape, nse) -> BCSR:
    """``nse`` blocks of ``dense``: at random positions (``key``) or the largest (``None``).

    One compiled function per configuration instead of a dozen eager ops per layer.
    """
    if key is None:
        return BCSR.fromdense(dense, block_shape=block_shape, nse=nse)
    return random_pattern_bcsr(dense, key, block_shape=block_shape, nse=nse)


def random_pattern_bcsr(dense, key, *, block_shape, nse) -> BCSR:
    """The blocks of ``dense`` at ``nse`` uniformly random positions, as a BCSR."""
    bm, bn = block_shape
    nbr, nbc = dense.shape[0] // bm, dense.shape[1] // bn
    _, flat = jax.lax.top_k(jax.random.uniform(key, (nbr * nbc,)), nse)
    flat = jnp.sort(flat.astype(jnp.int32))
    rows, cols = flat // nbc, flat % nbc
    blocks = dense.reshape(nbr, bm, nbc, bn).transpose(0, 2, 1, 3)[rows, cols]
    return BCSR._from_positions(blocks, rows, cols, dense.shape)


def block_count(
    shape: Sequence[int], block_shape: Sequence[int], sparsity: float
) -> tuple[int, tuple[int, int]]:
    """``(nse, (block_rows, block_cols))`` for a ``shape`` kernel at ``sparsity``.

    Raises:
      ValueError: sparsity outside ``[0, 1)``; a block shape that does not divide.
    """
    s = check_sparsity(sparsity)
    try:
        bm, bn = (int(b) for b in block_shape)
    except (TypeError, ValueError) as e:
        raise TypeError(f"block_shape must be a pair of ints, got {block_shape!r}") from e
    if bm <= 0 or bn <= 0:
        raise ValueError(f"block_shape must be positive, got {(bm, bn)}")
    m, n = (int(d) for d in shape)
    if m % bm or n % bn:
        raise ValueError(
            f"block_shape {(bm, bn)} does not divide the kernel shape {(m, n)} "
            "(in_features, out_features)"
        )
    grid = (m // bm, n // bn)
    nblocks = grid[0] * grid[1]
    nse = max(1, min(nblocks, round((1.0 - s) * nblocks)))
    return nse, grid
