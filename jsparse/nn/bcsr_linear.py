"""``BCSRLinear`` (alias ``SparseLinear``): a linear layer with a block-sparse kernel."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init

from jsparse.core.checks import check_block_shape, check_sparsity
from jsparse.formats.bcsr import BCSR
from jsparse.nn.format_linear import FormatLinear

__all__ = ["BCSRLinear", "SparseLinear", "block_count", "initial_bcsr"]


class BCSRLinear(FormatLinear):
    """A linear layer ``y = x @ W + b`` whose kernel ``W (in_features, out_features)``
    is a :class:`jsparse.BCSR` with a fixed number of stored blocks (format name
    ``"bcsr"``; ``SparseLinear`` is the same class).

    Written like :class:`flax.nnx.Linear`, with its arguments in its order. The
    stored blocks ``kernel_data (nse, bm, bn)`` are an :class:`flax.nnx.Param`; the
    pattern (``kernel_indices``, ``kernel_indptr`` and the derived ``kernel_row_ids``,
    ``kernel_col_ptr``, ``kernel_col_order``) is a :class:`~jsparse.nn.SparsityPattern`,
    so an optimizer built with ``wrt=nnx.Param`` holds state for the stored values
    only. ``nse`` is ``round((1 - sparsity) * number of blocks)`` (at least 1);
    dynamic sparse training moves blocks around without changing it.

    Args:
      in_features, out_features: the dense kernel is ``(in_features, out_features)``.
      use_bias, dtype, param_dtype, precision, kernel_init, bias_init, promote_dtype,
        preferred_element_type, rngs, kernel_metadata, bias_metadata, impl: as in
        :class:`~jsparse.nn.FormatLinear` (``nnx.Linear``'s, without ``dot_general``:
        the product is the sparse kernel). The initial values are ``kernel_init``'s
        dense kernel (drawn from the key ``nnx.Linear`` draws its kernel from) at
        the pattern chosen by ``pattern``. A sharding spec ``(a, b)`` of the kernel
        becomes ``(None, a, b)`` on ``kernel_data``; the index arrays are replicated.
      sparsity: fraction of blocks *not* stored, in ``[0, 1)``.
      block_shape: ``(bm, bn)``; must divide ``(in_features, out_features)``.
        ``(1, 1)`` is unstructured (CSR). Blocks of 32x32 or more are fast on CPU.
      pattern: ``"random"`` (uniformly random blocks, as SET and RigL start) or
        ``"magnitude"`` (the blocks of the initial kernel with the largest L2 norm).

    Raises:
      ValueError: sparsity outside ``[0, 1)``, a block shape that does not divide,
        or an unknown ``pattern``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.nn import BCSRLinear
      >>> layer = BCSRLinear(64, 32, sparsity=0.75, block_shape=(8, 8), rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((4, 64))).shape, layer.nse
      ((4, 32), 8)
    """

    format_name = "bcsr"
    kernel_leaf_axes = MappingProxyType({"data": (None, "in", "out")})

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
        sparsity: float,
        block_shape: Sequence[int] = (1, 1),
        pattern: str = "random",
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
            sparsity=sparsity,
            block_shape=block_shape,
            pattern=pattern,
        )

    def _init_kernel(self, kernel_init, key, *, sparsity, block_shape, pattern) -> BCSR:
        shape = (self.in_features, self.out_features)
        nse, _ = block_count(shape, block_shape, sparsity)
        if pattern not in ("random", "magnitude"):
            raise ValueError(f"pattern must be 'random' or 'magnitude', got {pattern!r}")
        dense = kernel_init(key, shape, self.param_dtype)
        pattern_key = jax.random.fold_in(key, 1) if pattern == "random" else None
        bm, bn = (int(b) for b in block_shape)
        return initial_bcsr(dense, pattern_key, block_shape=(bm, bn), nse=nse)

    @classmethod
    def from_kernel(
        cls,
        kernel: jax.Array,
        bias: jax.Array | None = None,
        *,
        sparsity: float,
        block_shape: Sequence[int] = (1, 1),
        **layer_kwargs: Any,
    ) -> BCSRLinear:
        """A ``BCSRLinear`` keeping the ``nse`` blocks of ``kernel`` with the largest
        L2 norm (one-shot magnitude pruning).

        Args:
          kernel: dense ``(in_features, out_features)``.
          bias: ``(out_features,)`` or ``None`` (no bias).
          sparsity, block_shape: as in the constructor.
          **layer_kwargs: the constructor's other keyword arguments (``dtype``,
            ``precision``, ``kernel_metadata``, ``impl`` ...); ``param_dtype``
            defaults to ``kernel.dtype``.

        Returns:
          The layer.

        Raises:
          ValueError: as the constructor, or a kernel that is not 2-D.

        Example:
          >>> import jax.numpy as jnp
          >>> from jsparse.nn import BCSRLinear
          >>> kernel = jnp.zeros((8, 8)).at[:4, 4:].set(1.0)
          >>> layer = BCSRLinear.from_kernel(kernel, sparsity=0.75, block_shape=(4, 4))
          >>> layer.kernel_indices[...].tolist(), layer.kernel_row_ids[...].tolist()
          ([1], [0])
        """
        return cls._from_dense_kernel(
            kernel,
            bias,
            sparsity=sparsity,
            block_shape=block_shape,
            pattern="magnitude",
            **layer_kwargs,
        )

    @property
    def block_shape(self) -> tuple[int, int]:
        """``(bm, bn)``, the shape of a stored block."""
        return tuple(self.kernel_data.shape[1:])

    @property
    def nse(self) -> int:
        """Number of stored blocks."""
        return self.kernel_data.shape[0]

    @property
    def density(self) -> float:
        """Stored values over the dense size."""
        bm, bn = self.block_shape
        return self.nse * bm * bn / (self.in_features * self.out_features)


#: The BCSR layer's first name.
SparseLinear = BCSRLinear


@functools.partial(jax.jit, static_argnames=("block_shape", "nse"))
def initial_bcsr(
    dense: jax.Array, key: jax.Array | None, *, block_shape: tuple[int, int], nse: int
) -> BCSR:
    """``nse`` blocks of ``dense`` as a :class:`jsparse.BCSR`: at uniformly random
    positions (:meth:`jsparse.BCSR.random`'s, drawn from ``key``) or, with
    ``key=None``, the blocks of largest L2 norm (:meth:`jsparse.BCSR.fromdense`).

    One compiled function per configuration instead of a dozen eager ops per layer.

    Args:
      dense: ``(M, K)`` floating array.
      key: a PRNG key, or ``None``.
      block_shape: ``(bm, bn)``, dividing ``dense.shape``.
      nse: number of stored blocks, in ``[1, number of blocks]``.

    Returns:
      The BCSR, in ``dense``'s dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jsparse.nn.bcsr_linear import initial_bcsr
      >>> a = initial_bcsr(jnp.ones((8, 8)), jax.random.key(0), block_shape=(4, 4), nse=2)
      >>> a.nse, float(a.todense().sum())
      (2, 32.0)
    """
    if key is None:
        return BCSR.fromdense(dense, block_shape=block_shape, nse=nse)
    bm, bn = block_shape
    nbr, nbc = dense.shape[0] // bm, dense.shape[1] // bn
    positions = BCSR.random(
        key, dense.shape, density=nse / (nbr * nbc), block_shape=block_shape, dtype=dense.dtype
    )
    blocks = dense.reshape(nbr, bm, nbc, bn).transpose(0, 2, 1, 3)
    return positions.with_values(blocks[positions.row_ids, positions.indices])


def block_count(
    shape: Sequence[int], block_shape: Sequence[int], sparsity: float
) -> tuple[int, tuple[int, int]]:
    """``(nse, (block_rows, block_cols))`` for a ``shape`` kernel at ``sparsity``: ``nse``
    is ``round((1 - sparsity) * number of blocks)``, at least 1.

    Args:
      shape: the kernel's ``(in_features, out_features)``.
      block_shape: ``(bm, bn)``.
      sparsity: fraction of blocks not stored, in ``[0, 1)``.

    Returns:
      ``(nse, grid)``.

    Raises:
      ValueError: sparsity outside ``[0, 1)``; a block shape that does not divide.
      TypeError: a sparsity that is not a number, a block shape that is not a pair.

    Example:
      >>> from jsparse.nn.bcsr_linear import block_count
      >>> block_count((64, 32), (8, 8), 0.75)
      (8, (8, 4))
    """
    s = check_sparsity(sparsity)
    bm, bn = check_block_shape(tuple(shape), block_shape)
    grid = (shape[0] // bm, shape[1] // bn)
    nblocks = grid[0] * grid[1]
    nse = max(1, min(nblocks, round((1.0 - s) * nblocks)))
    return nse, grid
