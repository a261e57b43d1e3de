"""Dynamic sparse training on the real BCSR representation: SET and RigL.

Every ``delta_t`` steps each :class:`~jsparse.nn.BCSRLinear` drops the ``k``
stored blocks of smallest L2 norm and grows ``k`` new ones elsewhere — at random
(SET, Mocanu et al., 2018) or where the dense gradient is largest (RigL, Evci et al.,
2020). The number of stored blocks never changes, so the arrays keep their shapes and
a jitted update runs again without recompiling; ``k`` itself is a traced number
(``drop_fraction(step) * nse``), bounded by the static ``initial * nse``.

After an update the blocks are re-sorted into BCSR's canonical order (row-major,
strictly increasing block-columns within a row) and a new BCSR (with its derived CSC
view) is installed whole with ``layer.set_kernel``; the grown blocks hold zeros, and
their optimizer moments are reset (see :mod:`jsparse.train.opt_state`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jsparse.formats.bcsr import BCSR
from jsparse.nn import BCSRLinear, path_str, sparse_layers
from jsparse.nn.probe import probing
from jsparse.train.opt_state import ValueRemap, remap_optimizer
from jsparse.train.schedules import cosine_drop_fraction

__all__ = ["SET", "RigL", "dense_gradients", "grow_and_drop"]


def grow_and_drop(
    w: BCSR,
    *,
    k: jax.Array,
    k_max: int,
    grow_scores: jax.Array,
) -> tuple[BCSR, ValueRemap]:
    """One drop-and-grow step on a BCSR (pure; works under ``jit``).

    Drops the ``k`` stored blocks with the smallest L2 norm, grows the ``k`` blocks
    with the highest ``grow_scores`` among the positions not kept (a just-dropped
    position may come back, as in RigL, starting at zero), and re-sorts the blocks
    into canonical order.

    Args:
      w: the BCSR matrix (``nse`` stored blocks on a ``(block_rows, block_cols)`` grid).
      k: the number of blocks to replace (traced int, ``0 <= k <= k_max``).
      k_max: a static upper bound for ``k`` (``<= nse``).
      grow_scores: ``(block_rows * block_cols,)`` float, one score per block position
        (row-major).

    Returns:
      ``(new, remap)``: a BCSR of the same shape and ``nse`` (every leaf keeps its
      shape) and how the stored values moved (grown slots are ``remap.reset``).

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> w = jsparse.BCSR.fromdense(jnp.array([[1.0, 0.0], [0.0, 2.0]]))
      >>> new, remap = grow_and_drop(w, k=1, k_max=1, grow_scores=jnp.array([0.0, 5.0, 1.0, 0.0]))
      >>> new.todense().tolist(), remap.reset.tolist()
      ([[0.0, 0.0], [0.0, 2.0]], [True, False])
    """
    nse = w.nse
    (bm, bn), (m, n) = w.block_shape, w.shape
    nbr, nbc = m // bm, n // bn
    nblocks = nbr * nbc
    k_max = int(min(k_max, nse))
    k = jnp.clip(jnp.asarray(k, jnp.int32), 0, k_max)
    pos = w.row_ids.astype(jnp.int32) * nbc + w.indices.astype(jnp.int32)

    norms = jnp.sum(jnp.square(w.data.astype(jnp.float32)), axis=(1, 2))
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
    remap = ValueRemap(source=order, reset=reset, old_shape=tuple(w.data.shape))
    new = BCSR.from_positions(remap.apply(w.data), new_pos // nbc, new_pos % nbc, shape=w.shape)
    return new, remap


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
        if int(self.delta_t) <= 0:
            raise ValueError(f"delta_t must be a positive number of steps, got {self.delta_t}")
        # Validates drop_fraction and the end step.
        cosine_drop_fraction(self.drop_fraction, end_step=self.end_step)

    @property
    def end_step(self) -> int:
        """The last step at which the pattern may change (``stop_fraction * total_steps``)."""
        return max(1, int(self.stop_fraction * self.total_steps))

    @property
    def schedule(self) -> optax.Schedule:
        """The drop fraction as a function of the step: :func:`cosine_drop_fraction`
        from ``drop_fraction`` to 0 at :attr:`end_step`."""
        return cosine_drop_fraction(self.drop_fraction, end_step=self.end_step)

    def is_update_step(self, step: int) -> bool:
        """Whether to call ``update`` after optimizer step number ``step`` (a Python int,
        counted from 1): every ``delta_t`` steps, from ``delta_t`` to before
        :attr:`end_step`."""
        step = int(step)
        return 0 < step < self.end_step and step % int(self.delta_t) == 0

    def layers(self, model) -> list[tuple[tuple, BCSRLinear]]:
        """The ``(path, layer)`` pairs this algorithm updates: the
        :class:`~jsparse.nn.BCSRLinear` layers selected by ``filter`` that are not
        fully dense."""
        out = []
        for path, layer in sparse_layers(model, filter=self.filter):
            if isinstance(layer, BCSRLinear):
                w = layer.kernel
                if w.nse < _nblocks(w):
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
            w = layer.kernel
            k = jnp.floor(fraction * w.nse).astype(jnp.int32)
            k_max = int(math.floor(self.drop_fraction * w.nse))
            new, remap = grow_and_drop(w, k=k, k_max=k_max, grow_scores=score)
            layer.set_kernel(new)
            remaps[(*path, KERNEL_VALUES)] = remap
            replaced[path_str(path)] = k
        if optimizer is not None:
            remap_optimizer(optimizer, remaps)
        return replaced


# The variable of a BCSR layer holding the stored values (what the optimizer mirrors).
KERNEL_VALUES = "kernel_data"


def _nblocks(w: BCSR) -> int:
    (m, n), (bm, bn) = w.shape, w.block_shape
    return (m // bm) * (n // bn)


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
      filter: an NNX filter of ``(path, layer)`` choosing the ``BCSRLinear``
        layers to update (default: all).
      seed: the random stream of regrowth (folded with the step).

    Returns:
      The algorithm (a frozen dataclass): call :meth:`update` after the optimizer
      steps for which :meth:`is_update_step` is true.

    Raises:
      ValueError: a non-positive ``total_steps`` or ``delta_t``, ``stop_fraction``
        outside ``(0, 1]`` or ``drop_fraction`` outside ``[0, 1]``.

    Use after the optimizer step::

      set_ = jsparse.train.SET(total_steps=T)
      update = nnx.jit(set_.update)
      for step in range(1, T + 1):
          train_step(model, optimizer, *batch)
          if set_.is_update_step(step):
              update(model, optimizer, jnp.asarray(step))

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(16, 16, rngs=nnx.Rngs(0)))
      >>> model = jsparse.nn.sparsify(model, format="bcsr", sparsity=0.5, block_shape=(4, 4))
      >>> set_ = SET(total_steps=100, delta_t=10, drop_fraction=0.5)
      >>> [t for t in range(1, 100) if set_.is_update_step(t)]
      [10, 20, 30, 40, 50, 60, 70]
      >>> replaced = set_.update(model, None, jnp.asarray(10))  # 8 of 16 blocks stored
      >>> int(replaced["layers/0"]), model.layers[0].kernel.nse
      (3, 8)
    """

    def update(self, model, optimizer: nnx.Optimizer | None, step) -> dict[str, jax.Array]:
        """Drop and regrow in place (the model's layers and the optimizer's moments).

        Pure JAX: call it eagerly or inside ``nnx.jit`` (pass ``step`` as an array to
        avoid a retrace per step).

        Args:
          model: the NNX model holding the ``BCSRLinear`` layers (updated in place).
          optimizer: its ``nnx.Optimizer`` (moments moved in place), or ``None``.
          step: the optimizer step just taken (int or int array).

        Returns:
          The number of blocks replaced, per layer path string.
        """
        return self._update(model, optimizer, step)

    def _grow_scores(self, model, layers, step, key, loss_fn, args):
        keys = jax.random.split(key, len(layers))
        return [
            jax.random.uniform(k, (_nblocks(layer.kernel),))
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

    Args:
      total_steps, delta_t, drop_fraction, stop_fraction, filter, seed: as in
        :class:`SET` (``seed`` is unused: growth is deterministic).

    Returns:
      The algorithm (a frozen dataclass): call :meth:`update` after the optimizer
      steps for which :meth:`is_update_step` is true.

    Raises:
      ValueError: as :class:`SET`.

    Use after the optimizer step, with the batch of that step::

      rigl = jsparse.train.RigL(total_steps=T)

      @nnx.jit
      def rigl_update(model, optimizer, step, x, y):
          rigl.update(model, optimizer, step, loss_fn, x, y)

      for step in range(1, T + 1):
          train_step(model, optimizer, x, y)
          if rigl.is_update_step(step):
              rigl_update(model, optimizer, jnp.asarray(step), x, y)

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(16, 16, rngs=nnx.Rngs(0)))
      >>> model = jsparse.nn.sparsify(model, format="bcsr", sparsity=0.5, block_shape=(4, 4))
      >>> loss_fn = lambda model, x: jnp.sum(model(x) ** 2)
      >>> rigl = RigL(total_steps=100, delta_t=10, drop_fraction=0.5)
      >>> rigl.end_step, round(float(rigl.schedule(10)), 4)
      (75, 0.4784)
      >>> replaced = rigl.update(model, None, jnp.asarray(10), loss_fn, jnp.ones((3, 16)))
      >>> int(replaced["layers/0"]), model.layers[0].kernel.nse
      (3, 8)
    """

    def update(
        self,
        model,
        optimizer: nnx.Optimizer | None,
        step,
        loss_fn: Callable[..., jax.Array],
        *args,
    ) -> dict[str, jax.Array]:
        """Drop and grow in place. Pure JAX (see :meth:`SET.update`).

        Args:
          model: the NNX model holding the ``BCSRLinear`` layers (updated in place).
          optimizer: its ``nnx.Optimizer`` (moments moved in place), or ``None``.
          step: the optimizer step just taken (int or int array).
          loss_fn: ``loss_fn(model, *args)``, the training loss (a scalar, or a tuple
            whose first item is the loss).
          *args: the rest of ``loss_fn``'s arguments (the batch).

        Returns:
          The number of blocks replaced, per layer path string.
        """
        return self._update(model, optimizer, step, loss_fn, args)

    def _grow_scores(self, model, layers, step, key, loss_fn, args):
        grads = dense_gradients(model, [layer for _, layer in layers], loss_fn, *args)
        scores = []
        for (_, layer), g in zip(layers, grads, strict=True):
            w = layer.kernel
            (bm, bn), (m, n) = w.block_shape, w.shape
            blocks = g.reshape(m // bm, bm, n // bn, bn)
            scores.append(jnp.sum(jnp.square(blocks.astype(jnp.float32)), axis=(1, 3)).ravel())
        return scores


def dense_gradients(model, layers, loss_fn, *args) -> list[jax.Array]:
    """The gradient of ``loss_fn(model, *args)`` with respect to the *dense* kernel of
    each sparse layer in ``layers``, at every position, stored or not.

    Each layer adds ``x @ P`` for a zero probe ``P`` while the loss is evaluated;
    the gradient with respect to ``P`` is ``x.T @ dy``.

    Args:
      model: the NNX model.
      layers: sparse layers of ``model`` (:class:`~jsparse.nn.FormatLinear`).
      loss_fn: ``loss_fn(model, *args)``, a scalar or a tuple whose first item is the
        loss.
      *args: the rest of ``loss_fn``'s arguments.

    Returns:
      One ``(in_features, out_features)`` float32 array per layer.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(16, 16, rngs=nnx.Rngs(0)))
      >>> model = jsparse.nn.sparsify(model, format="bcsr", sparsity=0.5, block_shape=(4, 4))
      >>> layer = model.layers[0]
      >>> (g,) = dense_gradients(model, [layer], lambda m, x: m(x).sum(), jnp.ones((3, 16)))
      >>> g.shape, float(g[0, 0])  # x.T @ dy: 3 rows of ones, dy = 1
      ((16, 16), 3.0)
    """
    zeros = [jnp.zeros((layer.in_features, layer.out_features), jnp.float32) for layer in layers]

    def loss_of_probes(probes):
        with probing({id(layer): p for layer, p in zip(layers, probes, strict=True)}):
            out = loss_fn(model, *args)
        return out[0] if isinstance(out, tuple) else out

    return jax.grad(loss_of_probes)(zeros)
