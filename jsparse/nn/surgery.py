"""Model surgery: swap ``nnx.Linear`` layers for sparse ones (:func:`sparsify`) and back
(:func:`densify`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flax import nnx

from jsparse.nn._format_linear import FormatLinear

__all__ = ["FORMATS", "densify", "path_str", "sparse_layers", "sparsify"]

Path = tuple[Any, ...]


def _bcsr(linear, **params):
    from jsparse.nn.sparse_linear import SparseLinear

    return SparseLinear.from_linear(linear, **params)


def _nm(linear, **params):
    from jsparse.nn.nm_linear import NMLinear

    return NMLinear.from_linear(linear, **params)


def _monarch(linear, **params):
    from jsparse.nn.monarch_linear import MonarchLinear

    return MonarchLinear.from_linear(linear, **params)


def _lowrank(linear, **params):
    from jsparse.nn.lowrank_linear import LowRankSparseLinear

    return LowRankSparseLinear.from_linear(linear, **params)


#: ``format`` name -> ``convert(linear, **format_params)`` used by :func:`sparsify`.
FORMATS: dict[str, Callable[..., nnx.Module]] = {
    "bcsr": _bcsr,
    "nm": _nm,
    "monarch": _monarch,
    "lowrank": _lowrank,
}


def path_str(path: Path) -> str:
    """A graph path as the ``"a/b/0"`` string used for per-layer parameters."""
    return "/".join(str(p) for p in path)


def sparsify(model, *, format: str, filter: Any = ..., **format_params):  # noqa: A002
    """Replace the :class:`flax.nnx.Linear` layers of ``model`` that ``filter`` selects
    with sparse layers initialised from their kernels; biases are kept, other layers
    are left alone.

    ``"bcsr"`` keeps the blocks with the largest L2 norm (one-shot magnitude pruning),
    ``"nm"`` the ``n`` largest of every ``m`` along the input axis, ``"monarch"`` is
    the Monarch projection and ``"lowrank"`` the low-rank + sparse split.

    Args:
      model: an NNX module (modified in place), or a single ``nnx.Linear``.
      format: ``"bcsr"`` (:class:`SparseLinear`), ``"nm"`` (``NMLinear``),
        ``"monarch"`` (``MonarchLinear``) or ``"lowrank"`` (``LowRankSparseLinear``).
      filter: an NNX filter called with ``(path, layer)`` for every ``nnx.Linear``
        (a type, a predicate, ``...`` for all ...). Default: every ``nnx.Linear``.
      **format_params: the layer's parameters (``sparsity=0.9, block_shape=(32, 32)``;
        ``n=2, m=4``; ``nblocks=4`` ...). A mapping value is per layer, keyed by the
        layer's path string (``"layers/0"``), e.g. ``sparsity=jsparse.train.erk(...)``.

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
      ('SparseLinear', 'Linear')
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    convert = FORMATS[format]
    predicate = nnx.filterlib.to_predicate(filter)
    selected = [
        (path, layer)
        for path, layer in _modules(model)
        if type(layer) is nnx.Linear and predicate(path, layer)
    ]
    if not selected:
        warnings.warn(
            f"sparsify: the filter {filter!r} selects no nnx.Linear layer; the model is unchanged",
            UserWarning,
            stacklevel=2,
        )
        return model
    for path, layer in selected:
        params = {k: _per_layer(k, v, path) for k, v in format_params.items()}
        model = _replace(model, path, convert(layer, **params))
    return model


def densify(model, *, filter: Any = ...):  # noqa: A002
    """Replace the jsparse layers of ``model`` (every layer with a ``to_linear``
    method: :class:`SparseLinear`, ``NMLinear`` ...) selected by ``filter`` with
    :class:`flax.nnx.Linear` layers computing the same function.

    Args:
      model: an NNX module (modified in place), or a single sparse layer.
      filter: an NNX filter called with ``(path, layer)``. Default: all.

    Returns:
      The model (the new layer when ``model`` itself is a sparse layer).

    Warns:
      UserWarning: no sparse layer is selected.
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
        model = _replace(model, path, layer.to_linear())
    return model


def sparse_layers(model, filter: Any = ...) -> list[tuple[Path, FormatLinear]]:  # noqa: A002
    """The ``(path, layer)`` pairs of the :class:`FormatLinear` layers of ``model``."""
    predicate = nnx.filterlib.to_predicate(filter)
    return [
        (path, layer)
        for path, layer in _modules(model)
        if isinstance(layer, FormatLinear) and predicate(path, layer)
    ]


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


def _replace(model, path: Path, new):
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


def _child(node, key):
    if isinstance(node, nnx.List | nnx.Dict | list | dict | tuple):
        return node[key]
    return getattr(node, key)
