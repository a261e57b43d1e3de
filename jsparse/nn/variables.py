"""Variable types of the sparse layers."""

from __future__ import annotations

from flax import nnx

__all__ = ["SparsityPattern"]


class SparsityPattern(nnx.Variable):
    """The index arrays of a sparse weight (BCSR ``indices``/``indptr``, N:M positions ...).

    Not an :class:`flax.nnx.Param`: ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and
    ``nnx.grad`` never see it, so the optimizer state is sized by the stored values.
    Dynamic sparse training (:mod:`jsparse.train`) rewrites it in place; its shape
    never changes, so a jitted train step does not recompile.

    Example:
      >>> from flax import nnx
      >>> from jsparse.nn import NMLinear, SparsityPattern
      >>> layer = NMLinear(8, 4, rngs=nnx.Rngs(0))
      >>> list(nnx.state(layer, SparsityPattern)), isinstance(layer.kernel_positions, nnx.Param)
      (['kernel_positions'], False)
    """
