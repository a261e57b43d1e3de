"""Model surgery: swap ``nnx.Linear`` layers for jsparse layers (:func:`sparsify`) and
back (:func:`densify`), and the helpers to find and replace layers in a model.

:func:`sparsify` looks the layer class up in :data:`~jsparse.nn.FORMATS`, which
every :class:`~jsparse.nn.FormatLinear` subclass joins by declaring ``format_name``:
adding a format's layer does not touch this file.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsparse.nn.format_linear import FORMATS, FormatLinear
from jsparse.nn.linear_general import FormatLinearGeneral, general_flat_shape

__all__ = [
    "densify",
    "iter_linears",
    "linear_layers",
    "linear_shape",
    "path_str",
    "replace_module",
    "sparse_layers",
    "sparsify",
]

Path = tuple[Any, ...]


def path_str(path: Path) -> str:
    """A graph path as the ``"a/b/0"`` string used for per-layer parameters.

    Example:
      >>> from jsparse.nn import path_str
      >>> path_str(("layers", 0))
      'layers/0'
    """
    return "/".join(str(p) for p in path)


def iter_linears(model, filter: Any = ...) -> list[tuple[Path, nnx.Linear]]:  # noqa: A002
    """The ``(path, layer)`` pairs of the :class:`flax.nnx.Linear` layers of ``model``
    (exactly ``nnx.Linear``, not subclasses) that ``filter`` selects, in graph order.

    Args:
      model: an NNX module (``model`` itself is included, with path ``()``).
      filter: an NNX filter called with ``(path, layer)`` (a type, a predicate,
        ``...`` for all ...).

    Returns:
      A list of ``(path, layer)``; ``path`` is a tuple of attribute names and indices.

    Example:
      >>> from flax import nnx
      >>> from jsparse.nn import iter_linears
      >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> [path for path, _ in iter_linears(model)]
      [('layers', 0), ('layers', 2)]
    """
    predicate = nnx.filterlib.to_predicate(filter)
    return [
        (path, layer)
        for path, layer in _modules(model)
        if type(layer) is nnx.Linear and predicate(path, layer)
    ]


def sparse_layers(model, filter: Any = ...) -> list[tuple[Path, FormatLinear]]:  # noqa: A002
    """The ``(path, layer)`` pairs of the :class:`~jsparse.nn.FormatLinear` layers of
    ``model`` that ``filter`` selects, in graph order.

    Args:
      model: an NNX module (``model`` itself is included, with path ``()``).
      filter: an NNX filter called with ``(path, layer)``.

    Returns:
      A list of ``(path, layer)``.

    Example:
      >>> from flax import nnx
      >>> from jsparse.nn import NMLinear, sparse_layers
      >>> model = nnx.Sequential(NMLinear(8, 8, rngs=nnx.Rngs(0)),
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> [(path, type(layer).__name__) for path, layer in sparse_layers(model)]
      [(('layers', 0), 'NMLinear')]
    """
    predicate = nnx.filterlib.to_predicate(filter)
    return [
        (path, layer)
        for path, layer in _modules(model)
        if isinstance(layer, FormatLinear) and predicate(path, layer)
    ]


def kernel_density(model) -> float:
    """Stored kernel values over dense kernel entries, over every ``nnx.Linear`` and
    jsparse layer of ``model`` (biases and other parameters are not counted).

    Raises:
      ValueError: ``model`` has no linear layer.

    Example:
      >>> from flax import nnx
      >>> import jsparse
      >>> model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)),
      ...                        jsparse.nn.NMLinear(8, 8, n=2, m=4, rngs=nnx.Rngs(0)))
      >>> jsparse.nn.kernel_density(model)  # 64 dense + 32 stored of 64
      0.75
    """
    stored = dense = 0
    for _, layer in nnx.iter_graph(model):
        if isinstance(layer, nnx.Linear):
            stored += layer.kernel.size
            dense += layer.kernel.size
        elif isinstance(layer, FormatLinear):
            values = layer.kernel_variables.values()
            stored += sum(v[...].size for v in values if isinstance(v, nnx.Param))
            dense += layer.in_features * layer.out_features
    if not dense:
        raise ValueError(f"{type(model).__name__} has no linear layer")
    return stored / dense


def linear_layers(model, filter: Any = ...) -> list[tuple[Path, nnx.Module]]:  # noqa: A002
    """The ``(path, layer)`` pairs of the dense linear layers :func:`sparsify` considers:
    :class:`flax.nnx.Linear` and :class:`flax.nnx.LinearGeneral` (exactly these
    types; stacked by ``nnx.vmap`` or not) that ``filter`` selects, in graph order.
    Whether each can be converted is :func:`linear_shape`'s answer.

    Args:
      model: an NNX module (``model`` itself is included, with path ``()``).
      filter: an NNX filter called with ``(path, layer)``.

    Returns:
      A list of ``(path, layer)``.

    Example:
      >>> from flax import nnx
      >>> from jsparse.nn import linear_layers
      >>> attention = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
      ...                                    rngs=nnx.Rngs(0))
      >>> [path for path, _ in linear_layers(attention)]
      [('key',), ('out',), ('query',), ('value',)]
    """
    predicate = nnx.filterlib.to_predicate(filter)
    return [
        (path, layer)
        for path, layer in _modules(model)
        if type(layer) in (nnx.Linear, nnx.LinearGeneral) and predicate(path, layer)
    ]


def linear_shape(layer: nnx.Module) -> tuple[tuple[int, ...], tuple[int, int]]:
    """``(stack_shape, (in, out))``: how :func:`sparsify` sees a dense linear layer:
    ``stack_shape`` is ``()`` for one layer and ``(L, ...)`` for layers stacked by
    ``nnx.vmap`` (kernel ``(L, in, out)``), each of which becomes an ``(in, out)``
    jsparse kernel; an ``nnx.LinearGeneral``'s kernel is flattened to
    ``(prod(in_features), prod(out_features))``.

    Args:
      layer: an :class:`flax.nnx.Linear` or :class:`flax.nnx.LinearGeneral`.

    Returns:
      ``(stack_shape, (in, out))``.

    Raises:
      ValueError: the layer cannot be converted; the message says why (another
        type, a ``LinearGeneral`` with ``batch_axis`` or a sharding spec that
        flattening would not keep).

    Example:
      >>> from flax import nnx
      >>> from jsparse.nn import linear_shape
      >>> linear_shape(nnx.LinearGeneral((2, 8), 4, axis=(-2, -1), rngs=nnx.Rngs(0)))
      ((), (16, 4))
    """
    if type(layer) is nnx.Linear:
        shape = tuple(layer.kernel[...].shape)
        return shape[:-2], (int(shape[-2]), int(shape[-1]))
    if type(layer) is nnx.LinearGeneral:
        flat = general_flat_shape(layer)
        ndim = len(layer.batch_axis) + len(layer.in_features) + len(layer.out_features)
        shape = tuple(layer.kernel[...].shape)
        return shape[: len(shape) - ndim], flat
    raise ValueError(f"it is a {type(layer).__name__}, not an nnx.Linear or nnx.LinearGeneral")


def replace_module(model, path: Path, new):
    """Put ``new`` at ``path`` in ``model`` (in place).

    Args:
      model: an NNX module.
      path: a path from :func:`iter_linears` / :func:`sparse_layers` (attribute
        names, and keys or indices inside ``nnx.List`` / ``nnx.Dict`` / lists /
        dicts).
      new: the module to put there.

    Returns:
      ``model``, or ``new`` when ``path`` is ``()`` (``model`` itself is replaced).

    Raises:
      AttributeError / KeyError / IndexError: ``path`` does not lead to a child.

    Example:
      >>> from flax import nnx
      >>> from jsparse.nn import replace_module
      >>> model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
      >>> model = replace_module(model, ("layers", 0), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
      >>> model.layers[0].out_features
      2
    """
    if not path:
        return new
    parent = model
    for key in path[:-1]:
        parent = _child(parent, key)
    key = path[-1]
    if isinstance(parent, nnx.List | nnx.Dict | list | dict):
        parent[key] = new
    else:
        setattr(parent, key, new)
    return model


def sparsify(model, *, format: str, filter: Any = ..., **format_params):  # noqa: A002
    """Replace the :class:`flax.nnx.Linear` and :class:`flax.nnx.LinearGeneral` layers
    of ``model`` that ``filter`` selects (:func:`linear_layers`) with jsparse layers
    initialised from their kernels (``Layer.from_linear``: biases, dtypes, precision
    and kernel/bias metadata are kept); other layers are left alone.

    An ``nnx.LinearGeneral`` without ``batch_axis`` (the projections of
    ``nnx.MultiHeadAttention``) becomes a :class:`~jsparse.nn.FormatLinearGeneral`:
    its kernel flattened to ``(prod(in_features), prod(out_features))``, with its input
    and output shapes. Layers stacked by ``nnx.vmap`` (kernel ``(L, in, out)``, run by
    ``nnx.scan``) become one jsparse layer whose variables have the leading ``L`` axis:
    each slice is converted alone (its own pattern, the same number of stored values).
    Selected layers that cannot be converted (:func:`linear_shape` says why) are left
    dense with one warning naming each.

    ``"bcsr"`` keeps the blocks with the largest L2 norm (one-shot magnitude pruning),
    ``"nm"`` the ``n`` largest of every ``m`` along the input axis, ``"monarch"`` is
    the Monarch projection and ``"lowrank"`` the low-rank + sparse split.

    Args:
      model: an NNX module (modified in place), or a single ``nnx.Linear``.
      format: a key of :data:`~jsparse.nn.FORMATS`: ``"bcsr"``
        (:class:`~jsparse.nn.BCSRLinear`), ``"nm"`` (``NMLinear``), ``"monarch"``
        (``MonarchLinear``), ``"lowrank"`` (``LowRankSparseLinear``), or the
        ``format_name`` of any other registered layer.
      filter: an NNX filter called with ``(path, layer)`` for every ``nnx.Linear`` and
        ``nnx.LinearGeneral`` (a type, a predicate, ``...`` for all ...; a stacked
        layer is seen once, with its stacked kernel). Default: all of them.
      **format_params: the layer's ``from_kernel`` parameters (``sparsity=0.9,
        block_shape=(32, 32)``; ``n=2, m=4``; ``nblocks=4`` ...) and ``impl``. A
        mapping value is per layer, keyed by the layer's path string (``"layers/0"``),
        e.g. ``sparsity=jsparse.train.erk(...)``.

    Returns:
      The model (the new layer when ``model`` itself is an ``nnx.Linear``).

    Raises:
      ValueError: unknown ``format``, or bad layer parameters (from the layer).
      KeyError: a per-layer mapping lacks a selected layer's path.

    Warns:
      UserWarning: ``filter`` selects no ``nnx.Linear`` / ``nnx.LinearGeneral`` layer
      (the model is unchanged), or some selected layers cannot be converted (each is
      named, with the reason).

    Example:
      >>> from flax import nnx
      >>> import jsparse
      >>> model = nnx.Sequential(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(64, 10, rngs=nnx.Rngs(1)))
      >>> model = jsparse.nn.sparsify(model, format="bcsr", sparsity=0.75,
      ...                             block_shape=(16, 16),
      ...                             filter=lambda path, layer: layer.out_features == 64)
      >>> type(model.layers[0]).__name__, type(model.layers[2]).__name__
      ('BCSRLinear', 'Linear')
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    layer_type = FORMATS[format]
    selected = linear_layers(model, filter)
    if not selected:
        warnings.warn(
            f"sparsify: the filter {filter!r} selects no nnx.Linear or nnx.LinearGeneral "
            "layer; the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
        return model
    skipped = []
    for path, layer in selected:
        try:
            stack, _ = linear_shape(layer)
        except ValueError as e:
            skipped.append(f"{path_str(path) or '<the model>'} ({type(layer).__name__}: {e})")
            continue
        params = {k: _per_layer(k, v, path) for k, v in format_params.items()}
        if stack:
            new = _stack_modules(
                [_convert(_slice_module(layer, i), layer_type, params) for i in np.ndindex(stack)],
                stack,
            )
        else:
            new = _convert(layer, layer_type, params)
        model = replace_module(model, path, new)
    if skipped:
        warnings.warn(
            "sparsify: left dense, cannot be converted: " + "; ".join(skipped),
            UserWarning,
            stacklevel=2,
        )
    return model


def densify(model, *, filter: Any = ...):  # noqa: A002
    """Replace the jsparse layers of ``model`` (every layer with a ``to_linear``
    method: the :class:`~jsparse.nn.FormatLinear` layers and
    :class:`~jsparse.nn.SRSTELinear`) selected by ``filter`` with
    :class:`flax.nnx.Linear` layers computing the same function (dtypes, precision
    and metadata kept).

    Args:
      model: an NNX module (modified in place), or a single sparse layer.
      filter: an NNX filter called with ``(path, layer)``. Default: all.

    Returns:
      The model (the new layer when ``model`` itself is a sparse layer).

    Warns:
      UserWarning: no sparse layer is selected.

    Example:
      >>> from flax import nnx
      >>> import jsparse
      >>> layer = jsparse.nn.MonarchLinear(16, 16, nblocks=4, rngs=nnx.Rngs(0))
      >>> type(jsparse.nn.densify(layer)).__name__
      'Linear'
    """
    predicate = nnx.filterlib.to_predicate(filter)
    selected = [
        (path, layer)
        for path, layer in _modules(model)
        if _is_sparse_layer(layer) and predicate(path, layer)
    ]
    # A FormatLinearGeneral's jsparse layer goes with it.
    paths = {path for path, _ in selected}
    selected = [
        (path, layer)
        for path, layer in selected
        if not any(path[:i] in paths for i in range(len(path)))
    ]
    if not selected:
        warnings.warn(
            f"densify: the filter {filter!r} selects no sparse layer; the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
        return model
    for path, layer in selected:
        stack = _sparse_stack_shape(layer)
        if stack:
            new = _stack_modules(
                [_slice_module(layer, i).to_linear() for i in np.ndindex(stack)], stack
            )
        else:
            new = layer.to_linear()
        model = replace_module(model, path, new)
    return model


# ------------------------------------------------------------------ helpers
def _convert(layer, layer_type: type[FormatLinear], params: dict[str, Any]) -> nnx.Module:
    """One (unstacked) ``nnx.Linear`` / ``nnx.LinearGeneral`` as a jsparse layer."""
    if type(layer) is nnx.LinearGeneral:
        if layer.dot_general is not None or layer.dot_general_cls is not None:
            warnings.warn(
                "sparsify: the nnx.LinearGeneral's custom dot_general is not carried over "
                "(the product is the sparse kernel's)",
                UserWarning,
                stacklevel=3,
            )
        return FormatLinearGeneral.from_linear_general(layer, layer_type, **params)
    return layer_type.from_linear(layer, **params)


def _slice_module(module: nnx.Module, index: tuple[int, ...]) -> nnx.Module:
    """The layer at ``index`` of a module stacked by ``nnx.vmap`` (every variable
    indexed along its leading axes)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[index], state))


def _stack_modules(modules: list[nnx.Module], stack: tuple[int, ...]) -> nnx.Module:
    """One module whose variables stack those of ``modules`` (equal structure) along
    leading axes ``stack``: what ``nnx.vmap`` makes and ``nnx.scan`` runs."""
    splits = [nnx.split(m) for m in modules]
    graphdef = splits[0][0]
    if any(g != graphdef for g, _ in splits[1:]):
        raise ValueError(
            "sparsify/densify: the stacked layers do not convert to one structure "
            "(e.g. different numbers of stored blocks), so they cannot be stacked"
        )
    try:
        state = jax.tree.map(
            lambda *xs: jnp.reshape(jnp.stack(xs), (*stack, *jnp.shape(xs[0]))),
            *[s for _, s in splits],
        )
    except ValueError as e:
        raise ValueError(
            f"sparsify/densify: the stacked layers do not convert to one structure: {e}"
        ) from None
    return nnx.merge(graphdef, state)


def _sparse_stack_shape(layer) -> tuple[int, ...]:
    """The leading stack axes of a jsparse layer stacked by :func:`sparsify` (or
    ``nnx.vmap``); ``()`` for one layer."""
    if isinstance(layer, FormatLinearGeneral):
        return _sparse_stack_shape(layer.layer)
    if isinstance(layer, FormatLinear):
        variables = layer.kernel_variables
        for name, axes in layer.kernel_leaf_axes.items():
            variable = variables.get("kernel_" + name)
            if variable is not None:
                shape = jnp.shape(variable[...])
                return tuple(shape[: len(shape) - len(axes)])
        if layer.bias is not None:
            return tuple(jnp.shape(layer.bias[...])[:-1])
        return ()
    kernel = getattr(layer, "kernel", None)
    if isinstance(kernel, nnx.Variable):
        return tuple(jnp.shape(kernel[...])[:-2])
    return ()


def _is_sparse_layer(layer) -> bool:
    return isinstance(layer, nnx.Module) and callable(getattr(layer, "to_linear", None))


def _modules(model) -> Iterator[tuple[Path, nnx.Module]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            yield tuple(path), node


def _per_layer(name: str, value, path: Path):
    if not isinstance(value, Mapping):
        return value
    key = path_str(path)
    if key not in value:
        raise KeyError(
            f"sparsify: the per-layer mapping {name}= has no entry for layer {key!r} "
            f"(it has {sorted(value)})"
        )
    return value[key]


def _child(node, key):
    if isinstance(node, nnx.List | nnx.Dict | list | dict | tuple):
        return node[key]
    return getattr(node, key)
