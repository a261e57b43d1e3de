"""``FormatLinearGeneral``: a jsparse layer behind the shapes of ``nnx.LinearGeneral``
(a 2-D contraction after reshaping), so that :func:`~jsparse.nn.sparsify` can convert
the projections of ``nnx.MultiHeadAttention``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jsparse.nn.format_linear import FormatLinear

__all__ = ["FormatLinearGeneral", "general_flat_shape"]

# Metadata keys that carry a sharding annotation (flax renames the last two).
_SHARDING_KEYS = ("out_sharding", "sharding", "sharding_names")


def general_flat_shape(linear: nnx.LinearGeneral) -> tuple[int, int]:
    """The ``(in, out)`` shape of ``linear``'s kernel flattened to 2-D, when
    :class:`FormatLinearGeneral` can stand in for it.

    Args:
      linear: an :class:`flax.nnx.LinearGeneral` (not stacked by ``nnx.vmap``; see
        :func:`~jsparse.nn.linear_shape` for stacked layers).

    Returns:
      ``(prod(in_features), prod(out_features))``.

    Raises:
      ValueError: the layer cannot be flattened to a 2-D contraction, with the
        reason: a ``batch_axis``, or a sharding spec that does not survive the
        flattening (a sharded axis that is not the leading axis of its group).

    Example:
      >>> from flax import nnx
      >>> from jsparse.nn.linear_general import general_flat_shape
      >>> general_flat_shape(nnx.LinearGeneral(16, (4, 8), rngs=nnx.Rngs(0)))
      (16, 32)
    """
    if linear.batch_axis:
        raise ValueError(
            f"it has batch_axis {dict(linear.batch_axis)} (a batched contraction, not one "
            "2-D kernel)"
        )
    _flat_metadata(linear.kernel.get_metadata(), (linear.in_features, linear.out_features))
    if linear.bias is not None:
        _flat_metadata(linear.bias.get_metadata(), (linear.out_features,))
    return math.prod(linear.in_features), math.prod(linear.out_features)


class FormatLinearGeneral(nnx.Module):
    """A :class:`~jsparse.nn.FormatLinear` behind the input and output shapes of an
    :class:`flax.nnx.LinearGeneral` without ``batch_axis``: the contracted ``axis`` of
    the input are moved last and flattened to ``prod(in_features)``, the jsparse layer
    ``layer`` (of kernel shape ``(prod(in_features), prod(out_features))``) is
    applied, and its output is reshaped to ``(*free input axes, *out_features)`` —
    exactly ``LinearGeneral``'s output layout. A drop-in for the projections of
    ``nnx.MultiHeadAttention``; :func:`~jsparse.nn.sparsify` builds it, and
    :meth:`to_linear` (so :func:`~jsparse.nn.densify`) gives the ``nnx.LinearGeneral``
    back.

    The jsparse layer is the attribute ``layer`` (``sparse_layers`` finds it, so
    dynamic sparse training works on it). Its kernel metadata is the
    ``LinearGeneral``'s with the sharding spec flattened (a group of axes takes the
    name of its leading axis); :meth:`to_linear` restores the original metadata.

    Args:
      layer: the jsparse layer, of ``in_features = prod(in_features)`` and
        ``out_features = prod(out_features)``.
      in_features, out_features: ``LinearGeneral``'s (ints or tuples).
      axis: the contracted input axes, one per entry of ``in_features``.
      kernel_metadata, bias_metadata: the ``LinearGeneral``'s, for :meth:`to_linear`.

    Raises:
      ValueError: ``layer``'s shape is not the flattened one, or ``axis`` and
        ``in_features`` differ in length.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.nn import BCSRLinear, FormatLinearGeneral
      >>> layer = BCSRLinear(16, 32, sparsity=0.5, block_shape=(8, 8), rngs=nnx.Rngs(0))
      >>> general = FormatLinearGeneral(layer, 16, (4, 8))
      >>> general(jnp.ones((2, 5, 16))).shape
      (2, 5, 4, 8)
    """

    def __init__(
        self,
        layer: FormatLinear,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        axis: int | Sequence[int] = -1,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    ):
        self.in_features = _tuple(in_features)
        self.out_features = _tuple(out_features)
        self.axis = _tuple(axis)
        if len(self.axis) != len(self.in_features):
            raise ValueError(
                f"FormatLinearGeneral: axis {self.axis} and in_features {self.in_features} "
                "must have the same length"
            )
        flat = (math.prod(self.in_features), math.prod(self.out_features))
        if (layer.in_features, layer.out_features) != flat:
            raise ValueError(
                f"FormatLinearGeneral: the layer is ({layer.in_features}, "
                f"{layer.out_features}), the flattened kernel is {flat}"
            )
        self.layer = layer
        self.kernel_metadata = dict(kernel_metadata)
        self.bias_metadata = dict(bias_metadata)

    @classmethod
    def from_linear_general(
        cls, linear: nnx.LinearGeneral, layer_type: type[FormatLinear], **format_params: Any
    ) -> FormatLinearGeneral:
        """From an :class:`flax.nnx.LinearGeneral`: ``layer_type.from_linear`` on its
        flattened kernel and bias (dtypes, precision, promotion and metadata kept).

        Args:
          linear: the dense layer (no ``batch_axis``; not stacked).
          layer_type: a :class:`~jsparse.nn.FormatLinear` subclass
            (``jsparse.nn.FORMATS["bcsr"]`` ...).
          **format_params: its ``from_kernel`` parameters and ``impl``.

        Returns:
          The new layer (``linear`` is unchanged).

        Raises:
          ValueError: ``linear`` cannot be flattened (see :func:`general_flat_shape`),
            or bad format parameters.

        Example:
          >>> from flax import nnx
          >>> from jsparse.nn import FormatLinearGeneral, NMLinear
          >>> linear = nnx.LinearGeneral((2, 8), 4, axis=(-2, -1), rngs=nnx.Rngs(0))
          >>> layer = FormatLinearGeneral.from_linear_general(linear, NMLinear, n=2, m=4)
          >>> type(layer.layer).__name__, layer.layer.in_features
          ('NMLinear', 16)
        """
        n_in, n_out = general_flat_shape(linear)
        kernel = jnp.reshape(linear.kernel[...], (n_in, n_out))
        bias = None if linear.bias is None else jnp.reshape(linear.bias[...], (n_out,))
        kernel_metadata = linear.kernel.get_metadata()
        bias_metadata = {} if linear.bias is None else linear.bias.get_metadata()
        flat = nnx.Linear(
            n_in,
            n_out,
            use_bias=bias is not None,
            dtype=linear.dtype,
            param_dtype=linear.param_dtype,
            precision=linear.precision,
            kernel_init=lambda *_: kernel,
            bias_init=lambda *_: bias,
            promote_dtype=linear.promote_dtype,
            preferred_element_type=linear.preferred_element_type,
            rngs=nnx.Rngs(0),
            kernel_metadata=_flat_metadata(
                kernel_metadata, (linear.in_features, linear.out_features)
            ),
            bias_metadata=_flat_metadata(bias_metadata, (linear.out_features,)),
        )
        return cls(
            layer_type.from_linear(flat, **format_params),
            linear.in_features,
            linear.out_features,
            axis=linear.axis,
            kernel_metadata=kernel_metadata,
            bias_metadata=bias_metadata,
        )

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        """``LinearGeneral``'s output: contract ``axis`` of ``inputs`` with the kernel.

        Args:
          inputs: the input, whose ``axis`` have the sizes ``in_features``.
          out_sharding: must be ``None`` (the sparse products do not take an output
            sharding yet).

        Returns:
          ``(*free input axes, *out_features)``.

        Raises:
          NotImplementedError: ``out_sharding`` is given.
        """
        if out_sharding is not None:
            raise NotImplementedError(
                "FormatLinearGeneral: out_sharding is not supported (the sparse products "
                "take no output sharding); densify the layer or pass out_sharding=None"
            )
        # As LinearGeneral: the contracted axes in increasing order.
        axis = tuple(sorted(a % inputs.ndim for a in self.axis))
        free = [a for a in range(inputs.ndim) if a not in axis]
        x = jnp.transpose(inputs, (*free, *axis))
        batch = x.shape[: len(free)]
        y = self.layer(jnp.reshape(x, (*batch, self.layer.in_features)))
        return jnp.reshape(y, (*batch, *self.out_features))

    def to_linear(self) -> nnx.LinearGeneral:
        """An :class:`flax.nnx.LinearGeneral` computing the same function (the jsparse
        layer's kernel and bias reshaped, its dtypes, precision and promotion, the
        original metadata).

        Returns:
          A new ``nnx.LinearGeneral``.

        Example:
          >>> from flax import nnx
          >>> from jsparse.nn import FormatLinearGeneral, MonarchLinear
          >>> layer = MonarchLinear(16, 16, nblocks=4, rngs=nnx.Rngs(0))
          >>> FormatLinearGeneral(layer, 16, (2, 8)).to_linear().kernel.shape
          (16, 2, 8)
        """
        inner = self.layer
        kernel = jnp.reshape(inner.dense_kernel(), (*self.in_features, *self.out_features))
        bias = None if inner.bias is None else jnp.reshape(inner.bias[...], self.out_features)
        return nnx.LinearGeneral(
            self.in_features,
            self.out_features,
            axis=self.axis,
            use_bias=bias is not None,
            dtype=inner.dtype,
            param_dtype=inner.param_dtype,
            kernel_init=lambda *_: kernel,
            bias_init=lambda *_: bias,
            precision=inner.precision,
            promote_dtype=inner.promote_dtype,
            preferred_element_type=inner.preferred_element_type,
            rngs=nnx.Rngs(0),
            kernel_metadata=self.kernel_metadata,
            bias_metadata=self.bias_metadata,
        )


def _tuple(x) -> tuple[int, ...]:
    return tuple(int(v) for v in x) if isinstance(x, Sequence) else (int(x),)


def _flat_metadata(metadata: Mapping[str, Any], groups: tuple[tuple[int, ...], ...]):
    """``metadata`` with its sharding spec (one name per axis of the groups) flattened
    to one name per group: a group takes its leading axis's name when only that axis
    (or only axes of size 1 before it) is named."""
    out = {k: v for k, v in metadata.items() if k not in _SHARDING_KEYS}
    for key in _SHARDING_KEYS:
        spec = metadata.get(key)
        if spec is None:
            continue
        spec = tuple(spec)
        sizes = [s for group in groups for s in group]
        if len(spec) != len(sizes):
            raise ValueError(f"its sharding spec {spec} does not name the {len(sizes)} kernel axes")
        flat, start = [], 0
        for group in groups:
            names = spec[start : start + len(group)]
            named = [i for i, n in enumerate(names) if n is not None]
            if len(named) > 1 or (named and any(s != 1 for s in group[: named[0]])):
                raise ValueError(
                    f"its sharding spec {spec} names an axis of the group {group} other "
                    "than the leading one, which flattening would not keep"
                )
            flat.append(names[named[0]] if named else None)
            start += len(group)
        out["out_sharding"] = tuple(flat)
    return out
