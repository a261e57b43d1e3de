"""SR-STE: learning N:M sparse weights from scratch (Zhou et al., 2021, "Learning N:M
Fine-grained Structured Sparse Neural Networks From Scratch").

The dense weights are kept and trained; every forward pass recomputes the N:M mask
of largest magnitude and multiplies by the masked weights ``W * mask``. The
backward pass is the straight-through estimator plus the *sparse-refined* term, a
decay on the pruned weights only::

    grad_W = grad_(W * mask) + decay * (1 - mask) * W        (decay λ = 2e-4)

which pulls the pruned weights towards zero so the mask settles. At the end,
:meth:`SRSTE.finalize` turns each layer into an :class:`~jsparse.nn.NMLinear`
holding only the kept weights.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from flax import nnx

from jsparse.core.registry import check_impl
from jsparse.nn import SRSTELinear, iter_linears, replace_module
from jsparse.nn.sr_ste_linear import input_axis_mask, sr_ste_masked

__all__ = ["SRSTE", "SRSTELinear", "input_axis_mask", "sr_ste_masked"]


@dataclasses.dataclass(frozen=True)
class SRSTE:
    """N:M training with SR-STE, in an ordinary NNX + optax loop.

    Args:
      n, m: keep ``n`` of every ``m`` consecutive weights along each kernel's input
        axis (default 2:4).
      decay: λ, the decay of the pruned weights (the paper's 2e-4).
      filter: an NNX filter of ``(path, layer)`` choosing the ``nnx.Linear`` layers.
      impl: the layers' product (:class:`~jsparse.nn.SRSTELinear`): ``"auto"`` (the
        N:M products on CPU with the native kernels, the masked dense product
        elsewhere), ``"dense"``, or a :func:`jsparse.matmul` implementation.

    Returns:
      The algorithm (a frozen dataclass): :meth:`apply` before training,
      :meth:`finalize` after.

    Raises:
      ValueError: ``n >= m`` or ``n < 1``, a negative decay; a layer whose
        ``in_features`` ``m`` does not divide (at :meth:`apply`).

    Use around an ordinary training loop::

      sr_ste = jsparse.train.SRSTE(n=2, m=4)
      model = sr_ste.apply(model)          # before building the optimizer
      optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
      ...                                  # the usual training loop, unchanged
      model = sr_ste.finalize(model)       # NMLinear layers

    Example:
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(8, 4, rngs=nnx.Rngs(0)))
      >>> sr_ste = SRSTE(n=2, m=4)
      >>> type(sr_ste.apply(model).layers[0]).__name__
      'SRSTELinear'
      >>> layer = sr_ste.finalize(model).layers[0]
      >>> type(layer).__name__, int((layer.dense_kernel() != 0).sum())  # 2 of every 4 kept
      ('NMLinear', 16)
    """

    n: int = 2
    m: int = 4
    decay: float = 2e-4
    filter: Any = ...
    impl: str = "auto"

    def __post_init__(self):
        if not 1 <= int(self.n) < int(self.m):
            raise ValueError(f"N:M sparsity needs 1 <= n < m, got n={self.n}, m={self.m}")
        if float(self.decay) < 0:
            raise ValueError(f"decay must be >= 0, got {self.decay}")
        check_impl(self.impl)

    def apply(self, model):
        """Replace the selected ``nnx.Linear`` layers by
        :class:`~jsparse.nn.SRSTELinear` (in place).

        Args:
          model: an NNX module.

        Returns:
          The model (the new layer if ``model`` itself is an ``nnx.Linear``).

        Warns:
          UserWarning: the filter selects no ``nnx.Linear``.
        """
        selected = iter_linears(model, filter=self.filter)
        if not selected:
            warnings.warn(
                f"SRSTE.apply: the filter {self.filter!r} selects no nnx.Linear layer",
                UserWarning,
                stacklevel=2,
            )
        for path, layer in selected:
            new = SRSTELinear(layer, n=self.n, m=self.m, decay=self.decay, impl=self.impl)
            model = replace_module(model, path, new)
        return model

    def finalize(self, model):
        """Replace every :class:`~jsparse.nn.SRSTELinear` by an
        :class:`~jsparse.nn.NMLinear` holding the kept weights (in place).

        Args:
          model: an NNX module.

        Returns:
          The model (the new layer if ``model`` itself is an ``SRSTELinear``).
        """
        selected = [(tuple(p), x) for p, x in nnx.iter_graph(model) if isinstance(x, SRSTELinear)]
        for path, layer in selected:
            model = replace_module(model, path, layer.to_nm())
        return model
