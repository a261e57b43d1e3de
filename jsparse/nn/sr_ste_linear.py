"""``SRSTELinear``: an ``nnx.Linear`` trained through its N:M mask with SR-STE (Zhou et
al., 2021); :class:`jsparse.train.SRSTE` puts it in a model and takes it out.

The forward pass uses ``W * mask`` (the N:M mask of largest magnitude along the
input axis, recomputed every call); the gradient is the straight-through estimator
plus SR-STE's decay of the pruned weights, ``g + decay * (1 - mask) * W``.

On CPU with the native kernels, the layer prunes ``W`` into a :class:`jsparse.NM` every
call (one native pass, :func:`sr_ste_matmul`) and runs the N:M products for the
forward and for the input's gradient; only the weight gradient (the straight-through
estimator's dense ``x.T @ dy``) stays dense. Elsewhere it multiplies ``W * mask`` with
the dense ``dot_general``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import jsparse_native
from jsparse.core import verbs
from jsparse.core.registry import check_impl
from jsparse.formats.nm import nm_mask
from jsparse.formats.nm.matrix import prune
from jsparse.nn.nm_linear import NMLinear, check_input_groups

__all__ = ["SRSTELinear", "input_axis_mask", "sr_ste_masked", "sr_ste_matmul"]


def input_axis_mask(kernel: jax.Array, n: int, m: int) -> jax.Array:
    """The N:M mask of largest magnitude along axis 0 (the input axis of an
    ``(in, out)`` kernel): ``jsparse.nm_mask(kernel, n, m, axis=0)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.nn.sr_ste_linear import input_axis_mask
      >>> input_axis_mask(jnp.array([[1.0], [-4.0], [3.0], [0.5]]), 2, 4)[:, 0].tolist()
      [False, True, True, False]
    """
    return nm_mask(kernel, n, m, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def sr_ste_masked(kernel: jax.Array, n: int, m: int, decay: float) -> jax.Array:
    """``kernel * mask`` with the N:M mask of ``kernel`` along axis 0 (the input axis);
    the gradient is SR-STE's: ``g + decay * (1 - mask) * kernel``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jsparse.nn.sr_ste_linear import sr_ste_masked
      >>> w = jnp.array([[1.0], [-4.0], [3.0], [0.5]])
      >>> jax.grad(lambda w: sr_ste_masked(w, 2, 4, 0.5).sum())(w)[:, 0].tolist()
      [1.5, 1.0, 1.0, 1.25]
    """
    return kernel * input_axis_mask(kernel, n, m)


def _fwd(kernel, n, m, decay):
    mask = input_axis_mask(kernel, n, m)
    return kernel * mask, (kernel, mask)


def _bwd(n, m, decay, res, g):
    kernel, mask = res
    return (g + decay * jnp.where(mask, jnp.zeros((), kernel.dtype), kernel),)


sr_ste_masked.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def sr_ste_matmul(
    inputs: jax.Array,
    kernel: jax.Array,
    n: int,
    m: int,
    decay: float,
    impl: str = "auto",
    precision: jax.lax.PrecisionLike = None,
) -> jax.Array:
    """``inputs @ (kernel * mask)`` through a :class:`jsparse.NM`, with SR-STE's gradient.

    ``kernel`` ``(in, out)`` is pruned to ``n:m`` along axis 0 in its own dtype
    (:meth:`NM.fromdense`: natively on CPU, with the mask from the same pass), and
    ``inputs (..., in)`` multiplied by it in ``inputs``' dtype with
    :func:`jsparse.matmul` (``impl``). The input's gradient is
    the N:M product of the other orientation; the kernel's is SR-STE's,
    ``inputs.T @ dy + decay * (1 - mask) * kernel`` (a dense product at
    ``precision``). Equal to ``inputs @ sr_ste_masked(kernel, n, m, decay)`` up to
    rounding.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jsparse.nn.sr_ste_linear import sr_ste_masked, sr_ste_matmul
      >>> x, w = jnp.ones((2, 8)), jnp.arange(32.0).reshape(8, 4) - 16
      >>> bool(jnp.allclose(sr_ste_matmul(x, w, 2, 4, 2e-4), x @ sr_ste_masked(w, 2, 4, 2e-4)))
      True
    """
    return _matmul_fwd(inputs, kernel, n, m, decay, impl, precision)[0]


def _matmul_fwd(inputs, kernel, n, m, decay, impl, precision):
    a, mask = prune(kernel, n=n, m=m, axis=0, with_mask=True)
    if a.dtype != inputs.dtype:
        a = a.astype(inputs.dtype)
    return verbs.matmul(inputs, a, impl=impl), (inputs, kernel, a, mask)


def _matmul_bwd(n, m, decay, impl, precision, res, dy):
    inputs, kernel, a, mask = res
    (dx,) = jax.vjp(lambda x: verbs.matmul(x, a, impl=impl), inputs)[1](dy)
    batch = tuple(range(inputs.ndim - 1))
    dw = jnp.tensordot(inputs, dy.astype(inputs.dtype), axes=(batch, batch), precision=precision)
    dw = dw.astype(kernel.dtype) + decay * jnp.where(mask, jnp.zeros((), kernel.dtype), kernel)
    return dx.astype(inputs.dtype), dw


sr_ste_matmul.defvjp(_matmul_fwd, _matmul_bwd)


class SRSTELinear(nnx.Module):
    """An ``nnx.Linear`` in SR-STE training: a dense ``kernel`` (an ``nnx.Param``, the
    same name, shape and metadata as in ``nnx.Linear``) used through its N:M mask.

    Everything else is the ``nnx.Linear``'s: ``dtype``, ``param_dtype``,
    ``precision``, ``dot_general``, ``promote_dtype``, ``preferred_element_type``
    and the bias; :meth:`to_linear` and :meth:`to_nm` keep them (``to_nm`` all but
    ``dot_general``).

    Args:
      linear: the ``nnx.Linear`` to train (its kernel and bias are taken over).
      n, m: keep ``n`` of every ``m`` along the input axis.
      decay: SR-STE's λ on the pruned weights.
      impl: how the forward multiplies. ``"dense"``: ``W * mask`` through the layer's
        ``dot_general``. A :func:`jsparse.matmul` implementation (``"cpu"``,
        ``"xla"`` ...): ``W`` pruned into a :class:`jsparse.NM` every call and the N:M
        products for the forward and the input's gradient
        (:func:`sr_ste_matmul`; the layer's ``dot_general`` is not used). ``"auto"``
        (default): the N:M products on CPU when the native kernels are built and the
        ``dot_general`` is ``jax.lax.dot_general``, ``"dense"`` elsewhere (a dense
        product is faster than pruning every step on GPUs and TPUs).

    Raises:
      ValueError: ``n >= m``, ``n < 1``, or ``m`` does not divide ``in_features``.
      TypeError: ``impl`` is not a string.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.nn import SRSTELinear
      >>> layer = SRSTELinear(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), n=2, m=4)
      >>> layer(jnp.ones((2, 8))).shape, type(layer.to_nm()).__name__
      ((2, 4), 'NMLinear')
    """

    def __init__(
        self,
        linear: nnx.Linear,
        *,
        n: int = 2,
        m: int = 4,
        decay: float = 2e-4,
        impl: str = "auto",
    ):
        check_impl(impl)
        self.impl = impl
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.n, self.m = check_input_groups(n, m, self.in_features)
        self.decay = float(decay)
        self.use_bias = linear.bias is not None
        self.dtype = linear.dtype
        self.param_dtype = linear.param_dtype
        self.precision = linear.precision
        self.dot_general = linear.dot_general
        self.promote_dtype = linear.promote_dtype
        self.preferred_element_type = linear.preferred_element_type
        self.kernel = nnx.Param(linear.kernel[...], **linear.kernel.get_metadata())
        if self.use_bias:
            self.bias = nnx.Param(linear.bias[...], **linear.bias.get_metadata())
        else:
            self.bias = nnx.data(None)

    def masked_kernel(self) -> jax.Array:
        """The N:M sparse kernel used in the forward pass (dense layout)."""
        return sr_ste_masked(self.kernel[...], self.n, self.m, self.decay)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``inputs @ (W * mask) + b`` over the last axis (``impl`` picks how). The mask
        comes from the kernel in its own dtype (``param_dtype``), as in :meth:`to_nm`;
        the product runs in the promoted dtype."""
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        # The kernel stands in as a 0-d array of its dtype: it is promoted after masking.
        inputs, stand_in, bias = self.promote_dtype(
            (inputs, jnp.zeros((), kernel.dtype), bias), dtype=self.dtype
        )
        dtype = stand_in.dtype
        native = self.dot_general is jax.lax.dot_general and jsparse_native.available()
        if self.impl == "auto" and native:
            y = jax.lax.platform_dependent(
                inputs,
                kernel,
                cpu=lambda x, w: self._nm_product(x, w, "auto"),
                default=lambda x, w: self._dense_product(x, w, dtype),
            )
        elif self.impl in ("auto", "dense"):
            y = self._dense_product(inputs, kernel, dtype)
        else:
            y = self._nm_product(inputs, kernel, self.impl)
        if self.preferred_element_type is not None:
            y = y.astype(self.preferred_element_type)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y

    def _dense_product(self, inputs, kernel, dtype):
        kernel = sr_ste_masked(kernel, self.n, self.m, self.decay).astype(dtype)
        kwargs = {}
        if self.preferred_element_type is not None:
            kwargs["preferred_element_type"] = self.preferred_element_type
        return self.dot_general(
            inputs,
            kernel,
            (((inputs.ndim - 1,), (0,)), ((), ())),
            precision=self.precision,
            **kwargs,
        )

    def _nm_product(self, inputs, kernel, impl):
        return sr_ste_matmul(inputs, kernel, self.n, self.m, self.decay, impl, self.precision)

    def to_nm(self) -> NMLinear:
        """The :class:`~jsparse.nn.NMLinear` holding the kept weights (with this layer's
        dtypes, precision, promotion, output dtype and metadata)."""
        return NMLinear.from_kernel(
            self.kernel[...],
            self.bias[...] if self.bias is not None else None,
            n=self.n,
            m=self.m,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            promote_dtype=self.promote_dtype,
            preferred_element_type=self.preferred_element_type,
            kernel_metadata=self.kernel.get_metadata(),
            bias_metadata=self.bias.get_metadata() if self.bias is not None else {},
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
            precision=self.precision,
            kernel_init=lambda *_: kernel,
            bias_init=lambda *_: bias,
            dot_general=self.dot_general,
            promote_dtype=self.promote_dtype,
            preferred_element_type=self.preferred_element_type,
            rngs=nnx.Rngs(0),
            kernel_metadata=self.kernel.get_metadata(),
            bias_metadata=self.bias.get_metadata() if self.bias is not None else {},
        )
