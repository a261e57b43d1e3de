"""Dynamic sparse training on the real BCSR representation: SET and RigL.

Every ``delta_t`` steps each :class:`~jsparse.nn.SparseLinear` drops the ``k``
stored blocks of smallest L2 norm and grows ``k`` new ones elsewhere — at random
(SET, Mocanu et al., 2018) or where the dense gradient is largest (RigL, Evci et al.,
2020). The number of stored blocks never changes, so the arrays keep their shapes and
a jitted update runs again without recompiling; ``k`` itself is a traced number
(``drop_fraction(step) * nse``), bounded by the static ``initial * nse``.

After an update the blocks are re-sorted into BCSR's canonical order (row-major,
strictly increasing block-columns within a row), the grown blocks hold zeros, and
their optimizer moments are reset (see :mod:`jsparse.train.opt_state`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jsparse.nn import _probe
from jsparse.nn.sparse_linear import SparseLinear
from jsparse.nn.surgery import _modules
from jsparse.train.opt_state import ValueRemap, remap_optimizer
from jsparse.train.schedules import CosineDropFraction

__all__ = ["SET", "RigL", "grow_and_drop"]


def grow_and_drop(
    data: jax.Array,
    indices: jax.Array,
    indptr: jax.Array,
    *,
    grid: tuple[int, int],
    k: jax.Array,
    k_max: int,
    grow_scores: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, ValueRemap]:
    """One drop-and-grow step on the arrays of a BCSR (pure; works under ``jit``).

    Drops the ``k`` stored blocks with the smallest L2 norm, grows the ``k`` blocks
    with the highest ``grow_scores`` among the positions not kept (a just-dropped
    position may come back, as in RigL, starting at zero), and re-sorts.

    Args:
      data, indices, indptr: the BCSR arrays (``nse`` stored blocks).
      grid: ``(block_rows, block_cols)``.
      k: the number of blocks to replace (traced int, ``0 <= k <= k_max``).
      k_max: a static upper bound for ``k`` (``<= nse``).
      grow_scores: ``(block_rows * block_cols,)`` float, one score per block position.

    Returns:
      ``(data, indices, indptr, remap)``: the new arrays, same shapes, and how the
      values moved (grown slots are ``remap.reset``).
    """
    nse = data.shape[0]
    nbr, nbc = grid
    nblocks = nbr * nbc
    k_max = int(min(k_max, nse))
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, k_max)
    rows = jnp.searchsorted(indptr, jnp.arange(nse, dtype=indptr.dtype), side="right") - 1
    pos = rows.astype(jnp.int32) * nbc + indices.astype(jnp.int32)

    norms = jnp.sum(jnp.square(data.astype(jnp.float32)), axis=(1, 2))
    weakest = jnp.argsort(norms, stable=True)[:k_max]  # slots, smallest norm first
    dropping = jnp.arange(k_max) < k
    # Slots to overwrite; out-of-range (nse / nblocks) marks "no-op" for mode="drop".
    drop_slots = jnp.where(dropping, weakest, nse)

    kept = jnp.zeros((nblocks,), bool).at[pos].set(True)
    kept = kept.at[jnp.where(dropping, pos[weakest], nblocks)].set(False, mode="drop")
    scores = jnp.where(kept, -jnp.inf, grow_scores.astype(jnp.float32))
    _, grown = jax.lax.top_k(scores, k_max)

    new_pos = pos.at[drop_slots].set(grown.astype(jnp.int32), mode="drop")
    is_new = jnp.zeros((nse,), bool).at[drop_slots].set(True, mode="drop")
    order = jnp.argsort(new_pos)
    new_pos, reset = new_pos[order], is_new[order]
    remap = ValueRemap(source=order, reset=reset, old_shape=tuple(data.shape))
    new_data = remap.apply(data)
    new_rows, new_cols = new_pos // nbc, new_pos % nbc
    counts = jnp.bincount(new_rows, length=nbr).astype(indptr.dtype)
    new_indptr = jnp.concatenate([jnp.zeros((1,), indptr.dtype), jnp.cumsum(counts)])
    return new_data, new_cols.astype(indices.dtype), new_indptr.astype(indptr.dtype), remap


@dataclasses.dataclass(frozen=True)
class _DynamicSparseTraining:
    total_steps: int
    delta_t: int = 100
    drop_fraction: float = 0.3
    stop_fraction: float = 0.75
    filter: Any = ...
    seed: int = 0

    def __post_init__(self):
        if int(self.total_steps) <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if not 0.0 < float(self.stop_fraction) <= 1.0:
            raise ValueError(f"stop_fraction must be in (0, 1], got {self.stop_fraction}")
        # Validates drop_fraction, delta_t and the end step.
        _ = self.schedule

    @property
    def end_step(self) -> int:
        """The last step at which the pattern may change (``stop_fraction * total_steps``)."""
        return max(1, int(self.stop_fraction * self.total_steps))

    @property
    def schedule(self) -> CosineDropFraction:
        """The drop fraction as a function of the step (cosine decay)."""
        return CosineDropFraction(self.drop_fraction, end_step=self.end_step, delta_t=self.delta_t)

    def is_update_step(self, step: int) -> bool:
        """Whether to call :meth:`update` after optimizer step number ``step``
        (counted from 1): every ``delta_t`` steps until ``stop_fraction`` of training."""
        return self.schedule.is_update_step(step)

    def layers(self, model) -> list[tuple[tuple, SparseLinear]]:
        """The layers this algorithm updates: ``SparseLinear`` layers selected by
        ``filter`` that are not fully dense."""
        predicate = nnx.filterlib.to_predicate(self.filter)
        out = []
        for path, layer in _modules(model):
            if isinstance(layer, SparseLinear) and predicate(path, layer):
                grid = _grid(layer)
                if layer.nse < grid[0] * grid[1]:
                    out.append((path, layer))
        return out

    def _grow_scores(self, model, layers, step, key, loss_fn, args) -> list[jax.Array]:
        raise NotImplementedError

    def _update(self, model, optimizer, step, loss_fn=None, args=()):
        layers = self.layers(model)
        if not layers:
            return {}
        key = jax.random.fold_in(jax.random.key(self.seed), jnp.asarray(step, jnp.int32))
        scores = self._grow_scores(model, layers, step, key, loss_fn, args)
        fraction = self.schedule(step)
        remaps, replaced = {}, {}
        for (path, layer), score in zip(layers, scores, strict=True):
            nse = layer.nse
            k = jnp.floor(fraction * nse).astype(jnp.int32)
            k_max = int(math.floor(self.drop_fraction * nse))
            data, indices, indptr, remap = grow_and_drop(
                layer.kernel_data[...],
                layer.kernel_indices[...],
                layer.kernel_indptr[...],
                grid=_grid(layer),
                k=k,
                k_max=k_max,
                grow_scores=score,
            )
            layer.kernel_data.set_value(data)
            layer.kernel_indices.set_value(indices)
            layer.kernel_indptr.set_value(indptr)
            remaps[(*path, "kernel_data")] = remap
            replaced["/".join(map(str, path))] = k
        if optimizer is not None:
            remap_optimizer(optimizer, remaps)
        return replaced


def _grid(layer: SparseLinear) -> tuple[int, int]:
    bm, bn = layer.block_shape
    return layer.in_features // bm, layer.out_features // bn


@dataclasses.dataclass(frozen=True)
class SET(_DynamicSparseTraining):
    """Sparse Evolutionary Training (Mocanu et al., 2018) on BCSR blocks: drop the
    smallest blocks, regrow as many at uniformly random free positions.

    Args:
      total_steps: the length of training in optimizer steps.
      delta_t: steps between pattern updates (default 100).
      drop_fraction: the initial fraction of stored blocks replaced (default 0.3),
        decayed with a cosine to 0 at ``stop_fraction`` of training.
      stop_fraction: the pattern is frozen after this fraction of training (0.75).
      filter: an NNX filter of ``(path, layer)`` choosing the ``SparseLinear``
        layers to update (default: all).
      seed: the random stream of regrowth (folded with the step).

    Use after the optimizer step::

      set_ = jsparse.train.SET(total_steps=T)
      update = nnx.jit(set_.update)
      for step in range(1, T + 1):
          train_step(model, optimizer, *batch)
          if set_.is_update_step(step):
              update(model, optimizer, jnp.asarray(step))
    """

    def update(self, model, optimizer: nnx.Optimizer | None, step) -> dict[str, jax.Array]:
        """Drop and regrow in place (the model's layers and the optimizer's moments).

        Pure JAX: call it eagerly or inside ``nnx.jit`` (pass ``step`` as an array to
        avoid a retrace per step). Returns the number of blocks replaced per layer.
        """
        return self._update(model, optimizer, step)

    def _grow_scores(self, model, layers, step, key, loss_fn, args):
        keys = jax.random.split(key, len(layers))
        return [
            jax.random.uniform(k, (_grid(layer)[0] * _grid(layer)[1],))
            for k, (_, layer) in zip(keys, layers, strict=True)
        ]


@dataclasses.dataclass(frozen=True)
class RigL(_DynamicSparseTraining):
    """RigL, "Rigging the Lottery" (Evci et al., 2020), on BCSR blocks: drop the
    smallest blocks, grow as many where the *dense* gradient has the largest block
    norm. The dense gradient is computed only in :meth:`update` (an extra forward and
    backward with a dense matmul per layer), never in ordinary steps.

    Defaults are the paper's: ``delta_t=100``, ``drop_fraction=0.3`` with cosine decay,
    stop at 75% of training. Pair it with ERK allocation
    (:func:`jsparse.train.erk`) when sparsifying the model.

    Args: as :class:`SET`.

    Use after the optimizer step, with the batch of that step::

      rigl = jsparse.train.RigL(total_steps=T)

      @nnx.jit
      def rigl_update(model, optimizer, step, x, y):
          rigl.update(model, optimizer, step, loss_fn, x, y)

      for step in range(1, T + 1):
          train_step(model, optimizer, x, y)
          if rigl.is_update_step(step):
              rigl_update(model, optimizer, jnp.asarray(step), x, y)
    """

    def update(
        self,
        model,
        optimizer: nnx.Optimizer | None,
        step,
        loss_fn: Callable[..., jax.Array],
        *args,
    ) -> dict[str, jax.Array]:
        """Drop and grow in place. ``loss_fn(model, *args)`` is the training loss (a
        scalar, or a tuple whose first item is the loss). Pure JAX (see
        :meth:`SET.update`). Returns the number of blocks replaced per layer."""
        return self._update(model, optimizer, step, loss_fn, args)

    def _grow_scores(self, model, layers, step, key, loss_fn, args):
        grads = dense_gradients(model, [layer for _, layer in layers], loss_fn, *args)
        scores = []
        for (_, layer), g in zip(layers, grads, strict=True):
            bm, bn = layer.block_shape
            nbr, nbc = _grid(layer)
            blocks = g.reshape(nbr, bm, nbc, bn)
            scores.append(jnp.sum(jnp.square(blocks.astype(jnp.float32)), axis=(1, 3)).ravel())
        return scores


def dense_gradients(model, layers, loss_fn, *args) -> list[jax.Array]:
    """The gradient of ``loss_fn(model, *args)`` with respect to the *dense* kernel of
    each sparse layer in ``layers`` (``(in_features, out_features)`` arrays)."""
    zeros = [jnp.zeros((layer.in_features, layer.out_features), jnp.float32) for layer in layers]

    def loss_of_probes(probes):
        with _probe.probing({id(layer): p for layer, p in zip(layers, probes, strict=True)}):
            out = loss_fn(model, *args)
        return out[0] if isinstance(out, tuple) else out

    return jax.grad(loss_of_probes)(zeros)
