"""The base of every jsparse layer: ``y = x @ W + b`` with ``W`` stored in a format."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from jsparse import ops
from jsparse._base import AbstractSparseMatrix
from jsparse.nn import _probe
from jsparse.nn.variables import SparsityPattern

__all__ = ["FormatLinear"]


class FormatLinear(nnx.Module):
    """A linear layer whose kernel ``W`` of shape ``(in_features, out_features)`` is a
    jsparse format; ``y = x @ W + b`` over the last axis of ``x``, like
    :class:`flax.nnx.Linear`.

    The format's leaves become attributes named ``kernel_<leaf>``: floating leaves
    (the stored values) are :class:`flax.nnx.Param`, integer leaves (index arrays)
    are :class:`~jsparse.nn.SparsityPattern`. :attr:`kernel` reassembles the format.
    Subclasses choose the format and how it is initialised.
    """

    in_features: int
    out_features: int

    def _init_common(self, in_features, out_features, *, use_bias, dtype, param_dtype, impl):
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.impl = impl

    @classmethod
    def _from_dense_kernel(cls, kernel, bias, *, dtype, param_dtype, impl, **layer_kwargs):
        """A layer whose ``kernel_init`` returns ``kernel``: the subclass's constructor
        then prunes or projects it into the format (the ``from_kernel`` recipe)."""
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2:
            raise ValueError(f"kernel must be 2-D (in_features, out_features), got {kernel.shape}")
        return cls(
            kernel.shape[0],
            kernel.shape[1],
            use_bias=bias is not None,
            dtype=dtype,
            param_dtype=kernel.dtype if param_dtype is None else param_dtype,
            kernel_init=lambda *_: kernel,
            bias_init=lambda *_: bias,
            impl=impl,
            rngs=nnx.Rngs(0),
            **layer_kwargs,
        )

    @classmethod
    def from_linear(cls, linear: nnx.Linear, *, impl: str = "auto", **format_params):
        """From an :class:`flax.nnx.Linear`: :meth:`from_kernel` on its kernel and bias,
        keeping its ``dtype`` and ``param_dtype``.

        ``format_params`` are the subclass's ``from_kernel`` parameters (``sparsity`` and
        ``block_shape``; ``n`` and ``m``; ``nblocks``; ``rank`` ...).
        """
        return cls.from_kernel(
            linear.kernel[...],
            linear.bias[...] if linear.bias is not None else None,
            dtype=linear.dtype,
            param_dtype=linear.param_dtype,
            impl=impl,
            **format_params,
        )

    def _init_bias(self, bias_init, rngs):
        if self.use_bias:
            bias = bias_init(rngs.params(), (self.out_features,), self.param_dtype)
            self.bias = nnx.Param(jnp.asarray(bias, self.param_dtype))
        else:
            self.bias = nnx.data(None)

    def _set_kernel(self, w: AbstractSparseMatrix) -> None:
        if tuple(w.shape) != (self.in_features, self.out_features):
            raise ValueError(
                f"{type(self).__name__}: kernel shape {tuple(w.shape)} is not "
                f"(in_features, out_features) = ({self.in_features}, {self.out_features})"
            )
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(w)
        names = tuple("kernel_" + _key_name(path) for path, _ in with_paths)
        self._kernel_treedef = treedef
        self._kernel_leaf_names = names
        for name, (_, leaf) in zip(names, with_paths, strict=True):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                setattr(self, name, nnx.Param(leaf))
            else:
                setattr(self, name, SparsityPattern(leaf))

    @property
    def kernel(self) -> AbstractSparseMatrix:
        """The weight as a jsparse format of shape ``(in_features, out_features)``."""
        leaves = [getattr(self, n)[...] for n in self._kernel_leaf_names]
        return jax.tree_util.tree_unflatten(self._kernel_treedef, leaves)

    @property
    def kernel_variables(self) -> dict[str, nnx.Variable]:
        """The variables holding the kernel's leaves, by attribute name."""
        return {n: getattr(self, n) for n in self._kernel_leaf_names}

    def dense_kernel(self) -> jax.Array:
        """The dense ``(in_features, out_features)`` kernel."""
        return self.kernel.todense()

    def to_linear(self) -> nnx.Linear:
        """An :class:`flax.nnx.Linear` computing the same function."""
        kernel = self.dense_kernel()
        layer = nnx.Linear(
            self.in_features,
            self.out_features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=lambda *_: kernel.astype(self.param_dtype),
            bias_init=lambda *_: (
                self.bias[...] if self.bias is not None else jnp.zeros((self.out_features,))
            ),
            rngs=nnx.Rngs(0),
        )
        return layer

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``inputs @ W + b`` over the last axis of ``inputs``."""
        w = self.kernel
        bias = self.bias[...] if self.bias is not None else None
        dtype = dtypes.canonicalize_dtype(inputs, jnp.zeros((), w.dtype), bias, dtype=self.dtype)
        inputs, bias = dtypes.promote_dtype((inputs, bias), dtype=dtype)
        if w.dtype != dtype:
            w = w.astype(dtype)
        y = ops.matmul(inputs, w, impl=self.impl)
        probe = _probe.probe_for(self)
        if probe is not None:
            y = y + inputs @ probe.astype(dtype)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def _key_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "_".join(parts)


def check_sparsity(sparsity: Any) -> float:
    """``sparsity`` as a float in ``[0, 1)``, or a clear ``ValueError``."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError) as e:
        raise TypeError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from e
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return s
