"""Pruning targets (unstructured, blocks, N:M, transposable N:M) and the mask rules
they share: keep the best-scoring entries, blocks or patterns.

Kernels are in :class:`flax.nnx.Linear`'s layout ``(in_features, out_features)``: the
contraction axis is axis 0, so N:M groups run along axis 0 and a block ``(bm, bn)``
spans ``bm`` inputs and ``bn`` outputs (as in :class:`~jsparse.nn.BCSRLinear`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.core.checks import check_block_shape
from jsparse.formats.nm.matrix import check_nm

__all__ = [
    "Blocks",
    "NMStructure",
    "keep_count",
    "parse_structure",
    "transposable_nm_mask",
    "transposable_patterns",
]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Block sparsity: whole ``(bm, bn)`` blocks of the ``(in, out)`` kernel are kept or
    pruned (``Blocks(1, 1)`` is unstructured); the result is a
    :class:`~jsparse.nn.BCSRLinear`.

    Example:
      >>> from jsparse.prune import Blocks
      >>> Blocks(1, 1).unstructured, Blocks(32, 32).block_shape
      (True, (32, 32))
    """

    bm: int = 1
    bn: int = 1

    def __post_init__(self):
        for v in (self.bm, self.bn):
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < 1:
                raise ValueError(f"a block shape needs two positive ints, got {(self.bm, self.bn)}")

    @property
    def block_shape(self) -> tuple[int, int]:
        """``(bm, bn)``."""
        return int(self.bm), int(self.bn)

    @property
    def unstructured(self) -> bool:
        """Whether the blocks are single weights."""
        return self.block_shape == (1, 1)

    def check(self, shape: tuple[int, int], name: str) -> None:
        """Raise ``ValueError`` naming the layer if the blocks do not tile ``shape``."""
        try:
            check_block_shape(shape, self.block_shape)
        except ValueError as e:
            raise ValueError(f"layer {name!r} with kernel (in, out) = {shape}: {e}") from None

    def __str__(self) -> str:
        return "unstructured" if self.unstructured else f"{self.bm}x{self.bn} blocks"


@dataclasses.dataclass(frozen=True)
class NMStructure:
    """N:M sparsity along the contraction (input) axis: ``n`` kept in every ``m``
    consecutive inputs of each output; the result is a :class:`~jsparse.nn.NMLinear`.
    ``transposable=True`` also keeps exactly ``n`` per ``m`` consecutive *outputs* of
    each input inside every ``m x m`` block (the transposed kernel is N:M too), choosing
    the best of all valid block patterns (:func:`transposable_nm_mask`; ``m <= 4``).

    Example:
      >>> from jsparse.prune import NMStructure
      >>> NMStructure(2, 4).density, str(NMStructure(2, 4, transposable=True))
      (0.5, '2:4 transposable')
    """

    n: int = 2
    m: int = 4
    transposable: bool = False

    def __post_init__(self):
        check_nm(self.n, self.m)
        if self.transposable and self.m > 4:
            raise ValueError(
                f"optimal transposable N:M enumerates the valid m x m patterns and supports "
                f"m <= 4, got {self.n}:{self.m}"
            )

    @property
    def density(self) -> float:
        """``n / m``."""
        return self.n / self.m

    def check(self, shape: tuple[int, int], name: str) -> None:
        """Raise ``ValueError`` naming the layer if ``m`` does not divide the input axis
        (and, when transposable, the output axis)."""
        if shape[0] % self.m:
            raise ValueError(
                f"layer {name!r} with kernel (in, out) = {shape}: m={self.m} does not divide "
                f"in_features={shape[0]} (N:M groups run along the input axis)"
            )
        if self.transposable and shape[1] % self.m:
            raise ValueError(
                f"layer {name!r} with kernel (in, out) = {shape}: m={self.m} does not divide "
                f"out_features={shape[1]} (transposable N:M groups both axes)"
            )

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" + (" transposable" if self.transposable else "")


#: What :func:`parse_structure` returns.
Structure = Blocks | NMStructure

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(t|T|transposable)?\s*$")


def parse_structure(structure: Any) -> Structure:
    """The pruning target from its user-facing spelling.

    Args:
      structure: ``"unstructured"``; a block shape ``(bm, bn)``; ``"n:m"`` such as
        ``"2:4"`` (groups along the input axis); ``"n:mT"`` (``"2:4T"``) for optimal
        transposable N:M; or a :class:`Blocks` / :class:`NMStructure`.

    Returns:
      A :class:`Blocks` or :class:`NMStructure`.

    Raises:
      ValueError: an unknown string, ``n >= m``, a non-positive block shape.
      TypeError: anything else.

    Example:
      >>> from jsparse.prune import parse_structure
      >>> parse_structure("2:4"), parse_structure((4, 8))
      (NMStructure(n=2, m=4, transposable=False), Blocks(bm=4, bn=8))
    """
    if isinstance(structure, Blocks | NMStructure):
        return structure
    if isinstance(structure, str):
        if structure.strip().lower() == "unstructured":
            return Blocks(1, 1)
        match = _NM_RE.match(structure)
        if match is None:
            raise ValueError(
                f"structure must be 'unstructured', a block shape (bm, bn), 'n:m' such as "
                f"'2:4', or 'n:mT' (transposable), got {structure!r}"
            )
        return NMStructure(int(match[1]), int(match[2]), transposable=bool(match[3]))
    if isinstance(structure, tuple | list) and len(structure) == 2:
        bm, bn = structure
        if not all(isinstance(b, int | np.integer) and not isinstance(b, bool) for b in (bm, bn)):
            raise TypeError(f"a block shape must be two ints, got {structure!r}")
        return Blocks(int(bm), int(bn))
    raise TypeError(
        f"structure must be 'unstructured', a block shape (bm, bn) or an 'n:m' string, "
        f"got {structure!r}"
    )


def keep_count(size: int, sparsity: float) -> int:
    """How many of ``size`` candidates are kept at ``sparsity``: ``size`` minus
    ``floor(sparsity * size)`` (the pruned count rounds down, as the SparseGPT and
    Wanda references do), at least 1 when ``size > 0``.

    Example:
      >>> from jsparse.prune import keep_count
      >>> keep_count(10, 0.5), keep_count(10, 0.95), keep_count(3, 0.5)
      (5, 1, 2)
    """
    pruned = int(np.floor(sparsity * size + 1e-6))
    return max(min(size, 1), size - pruned)


@functools.cache
def _patterns_np(n: int, m: int) -> np.ndarray:
    out = []
    rows = [c for c in itertools.combinations(range(m), n)]
    for choice in itertools.product(rows, repeat=m):
        counts = np.zeros(m, int)
        for cols in choice:
            counts[list(cols)] += 1
        if np.all(counts == n):
            pattern = np.zeros((m, m), bool)
            for r, cols in enumerate(choice):
                pattern[r, list(cols)] = True
            out.append(pattern)
    return np.stack(out)


def transposable_patterns(n: int = 2, m: int = 4) -> np.ndarray:
    """Every ``m x m`` boolean pattern with exactly ``n`` True per row and per column
    (90 for 2:4, 24 for 1:4 and 3:4).

    Raises:
      ValueError: ``n >= m`` or ``m > 4`` (the count grows too fast to enumerate).

    Example:
      >>> from jsparse.prune import transposable_patterns
      >>> transposable_patterns(2, 4).shape, transposable_patterns(1, 4).shape
      ((90, 4, 4), (24, 4, 4))
    """
    n, m = check_nm(n, m)
    if m > 4:
        raise ValueError(f"transposable patterns are enumerated for m <= 4, got m={m}")
    return _patterns_np(n, m).copy()


def transposable_nm_mask(scores: jax.typing.ArrayLike, n: int = 2, m: int = 4) -> jax.Array:
    """The optimal transposable N:M mask: in every ``m x m`` block, of all patterns with
    exactly ``n`` kept per row and per column (:func:`transposable_patterns`), the one
    with the largest sum of ``scores`` (``|W|`` for magnitude). Unlike the greedy
    :func:`jsparse.nm_mask` ``(transposable=True)``, every row and column of every
    block keeps exactly ``n``. Works under ``jit``.

    Args:
      scores: ``(R, C)`` non-negative scores; ``m`` divides both axes.
      n, m: keep ``n`` of every ``m`` along both axes (``m <= 4``).

    Returns:
      A boolean array of ``scores.shape``.

    Raises:
      ValueError: ``n >= m``, ``m > 4``, a non-2-D input, or ``m`` not dividing an axis.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> from jsparse.prune import transposable_nm_mask
      >>> w = jnp.arange(16.0).reshape(4, 4) % 5
      >>> mask = transposable_nm_mask(jnp.abs(w))
      >>> mask.sum(0).tolist(), mask.sum(1).tolist()
      ([2, 2, 2, 2], [2, 2, 2, 2])
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"transposable_nm_mask expects a 2-D array, got shape {scores.shape}")
    patterns = transposable_patterns(n, m)
    for axis in (0, 1):
        if scores.shape[axis] % m:
            raise ValueError(
                f"m={m} does not divide axis {axis} of length {scores.shape[axis]} "
                f"(shape {tuple(scores.shape)})"
            )
    return _best_patterns(scores.astype(jnp.float32), jnp.asarray(patterns), m)


@functools.partial(jax.jit, static_argnames=("m",))
def _best_patterns(scores: jax.Array, patterns: jax.Array, m: int) -> jax.Array:
    rows, cols = scores.shape
    blocks = scores.reshape(rows // m, m, cols // m, m).transpose(0, 2, 1, 3)
    flat = blocks.reshape(-1, m * m)
    flat_patterns = patterns.reshape(-1, m * m).astype(jnp.float32)
    gains = jnp.matmul(flat, flat_patterns.T, precision=jax.lax.Precision.HIGHEST)
    best = jnp.argmax(gains, axis=-1)
    chosen = patterns[best].reshape(rows // m, cols // m, m, m)
    return chosen.transpose(0, 2, 1, 3).reshape(rows, cols)
