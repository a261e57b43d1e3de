"""The base of every jsparse layer: ``y = x @ W + b`` with ``W`` stored in a format,
and the registry of layers by format name."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from flax.nnx.nn.linear import default_bias_init, default_kernel_init

from jsparse.core import verbs
from jsparse.core.matrix import AbstractSparseMatrix
from jsparse.nn.probe import probe_for
from jsparse.nn.variables import SparsityPattern

__all__ = ["FORMATS", "FormatLinear"]

# format name -> layer class, filled by ``FormatLinear.__init_subclass__``.
_LAYERS: dict[str, type[FormatLinear]] = {}

#: The layer class of each format name (``"bcsr"``, ``"nm"`` ...), as used by
#: :func:`~jsparse.nn.sparsify`; a read-only view of the classes that registered
#: themselves by declaring ``format_name``.
FORMATS: Mapping[str, type[FormatLinear]] = MappingProxyType(_LAYERS)

# Metadata keys that carry a sharding annotation (flax renames the last two).
_SHARDING_KEYS = ("out_sharding", "sharding", "sharding_names")


class FormatLinear(nnx.Module):
    """A linear layer whose kernel ``W`` of shape ``(in_features, out_features)`` is a
    jsparse format; ``y = x @ W + b`` over the last axis of ``x``, like
    :class:`flax.nnx.Linear`, with the same arguments in the same order.

    The format's leaves become attributes named ``kernel_<leaf>``: floating leaves
    (the stored values) are :class:`flax.nnx.Param`, integer leaves (index arrays)
    are :class:`~jsparse.nn.SparsityPattern`. :attr:`kernel` reassembles the format
    and :meth:`set_kernel` installs a new one of the same structure.

    A subclass is a format's layer: it implements ``_init_kernel(kernel_init, key,
    **format_params)`` (the initial format, in ``param_dtype``, from a plain
    initializer) and ``from_kernel`` (the layer from a dense kernel), and declares
    ``format_name`` and ``kernel_leaf_axes``; defining the class registers it in
    :data:`~jsparse.nn.FORMATS`, so :func:`~jsparse.nn.sparsify` finds it.

    Metadata: every kernel variable gets ``kernel_metadata`` (as ``nnx.Linear``'s
    kernel does), except its sharding spec, which names the *dense* kernel's axes
    ``(in_features, out_features)``: each variable gets a spec that puts those
    names on its own axes of the same meaning (``kernel_leaf_axes``) and ``None``
    elsewhere. So ``nnx.with_partitioning(init, (None, "model"))`` makes BCSR's
    ``kernel_data (nse, bm, bn)`` ``P(None, None, "model")``, and index arrays with
    no such axis replicated. This places the annotations; whether a sharded sparse
    product runs well is up to the format.

    Args:
      in_features, out_features: the dense kernel is ``(in_features, out_features)``.
      use_bias: whether to add a bias (default ``True``).
      dtype: the compute dtype (default: promote the input and parameter dtypes).
      param_dtype: the dtype of the stored values and the bias (default float32).
      precision: kept for :meth:`to_linear` and used by the dense-gradient probe's
        dot; the sparse product (:func:`jsparse.matmul`) takes no precision: its
        kernels run at XLA's default precision and accumulate in float32.
      kernel_init: initializer of the dense ``(in_features, out_features)`` kernel,
        which the subclass projects into its format; ``nnx.with_partitioning(init,
        spec)`` (any ``nnx.with_metadata``) is unwrapped as ``nnx.Linear`` does and its
        metadata joins ``kernel_metadata``. There is no ``dot_general``: the product
        is the sparse kernel's.
      bias_init: initializer of the bias (metadata unwrapped likewise).
      promote_dtype: as in ``nnx.Linear``: called with ``(inputs, kernel, bias)``
        and ``dtype=``; ``kernel`` is a 0-d array of the kernel's dtype standing for
        the format, whose stored values are then cast to the dtype it comes back in.
      preferred_element_type: the output dtype; the sparse product returns the
        compute dtype (accumulated in float32) and is cast to it.
      rngs: the random streams (``rngs.params()``: the kernel, then the bias).
      kernel_metadata: metadata of the kernel's variables, e.g.
        ``{"out_sharding": ("data", None)}`` (a spec of the dense kernel's two axes,
        mapped onto each variable as described above).
      bias_metadata: metadata of the bias ``nnx.Param``.
      impl: the matmul implementation (``"auto"``, ``"xla"``, ``"dense"``,
        ``"pallas"``).
      **format_params: the subclass's own parameters, passed to ``_init_kernel``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.nn import FORMATS, FormatLinear
      >>> layer = FORMATS["nm"](8, 4, n=2, m=4, rngs=nnx.Rngs(0))
      >>> isinstance(layer, FormatLinear), layer(jnp.ones((3, 8))).shape
      (True, (3, 4))
    """

    #: The format name the layer registers under (``None``: not registered).
    format_name: ClassVar[str | None] = None
    #: For each kernel leaf (by its name without ``kernel_``), one entry per axis:
    #: ``"in"`` / ``"out"`` where the axis runs along the dense kernel's input /
    #: output axis, else ``None``. Leaves not listed are replicated.
    kernel_leaf_axes: ClassVar[Mapping[str, tuple[str | None, ...]]] = MappingProxyType({})

    in_features: int
    out_features: int

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("format_name")
        if name is None:
            return
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__name__}.format_name must be a non-empty str, got {name!r}")
        known = _LAYERS.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise ValueError(
                f"format_name {name!r} of {cls.__module__}.{cls.__qualname__} is already "
                f"taken by {known.__module__}.{known.__qualname__}"
            )
        _LAYERS[name] = cls

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        kernel_init: nnx.Initializer | None = default_kernel_init,
        bias_init: nnx.Initializer = default_bias_init,
        promote_dtype: Callable[..., Any] = dtypes.promote_dtype,
        preferred_element_type: Any = None,
        rngs: nnx.Rngs,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        impl: str = "auto",
        **format_params: Any,
    ):
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type
        self.impl = impl

        drawn: dict[str, Any] = {}
        init = None if kernel_init is None else _plain_initializer(kernel_init, drawn)
        w = self._init_kernel(init, rngs.params(), **format_params)
        self.kernel_metadata = {**kernel_metadata, **drawn}
        self._install_kernel(w)

        if self.use_bias:
            value, drawn = _unwrap(bias_init(rngs.params(), (self.out_features,), param_dtype))
            self.bias_metadata = {**bias_metadata, **drawn}
            self.bias = nnx.Param(jnp.asarray(value, param_dtype), **self.bias_metadata)
        else:
            self.bias_metadata = dict(bias_metadata)
            self.bias = nnx.data(None)

    # ------------------------------------------------------------ subclass hooks
    def _init_kernel(
        self, kernel_init: nnx.Initializer | None, key: jax.Array, **format_params: Any
    ) -> AbstractSparseMatrix:
        """The initial kernel, a format of shape ``(in_features, out_features)`` in
        ``param_dtype``. ``kernel_init`` returns plain arrays of the requested shape
        in ``param_dtype`` (``None`` when the caller passed ``None``); ``key`` is the
        kernel's key (``nnx.Linear`` draws its kernel from the same one)."""
        raise NotImplementedError(f"{type(self).__name__} does not define _init_kernel")

    def _leaf_metadata(self, leaf_name: str, leaf: jax.Array) -> dict[str, Any]:
        """The metadata of the variable holding kernel leaf ``leaf_name``:
        ``kernel_metadata`` with the dense kernel's sharding spec mapped onto the
        leaf's axes through ``kernel_leaf_axes``."""
        metadata = {k: v for k, v in self.kernel_metadata.items() if k not in _SHARDING_KEYS}
        given = [self.kernel_metadata[k] for k in _SHARDING_KEYS if k in self.kernel_metadata]
        spec = given[0] if given else None
        if spec is None:
            return metadata
        if len(spec) != 2:
            raise ValueError(
                f"{type(self).__name__}: the kernel's sharding spec must name its 2 axes "
                f"(in_features, out_features), got {spec!r}"
            )
        axes = self.kernel_leaf_axes.get(leaf_name, (None,) * leaf.ndim)
        dense_axis = {"in": spec[0], "out": spec[1], None: None}
        metadata["out_sharding"] = tuple(dense_axis[a] for a in axes)
        return metadata

    # ------------------------------------------------------------ constructors
    @classmethod
    def _from_dense_kernel(cls, kernel, bias, *, kernel_init=None, **layer_kwargs):
        """A layer of ``kernel``'s shape whose ``kernel_init`` returns ``kernel`` (its
        constructor then prunes or projects it into the format; a subclass may pass
        another ``kernel_init``) and whose ``bias_init`` returns ``bias``."""
        kernel = jnp.asarray(kernel)
        if kernel.ndim != 2:
            raise ValueError(f"kernel must be 2-D (in_features, out_features), got {kernel.shape}")
        if layer_kwargs.get("param_dtype") is None:
            layer_kwargs["param_dtype"] = kernel.dtype
        return cls(
            kernel.shape[0],
            kernel.shape[1],
            use_bias=bias is not None,
            kernel_init=(lambda *_: kernel) if kernel_init is None else kernel_init,
            bias_init=lambda *_: bias,
            rngs=nnx.Rngs(0),
            **layer_kwargs,
        )

    @classmethod
    def from_linear(cls, linear: nnx.Linear, *, impl: str = "auto", **format_params):
        """From an :class:`flax.nnx.Linear`: :meth:`from_kernel` on its kernel and bias,
        keeping its ``dtype``, ``param_dtype``, ``precision``, ``promote_dtype``,
        ``preferred_element_type`` and the metadata of its kernel and bias (sharding
        annotations included).

        Args:
          linear: the dense layer.
          impl: the matmul implementation of the new layer.
          **format_params: the subclass's ``from_kernel`` parameters (``sparsity`` and
            ``block_shape``; ``n`` and ``m``; ``nblocks``; ``rank`` ...).

        Returns:
          The new layer (``linear`` is left unchanged).

        Raises:
          ValueError: bad format parameters (from the subclass).

        Warns:
          UserWarning: ``linear`` has a custom ``dot_general``, which a sparse layer
          cannot use (its product is the sparse kernel).

        Example:
          >>> from flax import nnx
          >>> from jsparse.nn import BCSRLinear
          >>> linear = nnx.Linear(16, 8, precision="highest", rngs=nnx.Rngs(0))
          >>> layer = BCSRLinear.from_linear(linear, sparsity=0.5, block_shape=(4, 4))
          >>> layer.nse, layer.precision
          (4, 'highest')
        """
        if linear.dot_general is not jax.lax.dot_general:
            warnings.warn(
                f"{cls.__name__}.from_linear: the nnx.Linear's custom dot_general "
                f"{linear.dot_general!r} is not carried over (the product is the sparse "
                "kernel's)",
                UserWarning,
                stacklevel=2,
            )
        return cls.from_kernel(
            linear.kernel[...],
            linear.bias[...] if linear.bias is not None else None,
            dtype=linear.dtype,
            param_dtype=linear.param_dtype,
            precision=linear.precision,
            promote_dtype=linear.promote_dtype,
            preferred_element_type=linear.preferred_element_type,
            kernel_metadata=linear.kernel.get_metadata(),
            bias_metadata=linear.bias.get_metadata() if linear.bias is not None else {},
            impl=impl,
            **format_params,
        )

    # ------------------------------------------------------------ the kernel
    def _install_kernel(self, w: AbstractSparseMatrix) -> None:
        """Create the ``kernel_<leaf>`` variables holding ``w``'s leaves."""
        self._check_kernel_shape(w)
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(w)
        names = tuple("kernel_" + _key_name(path) for path, _ in with_paths)
        self._kernel_treedef = treedef
        self._kernel_leaf_names = names
        for name, (path, leaf) in zip(names, with_paths, strict=True):
            is_value = jnp.issubdtype(leaf.dtype, jnp.inexact)
            variable_type = nnx.Param if is_value else SparsityPattern
            setattr(self, name, variable_type(leaf, **self._leaf_metadata(_key_name(path), leaf)))

    def _check_kernel_shape(self, w: AbstractSparseMatrix) -> None:
        if tuple(w.shape) != (self.in_features, self.out_features):
            raise ValueError(
                f"{type(self).__name__}: kernel shape {tuple(w.shape)} is not "
                f"(in_features, out_features) = ({self.in_features}, {self.out_features})"
            )

    def set_kernel(self, w: AbstractSparseMatrix, *, resize: bool = False) -> None:
        """Replace the kernel in place by ``w``, a format of the same type, shape and
        static configuration whose leaves have the shapes of the current ones (a new
        BCSR pattern with as many blocks, new N:M positions ...).

        Each ``kernel_<leaf>`` variable is updated with ``set_value`` (its metadata
        is kept), so this works inside ``nnx.jit`` and does not recompile. Stored
        values are cast to the variable's dtype; index arrays must match exactly.

        Args:
          w: the new kernel (BCSR's derived index leaves come from its constructor:
            build it with ``BCSR.from_positions`` or ``BCSR(...)``).
          resize: allow leaves of other shapes (a BCSR with fewer stored blocks, as
            gradual magnitude pruning makes); a jitted step then traces anew.

        Raises:
          TypeError: ``w`` is another format, or an index leaf has another dtype.
          ValueError: another shape or static configuration, or a leaf of another
            shape (nothing is changed then).

        Example:
          >>> import jax.numpy as jnp
          >>> from flax import nnx
          >>> import jsparse
          >>> from jsparse.nn import BCSRLinear
          >>> layer = BCSRLinear(8, 8, sparsity=0.5, block_shape=(4, 4), rngs=nnx.Rngs(0))
          >>> w = jsparse.BCSR.from_positions(jnp.ones((2, 4, 4)), jnp.array([0, 1]),
          ...                                 jnp.array([1, 0]), shape=(8, 8))
          >>> layer.set_kernel(w)
          >>> layer.kernel_indices[...].tolist(), float(layer.dense_kernel()[0, 4])
          ([1, 0], 1.0)
        """
        name = type(self).__name__
        current = self.kernel
        if type(w) is not type(current):
            raise TypeError(
                f"{name}.set_kernel: the kernel is a {type(current).__name__}, got a "
                f"{type(w).__name__}"
            )
        self._check_kernel_shape(w)
        leaves, treedef = jax.tree_util.tree_flatten(w)
        if treedef != self._kernel_treedef:
            raise ValueError(
                f"{name}.set_kernel: the new kernel's static configuration differs from "
                f"the current one: {w!r} vs {current!r}"
            )
        new = []
        for var_name, leaf in zip(self._kernel_leaf_names, leaves, strict=True):
            variable = getattr(self, var_name)
            old = variable[...]
            if not resize and tuple(leaf.shape) != tuple(old.shape):
                raise ValueError(
                    f"{name}.set_kernel: {var_name} has shape {tuple(old.shape)}, the new "
                    f"kernel's has {tuple(leaf.shape)}"
                )
            if isinstance(variable, nnx.Param):
                leaf = jnp.asarray(leaf).astype(old.dtype)
            elif leaf.dtype != old.dtype:
                raise TypeError(
                    f"{name}.set_kernel: index array {var_name} is {jnp.dtype(old.dtype).name}, "
                    f"the new kernel's is {jnp.dtype(leaf.dtype).name}"
                )
            new.append((variable, leaf))
        for variable, leaf in new:
            variable.set_value(leaf)

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
        """The dense ``(in_features, out_features)`` kernel, in ``param_dtype``."""
        return self.kernel.todense()

    def to_linear(self) -> nnx.Linear:
        """An :class:`flax.nnx.Linear` computing the same function: the dense kernel,
        the bias, and this layer's ``dtype``, ``param_dtype``, ``precision``,
        ``promote_dtype``, ``preferred_element_type``, ``kernel_metadata`` and
        ``bias_metadata``.

        Returns:
          A new ``nnx.Linear`` (this layer is unchanged).

        Example:
          >>> from flax import nnx
          >>> from jsparse.nn import MonarchLinear
          >>> layer = MonarchLinear(16, 16, nblocks=4, precision="highest", rngs=nnx.Rngs(0))
          >>> linear = layer.to_linear()
          >>> type(linear).__name__, linear.precision, linear.kernel.shape
          ('Linear', 'highest', (16, 16))
        """
        kernel = self.dense_kernel()
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
            promote_dtype=self.promote_dtype,
            preferred_element_type=self.preferred_element_type,
            rngs=nnx.Rngs(0),
            kernel_metadata=self.kernel_metadata,
            bias_metadata=self.bias_metadata,
        )

    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``inputs @ W + b`` over the last axis of ``inputs``.

        Args:
          inputs: ``(..., in_features)``.

        Returns:
          ``(..., out_features)`` in the promoted dtype (or ``preferred_element_type``).
        """
        w = self.kernel
        bias = self.bias[...] if self.bias is not None else None
        # The format stands in for the kernel as a 0-d array of its dtype.
        inputs, kernel_stand_in, bias = self.promote_dtype(
            (inputs, jnp.zeros((), w.dtype), bias), dtype=self.dtype
        )
        if w.dtype != kernel_stand_in.dtype:
            w = w.astype(kernel_stand_in.dtype)
        y = verbs.matmul(inputs, w, impl=self.impl)
        probe = probe_for(self)
        if probe is not None:
            y = y + jnp.matmul(inputs, probe.astype(y.dtype), precision=self.precision)
        if self.preferred_element_type is not None:
            y = y.astype(self.preferred_element_type)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def _unwrap(value) -> tuple[Any, dict[str, Any]]:
    """``(array, metadata)`` from an initializer's output (``nnx.with_metadata`` /
    ``nnx.with_partitioning`` wrap it in a ``VariableMetadata``)."""
    if isinstance(value, nnx.VariableMetadata):
        return value.raw_value, dict(value.metadata)
    return value, {}


def _plain_initializer(init: nnx.Initializer, metadata: dict[str, Any]) -> nnx.Initializer:
    """``init`` returning plain arrays of the requested shape and dtype; the metadata
    of a ``VariableMetadata`` output is collected into ``metadata``."""

    def plain(key, shape, dtype):
        value, drawn = _unwrap(init(key, shape, dtype))
        metadata.update(drawn)
        value = jnp.asarray(value, dtype)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"kernel_init returned shape {tuple(value.shape)}, expected {shape}")
        return value

    return plain


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
