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

from flax import nnx

from jsparse.nn.format_linear import FORMATS, FormatLinear

__all__ = [
    "densify",
    "iter_linears",
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
    """Replace the :class:`flax.nnx.Linear` layers of ``model`` that ``filter`` selects
    with jsparse layers initialised from their kernels (``Layer.from_linear``: biases,
    dtypes, precision and kernel/bias metadata are kept); other layers are left alone.

    ``"bcsr"`` keeps the blocks with the largest L2 norm (one-shot magnitude pruning),
    ``"nm"`` the ``n`` largest of every ``m`` along the input axis, ``"monarch"`` is
    the Monarch projection and ``"lowrank"`` the low-rank + sparse split.

    Args:
      model: an NNX module (modified in place), or a single ``nnx.Linear``.
      format: a key of :data:`~jsparse.nn.FORMATS`: ``"bcsr"``
        (:class:`~jsparse.nn.BCSRLinear`), ``"nm"`` (``NMLinear``), ``"monarch"``
        (``MonarchLinear``), ``"lowrank"`` (``LowRankSparseLinear``), or the
        ``format_name`` of any other registered layer.
      filter: an NNX filter called with ``(path, layer)`` for every ``nnx.Linear``
        (a type, a predicate, ``...`` for all ...). Default: every ``nnx.Linear``.
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
      UserWarning: ``filter`` selects no ``nnx.Linear`` layer (the model is unchanged).

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
    selected = iter_linears(model, filter)
    if not selected:
        warnings.warn(
            f"sparsify: the filter {filter!r} selects no nnx.Linear layer; the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
        return model
    for path, layer in selected:
        params = {k: _per_layer(k, v, path) for k, v in format_params.items()}
        model = replace_module(model, path, layer_type.from_linear(layer, **params))
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
    if not selected:
        warnings.warn(
            f"densify: the filter {filter!r} selects no sparse layer; the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
        return model
    for path, layer in selected:
        model = replace_module(model, path, layer.to_linear())
    return model


# ------------------------------------------------------------------ helpers
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
