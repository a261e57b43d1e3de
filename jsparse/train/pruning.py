"""Magnitude pruning: one-shot (per layer or global) and gradual (Zhu & Gupta).

Both work on blocks (``block_shape=(1, 1)`` is element-wise pruning) and produce
:class:`~jsparse.nn.SparseLinear` layers that store only the kept blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsparse.nn.sparse_linear import SparseLinear, block_count
from jsparse.nn.surgery import _modules, path_str, sparsify
from jsparse.train.opt_state import ValueRemap, remap_optimizer
from jsparse.train.schedules import CubicSparsitySchedule

__all__ = ["GradualMagnitudePruning", "magnitude_prune"]


def _block_norms(kernel: jax.Array, block_shape) -> np.ndarray:
    bm, bn = block_shape
    m, n = kernel.shape
    blocks = np.asarray(kernel, np.float32).reshape(m // bm, bm, n // bn, bn)
    return np.sqrt(np.sum(np.square(blocks), axis=(1, 3))).ravel()


def magnitude_prune(
    model,
    sparsity: float,
    *,
    block_shape: Sequence[int] = (1, 1),
    scope: str = "layer",
    filter: Any = ...,  # noqa: A002
):
    """One-shot magnitude pruning: replace the ``nnx.Linear`` layers that ``filter``
    selects by :class:`~jsparse.nn.SparseLinear` layers keeping the blocks of largest
    L2 norm.

    Args:
      model: an NNX module (modified in place and returned).
      sparsity: the fraction of blocks removed, in ``[0, 1)``.
      block_shape: the pruning granularity (``(1, 1)``: single weights).
      scope: ``"layer"`` (every layer at ``sparsity``) or ``"global"`` (one threshold
        on the block norms of all selected layers, so layers end with different
        sparsities; every layer keeps at least one block).
      filter: an NNX filter of ``(path, layer)``.

    Raises:
      ValueError: ``sparsity`` outside ``[0, 1)``, an unknown ``scope``, or a block
        shape that does not divide a layer.

    Warns:
      UserWarning: ``filter`` selects no layer.
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "layer":
        return sparsify(
            model, format="bcsr", filter=filter, sparsity=sparsity, block_shape=block_shape
        )
    predicate = nnx.filterlib.to_predicate(filter)
    layers = [
        (path, layer)
        for path, layer in _modules(model)
        if type(layer) is nnx.Linear and predicate(path, layer)
    ]
    if not layers:
        return sparsify(
            model, format="bcsr", filter=filter, sparsity=sparsity, block_shape=block_shape
        )
    norms = {}
    for path, layer in layers:
        block_count(layer.kernel.shape, block_shape, sparsity)  # validates
        norms[path_str(path)] = _block_norms(layer.kernel[...], block_shape)
    everything = np.concatenate(list(norms.values()))
    keep_total = max(1, round((1.0 - float(sparsity)) * everything.size))
    # The keep_total-th largest norm; ties broken by keeping the earlier layers' blocks.
    order = np.argsort(-everything, kind="stable")
    kept = np.zeros(everything.size, bool)
    kept[order[:keep_total]] = True
    per_layer, start = {}, 0
    for name, n in norms.items():
        count = max(1, int(kept[start : start + n.size].sum()))
        per_layer[name] = min(1.0 - count / n.size, np.nextafter(1.0, 0.0))
        start += n.size
    return sparsify(
        model, format="bcsr", filter=filter, sparsity=per_layer, block_shape=block_shape
    )


@dataclasses.dataclass(frozen=True)
class GradualMagnitudePruning:
    """Gradual magnitude pruning (Zhu & Gupta, 2017) of the ``SparseLinear`` layers of
    a model, following a :class:`CubicSparsitySchedule`.

    At each pruning step every selected layer keeps the ``round((1 - s(t)) * blocks)``
    blocks of largest L2 norm and **drops the others from storage**: the value array
    and the matching optimizer moments shrink. The training step therefore retraces
    once per pruning event (a new shape) and gets faster as the model gets sparser;
    between events nothing recompiles. Start from a dense-pattern model, e.g.
    ``jsparse.nn.sparsify(model, format="bcsr", sparsity=0.0, block_shape=(32, 32))``
    (dense-pattern layers run the dense matmul).

    Args:
      schedule: the target sparsity per step (Zhu & Gupta's cubic ramp; prune every
        ``schedule.frequency`` steps).
      filter: an NNX filter of ``(path, layer)`` choosing the layers (default: all).

    Example::

      gmp = GradualMagnitudePruning(CubicSparsitySchedule(0.9, begin_step=0, end_step=T // 2))
      for step in range(1, T + 1):
          train_step(model, optimizer, *batch)
          gmp.update(model, optimizer, step)   # eager; a no-op between pruning steps
    """

    schedule: CubicSparsitySchedule
    filter: Any = ...

    def update(self, model, optimizer: nnx.Optimizer | None, step: int) -> bool:
        """Prune if ``step`` (a Python int) is a pruning step. Eager (outside ``jit``):
        shapes change. Returns whether anything was pruned."""
        if not self.schedule.is_update_step(step):
            return False
        target = float(self.schedule(step))
        predicate = nnx.filterlib.to_predicate(self.filter)
        remaps, changed = {}, False
        for path, layer in _modules(model):
            if not (isinstance(layer, SparseLinear) and predicate(path, layer)):
                continue
            nse, grid = block_count(layer.kernel.shape, layer.block_shape, min(target, 0.999999))
            if nse >= layer.nse:
                continue
            remaps[(*path, "kernel_data")] = _shrink(layer, nse, grid)
            changed = True
        if optimizer is not None and remaps:
            remap_optimizer(optimizer, remaps)
        return changed


def _shrink(layer: SparseLinear, nse: int, grid) -> ValueRemap:
    data = layer.kernel_data[...]
    norms = jnp.sum(jnp.square(data.astype(jnp.float32)), axis=(1, 2))
    _, keep = jax.lax.top_k(norms, nse)
    keep = jnp.sort(keep)  # stored order is canonical, so a sorted subset is too
    rows = layer.kernel.row_ids[keep]
    counts = jnp.bincount(rows, length=grid[0]).astype(jnp.int32)
    remap = ValueRemap(source=keep, reset=None, old_shape=tuple(data.shape))
    layer.kernel_data.set_value(remap.apply(data))
    layer.kernel_indices.set_value(layer.kernel_indices[...][keep])
    layer.kernel_indptr.set_value(jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts)]))
    return remap
