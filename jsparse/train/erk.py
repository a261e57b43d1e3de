"""Erdős–Rényi-Kernel (ERK) layer-wise sparsity allocation (Evci et al., 2020)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jsparse.nn import linear_layers, linear_shape, path_str

__all__ = ["erk", "erk_sparsities"]


def erk_sparsities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    *,
    power: float = 1.0,
    dense: Sequence[str] = (),
) -> dict[str, float]:
    """Per-layer sparsities whose total equals ``sparsity``, each layer's density
    proportional to ``(sum(shape) / prod(shape)) ** power`` (ERK; for 2-D kernels this
    is Erdős–Rényi: ``(n_in + n_out) / (n_in * n_out)``).

    The dense-overflow rule (RigL's): a layer whose density would exceed 1 is made
    dense (sparsity 0) and the budget is shared again among the others, until none
    overflows. So small layers (a first layer with few inputs, a classifier head)
    usually end up dense.

    Args:
      shapes: layer name -> kernel shape.
      sparsity: the overall target in ``[0, 1)``: ``sum(density_i * size_i) ==
        (1 - sparsity) * sum(size_i)``.
      power: the ERK exponent (1 = ERK; 0 = uniform).
      dense: names of layers kept dense by choice.

    Returns:
      name -> sparsity in ``[0, 1)``.

    Raises:
      ValueError: ``sparsity`` outside ``[0, 1)``, empty ``shapes``, unknown names in
        ``dense``, or a budget the non-dense layers cannot meet.

    Example:
      >>> s = erk_sparsities({"in": (64, 2048), "hidden": (2048, 2048), "out": (2048, 10)}, 0.9)
      >>> s["in"], s["out"], round(s["hidden"], 4)
      (0.0, 0.0, 0.9325)
    """
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not shapes:
        raise ValueError("erk_sparsities: no layer shapes given")
    unknown = set(dense) - set(shapes)
    if unknown:
        raise ValueError(f"erk_sparsities: dense names {sorted(unknown)} are not layers")
    sizes = {name: float(np.prod(shape)) for name, shape in shapes.items()}
    raw = {name: (float(np.sum(shape)) / sizes[name]) ** power for name, shape in shapes.items()}
    dense_set = set(dense)
    total = sum(sizes.values())
    while True:
        sparse_names = [n for n in shapes if n not in dense_set]
        budget = (1.0 - sparsity) * total - sum(sizes[n] for n in dense_set)
        if not sparse_names:
            if budget < -1e-9 * total:
                raise ValueError("erk_sparsities: the dense layers exceed the budget")
            break
        if budget < 0:
            raise ValueError(
                f"erk_sparsities: the layers kept dense ({sorted(dense_set)}) exceed the "
                f"budget of a {sparsity} sparse model"
            )
        eps = budget / sum(raw[n] * sizes[n] for n in sparse_names)
        max_raw = max(raw[n] for n in sparse_names)
        if eps * max_raw <= 1.0:
            break
        dense_set.update(n for n in sparse_names if raw[n] == max_raw)
    out = {}
    for name in shapes:
        density = 1.0 if name in dense_set else eps * raw[name]
        out[name] = float(min(max(1.0 - density, 0.0), 1.0 - 1e-12))
    return out


def erk(
    model,
    sparsity: float,
    *,
    filter: Any = ...,  # noqa: A002
    power: float = 1.0,
    block_shape: Sequence[int] | None = None,
) -> dict[str, float]:
    """:func:`erk_sparsities` for the linear layers of ``model`` that ``filter`` selects
    (those :func:`jsparse.nn.sparsify` considers: ``nnx.Linear`` and
    ``nnx.LinearGeneral``, stacked or not), keyed by path string, ready for
    ``jsparse.nn.sparsify(model, format="bcsr", sparsity=erk(model, 0.9))``.

    A layer ``sparsify`` cannot convert (:func:`jsparse.nn.linear_shape`) and, with
    ``block_shape``, a layer whose (flattened) kernel the block shape does not divide
    gets sparsity 0: it is counted as dense and the budget is shared among the
    others. So ``filter=lambda path, layer: s[path_str(path)] > 0`` in ``sparsify``
    selects exactly the layers that can and should be sparse. An ``nnx.LinearGeneral``
    counts as its flattened ``(prod(in), prod(out))`` kernel, a stack of ``L`` layers
    (``nnx.vmap``) as ``L`` layers sharing one sparsity.

    Args:
      model: an NNX module.
      sparsity: the overall target in ``[0, 1)``.
      filter: an NNX filter of ``(path, layer)`` choosing the layers.
      power: the ERK exponent (1 = ERK; 0 = uniform).
      block_shape: ``(bm, bn)`` of the BCSR layers to make, or ``None`` (any shape).

    Returns:
      layer path string (``"layers/0"``) -> sparsity in ``[0, 1)``.

    Raises:
      ValueError: the filter selects no layer, or as :func:`erk_sparsities` (e.g. the
        layers that must stay dense exceed the budget).

    Example:
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(4, 256, rngs=nnx.Rngs(0)),
      ...                        nnx.Linear(256, 256, rngs=nnx.Rngs(1)))
      >>> {name: round(s, 4) for name, s in erk(model, 0.5).items()}
      {'layers/0': 0.0, 'layers/1': 0.5078}
      >>> head = nnx.Sequential(nnx.Linear(256, 256, rngs=nnx.Rngs(0)),
      ...                       nnx.Linear(256, 10, rngs=nnx.Rngs(1)))
      >>> {name: round(s, 4) for name, s in erk(head, 0.5, block_shape=(32, 32)).items()}
      {'layers/0': 0.5195, 'layers/1': 0.0}
    """
    shapes: dict[str, tuple[int, ...]] = {}
    dense: list[str] = []
    first: dict[str, str] = {}
    for path, layer in linear_layers(model, filter=filter):
        name = path_str(path)
        try:
            stack, shape = linear_shape(layer)
            eligible = True
        except ValueError:
            stack, shape = (), (int(np.size(layer.kernel[...])), 1)
            eligible = False
        if eligible and block_shape is not None:
            bm, bn = (int(b) for b in block_shape)
            eligible = shape[0] % bm == 0 and shape[1] % bn == 0
        copies = [name] if not stack else [f"{name}#{i}" for i in range(math.prod(stack))]
        for copy in copies:
            shapes[copy] = shape
            if not eligible:
                dense.append(copy)
        first[name] = copies[0]
    if not shapes:
        raise ValueError(
            f"erk: the filter {filter!r} selects no nnx.Linear or nnx.LinearGeneral layer"
        )
    out = erk_sparsities(shapes, sparsity, power=power, dense=dense)
    return {name: out[copy] for name, copy in first.items()}
