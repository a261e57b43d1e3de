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
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from jsparse.nm import nm_mask
from jsparse.nn.nm_linear import NMLinear, check_nm
from jsparse.nn.surgery import _modules, _replace

__all__ = ["SRSTE", "SRSTELinear", "input_axis_mask", "sr_ste_masked"]


def input_axis_mask(kernel: jax.Array, n: int, m: int) -> jax.Array:
    """The N:M mask of largest magnitude along axis 0 (the input axis of an
    ``(in, out)`` kernel): ``jsparse.nm_mask(kernel, n, m, axis=0)``."""
    return nm_mask(kernel, n, m, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def sr_ste_masked(kernel: jax.Array, n: int, m: int, decay: float) -> jax.Array:
    """``kernel * mask`` with the N:M mask of ``kernel`` along axis 0 (the input axis);
    the gradient is SR-STE's: ``g + decay * (1 - mask) * kernel``."""
    return kernel * input_axis_mask(kernel, n, m)


def _fwd(kernel, n, m, decay):
    mask = input_axis_mask(kernel, n, m)
    return kernel * mask, (kernel, mask)


def _bwd(n, m, decay, res, g):
    kernel, mask = res
    return (g + decay * jnp.where(mask, jnp.zeros((), kernel.dtype), kernel),)


sr_ste_masked.defvjp(_fwd, _bwd)


class SRSTELinear(nnx.Module):
    """An ``nnx.Linear`` in SR-STE training: a dense ``kernel`` (an ``nnx.Param``, the
    same name and shape as in ``nnx.Linear``) used through its N:M mask.

    Args:
      linear: the ``nnx.Linear`` to train (its kernel and bias are taken over).
      n, m: keep ``n`` of every ``m`` along the input axis.
      decay: SR-STE's λ on the pruned weights.
    """

    def __init__(self, linear: nnx.Linear, *, n: int = 2, m: int = 4, decay: float = 2e-4):
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.n, self.m = check_nm(n, m, self.in_features)
        self.decay = float(decay)
        self.use_bias = linear.bias is not None
        self.dtype = linear.dtype
        self.param_dtype = linear.param_dtype
        self.kernel = nnx.Param(linear.kernel[...])
        self.bias = nnx.Param(linear.bias[...]) if self.use_bias else nnx.data(None)

    def masked_kernel(self) -> jax.Array:
        """The N:M sparse kernel used in the forward pass (dense layout)."""
        return sr_ste_masked(self.kernel[...], self.n, self.m, self.decay)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.masked_kernel()
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = dtypes.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = inputs @ kernel
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y

    def to_nm(self) -> NMLinear:
        """The :class:`~jsparse.nn.NMLinear` holding the kept weights."""
        return NMLinear.from_kernel(
            self.kernel[...],
            self.bias[...] if self.bias is not None else None,
            n=self.n,
            m=self.m,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def to_linear(self) -> nnx.Linear:
        """An ``nnx.Linear`` computing the same function (the masked kernel)."""
        kernel = jax.lax.stop_gradient(self.masked_kernel())
        bias = self.bias[...] if self.bias is not None else None
        return nnx.Linear(
            self.in_features,
            self.out_features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=lambda *_: kernel,
            bias_init=lambda *_: bias,
            rngs=nnx.Rngs(0),
        )


@dataclasses.dataclass(frozen=True)
class SRSTE:
    """N:M training with SR-STE, in an ordinary NNX + optax loop.

    Args:
      n, m: keep ``n`` of every ``m`` consecutive weights along each kernel's input
        axis (default 2:4).
      decay: λ, the decay of the pruned weights (the paper's 2e-4).
      filter: an NNX filter of ``(path, layer)`` choosing the ``nnx.Linear`` layers.

    Raises:
      ValueError: ``n >= m`` or ``n < 1``, a negative decay; a layer whose
        ``in_features`` ``m`` does not divide (at :meth:`apply`).

    Example::

      sr_ste = jsparse.train.SRSTE(n=2, m=4)
      model = sr_ste.apply(model)          # before building the optimizer
      optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
      ...                                  # the usual training loop, unchanged
      model = sr_ste.finalize(model)       # NMLinear layers
    """

    n: int = 2
    m: int = 4
    decay: float = 2e-4
    filter: Any = ...

    def __post_init__(self):
        if not 1 <= int(self.n) < int(self.m):
            raise ValueError(f"N:M sparsity needs 1 <= n < m, got n={self.n}, m={self.m}")
        if float(self.decay) < 0:
            raise ValueError(f"decay must be >= 0, got {self.decay}")

    def apply(self, model):
        """Replace the selected ``nnx.Linear`` layers by :class:`SRSTELinear` (in place;
        returns the model). Warns if the filter selects none."""
        predicate = nnx.filterlib.to_predicate(self.filter)
        selected = [
            (path, layer)
            for path, layer in _modules(model)
            if type(layer) is nnx.Linear and predicate(path, layer)
        ]
        if not selected:
            warnings.warn(
                f"SRSTE.apply: the filter {self.filter!r} selects no nnx.Linear layer",
                UserWarning,
                stacklevel=2,
            )
        for path, layer in selected:
            model = _replace(model, path, SRSTELinear(layer, n=self.n, m=self.m, decay=self.decay))
        return model

    def finalize(self, model):
        """Replace every :class:`SRSTELinear` by an :class:`~jsparse.nn.NMLinear`
        holding the kept weights (in place; returns the model)."""
        for path, layer in [(p, x) for p, x in _modules(model) if isinstance(x, SRSTELinear)]:
            model = _replace(model, path, layer.to_nm())
        return model
