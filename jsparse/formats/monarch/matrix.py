"""Monarch: a product of two block-diagonal factors with a block shuffle between them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jsparse.core.checks import as_leaf, as_shape, check_float_dtype, is_float0
from jsparse.core.linalg import relative_error
from jsparse.core.matrix import AbstractSparseMatrix, register_format
from jsparse.core.registry import with_pallas
from jsparse.formats.bcsr.matrix import BCSR
from jsparse.formats.monarch import factors

__all__ = ["FLOP_RATIO_MAX", "Monarch"]


@register_format
@dataclasses.dataclass(frozen=True, init=False, repr=False, eq=False)
class Monarch(AbstractSparseMatrix):
    """A Monarch matrix ``M = blockdiag(left) @ P @ blockdiag(right)`` of shape ``(m, n)``.

    With ``b = nblocks``, ``s = m // b``, ``p = n // b`` and the middle block size
    ``q = b * g`` (``g`` is the ``block_rank``):

    * ``right`` ``(b, q, p)`` is applied first: block ``k`` maps input block ``k`` to
      ``q`` middle entries, ordered ``(l, e)`` for ``l < b``, ``e < g``;
    * ``P`` is the block shuffle sending middle entry ``(k, l, e)`` to ``(l, k, e)``;
    * ``left`` ``(b, s, q)`` is applied second: block ``l`` maps the ``q`` entries
      ``(k, e)`` (``g`` from every input block) to output block ``l``.

    Entry-wise, ``M[l*s + u, k*p + t] = sum_e left[l, u, k*g + e] * right[k, l*g + e, t]``:
    the ``(l, k)`` sub-block of ``M`` (``s x p``) is ``left[l][:, k-th g columns] @
    right[k][l-th g rows]``, an arbitrary matrix of rank at most ``g``. Monarch
    matrices are exactly the matrices whose ``b x b`` grid of sub-blocks all have rank
    ``<= g``, which makes :meth:`fromdense` (the Frobenius projection) a batch of
    truncated SVDs, and ``M.T`` the Monarch ``(right^T blocks, left^T blocks)``.
    For ``m = n = b**2`` and ``g = 1`` this is the square Monarch class of Dao et
    al. (2022) with its output permutation absorbed into the block order.

    Leaves: ``left`` and ``right`` (both trainable values, one floating dtype).
    Static: ``shape`` and ``nblocks``.

    Matmul costs ``2 * q * (m + n)`` FLOPs per dense column (dense: ``2 * m * n``);
    storage is ``q * (m + n)`` values.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> w = jsparse.Monarch.init(jax.random.key(0), (64, 32), nblocks=4)
      >>> w.left.shape, w.right.shape, w.block_rank
      ((4, 16, 8), (4, 8, 8), 2)
      >>> (w @ jnp.ones((32, 5))).shape
      (64, 5)
    """

    left: jax.Array
    right: jax.Array
    shape: tuple[int, int]
    nblocks: int

    _leaf_fields = ("left", "right")
    _static_fields = ("shape", "nblocks")
    _value_fields = ("left", "right")
    _value_ndim = 3

    def __init__(self, left: jax.typing.ArrayLike, right: jax.typing.ArrayLike):
        """Build from the factor blocks ``left (b, s, q)`` and ``right (b, q, p)``.

        Raises:
          ValueError: the factors are not 3-D, disagree on ``b`` or ``q``, or ``q`` is
            not a positive multiple of ``b``.
          TypeError: the factors are not floating point or differ in dtype.
        """
        left, right = as_leaf(left), as_leaf(right)
        if left.ndim != 3 or right.ndim != 3:
            raise ValueError(
                f"Monarch factors must be 3-D: left (nblocks, s, q) and right "
                f"(nblocks, q, p); got left {left.shape} and right {right.shape}"
            )
        nb = left.shape[0]
        object.__setattr__(self, "left", left)
        object.__setattr__(self, "right", right)
        object.__setattr__(self, "shape", (nb * left.shape[1], nb * right.shape[2]))
        object.__setattr__(self, "nblocks", nb)
        self.validate()

    # ------------------------------------------------------------ properties
    @property
    def block_rank(self) -> int:
        """``g``: the rank bound of every ``(m/b) x (n/b)`` sub-block.

        Example:
          >>> import jax, jsparse
          >>> jsparse.Monarch.init(jax.random.key(0), (16, 16), nblocks=4).block_rank
          1
        """
        return self.right.shape[1] // self.nblocks

    @property
    def block_shape(self) -> tuple[int, int]:
        """``(s, p) = (m // nblocks, n // nblocks)``: the sub-block shape.

        Example:
          >>> import jax, jsparse
          >>> jsparse.Monarch.init(jax.random.key(0), (16, 32), nblocks=4).block_shape
          (4, 8)
        """
        return self.shape[0] // self.nblocks, self.shape[1] // self.nblocks

    def auto_order(self, op: str):
        """The factored product unless it saves too little work over one dense dot
        (docs/monarch.md); Pallas in place of XLA on GPU.

        Example:
          >>> import jax, jsparse
          >>> w = jsparse.Monarch.init(jax.random.key(0), (64, 64), nblocks=8)
          >>> w.auto_order("matmul")["default"]  # 8 * 8 * 128 values of 64 * 64
          ['xla', 'dense']
        """
        if op != "matmul":
            return ["xla"]
        m, n = self.shape
        if self.nstored <= FLOP_RATIO_MAX * m * n:
            return with_pallas(["xla", "dense"])
        return with_pallas(["dense", "xla"])

    # ------------------------------------------------------------ validation
    def _validate_static(self) -> None:
        left, right, nb = self.left, self.right, self.nblocks
        if left.ndim != 3 or right.ndim != 3:
            raise ValueError(
                f"Monarch factors must be 3-D, got left {left.shape} and right {right.shape}"
            )
        if left.shape[0] != nb or right.shape[0] != nb:
            raise ValueError(
                f"Monarch factors must both have nblocks={nb} blocks, got left "
                f"{left.shape} and right {right.shape}"
            )
        if left.shape[2] != right.shape[1]:
            raise ValueError(
                f"Monarch middle sizes differ: left {left.shape} has q={left.shape[2]} "
                f"columns per block, right {right.shape} has q={right.shape[1]} rows"
            )
        q = right.shape[1]
        if q < nb or q % nb:
            raise ValueError(
                f"Monarch middle block size q={q} must be a positive multiple of "
                f"nblocks={nb} (q = nblocks * block_rank); got left {left.shape} and "
                f"right {right.shape}"
            )
        if self.shape != (nb * left.shape[1], nb * right.shape[2]):
            raise ValueError(
                f"Monarch shape {self.shape} does not match factors left {left.shape} "
                f"and right {right.shape}"
            )
        check_float_dtype("Monarch left", left.dtype)
        check_float_dtype("Monarch right", right.dtype)
        if not (is_float0(left) or is_float0(right)) and left.dtype != right.dtype:
            raise TypeError(
                f"Monarch factors must share one dtype, got left {left.dtype} and "
                f"right {right.dtype}"
            )

    def _validate_concrete(self) -> None:
        """No index arrays: nothing beyond the static checks."""

    # ------------------------------------------------------------ construction
    @classmethod
    def init(
        cls,
        key: jax.Array,
        shape: Sequence[int],
        *,
        nblocks: int,
        block_rank: int | None = None,
        dtype: Any = jnp.float32,
    ) -> Monarch:
        """A random Monarch with the variance of ``jax.nn.initializers.lecun_normal()``.

        ``right`` entries are ``N(0, 1/q)`` and ``left`` entries ``N(0, 1/s)``, so each
        factor preserves the expected squared norm and ``E ||M @ v||^2 = ||v||^2`` for
        every fixed ``v``. Entries of ``M`` have mean 0 and variance ``1 / m``, the
        variance ``lecun_normal`` (fan-in = ``shape[0]``, flax's kernel convention)
        gives a dense ``(m, n)`` matrix.

        Args:
          key: a PRNG key.
          shape: ``(m, n)``; ``nblocks`` must divide both.
          nblocks: number of diagonal blocks ``b`` in each factor.
          block_rank: ``g``, the rank of every sub-block; default
            ``ceil(min(m, n) / b**2)`` (square-ish factor blocks, ``q ~ min(m, n) / b``).
          dtype: a floating dtype.

        Raises:
          ValueError: bad ``shape``, ``nblocks`` or ``block_rank`` (the message names them).
          TypeError: ``dtype`` is not floating point.

        Example:
          >>> import jax, jsparse
          >>> w = jsparse.Monarch.init(jax.random.key(0), (8, 12), nblocks=2, block_rank=3)
          >>> w.left.shape, w.right.shape, w.nstored
          ((2, 4, 6), (2, 6, 6), 120)
        """
        shape = _check_shape(shape)
        nb, g = _check_blocks(shape, nblocks, block_rank)
        check_float_dtype("Monarch.init dtype", jnp.dtype(dtype))
        m, n = shape
        s, p, q = m // nb, n // nb, nb * g
        k_left, k_right = jax.random.split(key)
        left = jax.random.normal(k_left, (nb, s, q), dtype) / jnp.sqrt(s).astype(dtype)
        right = jax.random.normal(k_right, (nb, q, p), dtype) / jnp.sqrt(q).astype(dtype)
        return cls(left, right)

    @classmethod
    def fromdense(
        cls,
        x: jax.typing.ArrayLike,
        *,
        nblocks: int,
        block_rank: int | None = None,
        return_error: bool = False,
    ) -> Monarch | tuple[Monarch, jax.Array]:
        """The Frobenius-nearest Monarch matrix to ``x`` (closed form, works under jit).

        Every ``(m/b) x (n/b)`` sub-block of ``x`` is replaced by its truncated SVD of
        rank ``block_rank`` (Eckart-Young per sub-block; the sub-blocks have disjoint
        parameters, so this is the global optimum, see ``docs/monarch.md``). A Monarch
        input is returned unchanged up to rounding.

        Args:
          x: dense ``(m, n)`` floating array.
          nblocks, block_rank: as in :meth:`init`.
          return_error: also return ``||x - M||_F / ||x||_F`` (0 for a zero ``x``).

        Returns:
          The Monarch ``M`` (in ``x``'s dtype), or ``(M, rel_error)``.

        Raises:
          ValueError: ``x`` is not 2-D, or bad ``nblocks`` / ``block_rank``.
          TypeError: ``x`` is not floating point.

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> w, err = jsparse.Monarch.fromdense(jnp.eye(8), nblocks=2, block_rank=4,
          ...                                    return_error=True)
          >>> float(err) < 1e-6, bool(jnp.allclose(w.todense(), jnp.eye(8), atol=1e-6))
          (True, True)
        """
        x = jnp.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"Monarch.fromdense expects a 2-D array, got shape {x.shape}")
        check_float_dtype("Monarch.fromdense input", x.dtype)
        nb, g = _check_blocks(x.shape, nblocks, block_rank)
        left, right = factors.project(x, nblocks=nb, block_rank=g)
        out = cls(left, right)
        if not return_error:
            return out
        return out, relative_error(x, out.todense())

    # ------------------------------------------------------------ conversions
    def todense(self) -> jax.Array:
        """The dense ``(m, n)`` matrix of the two factors (accumulated in float32).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> w = jsparse.Monarch(jnp.ones((2, 2, 2)), jnp.ones((2, 2, 3)))
          >>> w.shape, w.todense()[0].tolist()
          ((4, 6), [1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
        """
        return factors.todense(self.left, self.right)

    def transpose(self) -> Monarch:
        """``M.T`` as a Monarch: ``left' = right`` blocks transposed, ``right' = left``
        blocks transposed (exact, no arithmetic).

        Example:
          >>> import jax, jsparse
          >>> w = jsparse.Monarch.init(jax.random.key(0), (8, 12), nblocks=2)
          >>> w.transpose().shape, w.transpose().left.shape
          ((12, 8), (2, 6, 4))
        """
        return self._replace(
            left=jnp.swapaxes(self.right, 1, 2),
            right=jnp.swapaxes(self.left, 1, 2),
            shape=self.shape[::-1],
        )

    def to_scipy(self, format: str = "csr"):  # noqa: A002 - scipy's own name
        """Convert to ``scipy.sparse`` (``"csr"`` or ``"bsr"`` with ``(1, 1)`` blocks)
        through :meth:`BCSR.from_format <jsparse.BCSR.from_format>`: every
        structurally stored entry, stored zeros included. Host-only.

        Raises:
          ValueError: an unknown ``format``, or traced arrays (under ``jit``).

        Example:
          >>> import jax, jax.numpy as jnp, jsparse
          >>> s = jsparse.Monarch.init(jax.random.key(0), (4, 4), nblocks=2).to_scipy()
          >>> s.nnz, s.format
          (16, 'csr')
        """
        return BCSR.from_format(self).to_scipy(format)

    def astype(self, dtype: Any) -> Monarch:
        """Both factors cast to ``dtype`` (a floating dtype).

        Raises:
          TypeError: ``dtype`` is not floating point.

        Example:
          >>> import jax, jax.numpy as jnp, jsparse
          >>> w = jsparse.Monarch.init(jax.random.key(0), (8, 8), nblocks=2)
          >>> w.astype(jnp.bfloat16).right.dtype
          dtype(bfloat16)
        """
        check_float_dtype("Monarch.astype dtype", jnp.dtype(dtype))
        return self._replace(left=self.left.astype(dtype), right=self.right.astype(dtype))


# ---------------------------------------------------------------- helpers
# The factored product does q * (m + n) multiply-adds per column against m * n dense;
# it loses to one dense dot unless it saves a clear margin (docs/monarch.md).
FLOP_RATIO_MAX = 0.6


def _check_shape(shape) -> tuple[int, int]:
    shape = as_shape(shape)
    if len(shape) != 2:
        raise ValueError(f"Monarch shape must be 2-D, got {shape}")
    return shape


def _check_blocks(shape, nblocks, block_rank) -> tuple[int, int]:
    """Validated ``(nblocks, block_rank)`` for ``shape`` (default block rank filled in)."""
    if isinstance(nblocks, bool) or not isinstance(nblocks, int | jnp.integer):
        raise TypeError(f"nblocks must be an int, got {nblocks!r}")
    nb = int(nblocks)
    m, n = shape
    if m == 0 or n == 0:
        raise ValueError(
            f"Monarch needs both dimensions nonzero, got shape {tuple(shape)}: the "
            "factors of an empty matrix have no blocks (use jnp.zeros or a BCSR/NM "
            "for a zero-size matrix)"
        )
    if nb < 1 or m % nb or n % nb:
        raise ValueError(
            f"nblocks={nb} must be a positive divisor of both dimensions of shape {tuple(shape)}"
        )
    if block_rank is None:
        return nb, max(1, math.ceil(min(m, n) / (nb * nb)))
    if isinstance(block_rank, bool) or not isinstance(block_rank, int | jnp.integer):
        raise TypeError(f"block_rank must be an int or None, got {block_rank!r}")
    if int(block_rank) < 1:
        raise ValueError(f"block_rank must be >= 1, got {block_rank} (shape {tuple(shape)})")
    return nb, int(block_rank)
