"""Magnitude pruning: one-shot (per layer or global) and gradual (Zhu & Gupta).

Both work on blocks (``block_shape=(1, 1)`` is element-wise pruning) and produce
:class:`~jsparse.nn.BCSRLinear` layers that store only the kept blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jsparse.formats.bcsr import BCSR
from jsparse.nn import BCSRLinear, iter_linears, path_str, sparse_layers, sparsify
from jsparse.nn.bcsr_linear import block_count
from jsparse.train.dst import KERNEL_VALUES
from jsparse.train.opt_state import ValueRemap, remap_optimizer
from jsparse.train.schedules import check_steps, cubic_sparsity

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
    selects by :class:`~jsparse.nn.BCSRLinear` layers keeping the blocks of largest
    L2 norm.

    Args:
      model: an NNX module (modified in place and returned).
      sparsity: the fraction of blocks removed, in ``[0, 1)``.
      block_shape: the pruning granularity (``(1, 1)``: single weights).
      scope: ``"layer"`` (every layer at ``sparsity``) or ``"global"`` (one threshold
        on the block norms of all selected layers, so layers end with different
        sparsities; every layer keeps at least one block).
      filter: an NNX filter of ``(path, layer)``.

    Returns:
      The model, its selected ``nnx.Linear`` layers now
      :class:`~jsparse.nn.BCSRLinear` layers.

    Raises:
      ValueError: ``sparsity`` outside ``[0, 1)``, an unknown ``scope``, or a block
        shape that does not divide a layer.

    Warns:
      UserWarning: ``filter`` selects no layer.

    Example:
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(16, 16, rngs=nnx.Rngs(0)))
      >>> model = magnitude_prune(model, 0.75, block_shape=(4, 4))
      >>> type(model.layers[0]).__name__, model.layers[0].kernel.nse
      ('BCSRLinear', 4)
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "layer":
        return sparsify(
            model, format="bcsr", filter=filter, sparsity=sparsity, block_shape=block_shape
        )
    layers = iter_linears(model, filter=filter)
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
    """Gradual magnitude pruning (Zhu & Gupta, 2017) of the ``BCSRLinear`` layers of
    a model, following the cubic schedule :func:`~jsparse.train.cubic_sparsity`.

    At each pruning step every selected layer keeps the ``round((1 - s(t)) * blocks)``
    blocks of largest L2 norm and **drops the others from storage**: the value array
    and the matching optimizer moments shrink. The training step therefore retraces
    once per pruning event (a new shape) and gets faster as the model gets sparser;
    between events nothing recompiles. Start from a dense-pattern model, e.g.
    ``jsparse.nn.sparsify(model, format="bcsr", sparsity=0.0, block_shape=(32, 32))``
    (dense-pattern layers run the dense matmul).

    Args:
      final_sparsity: ``s_f`` in ``[0, 1)``.
      begin_step, end_step: ``t0 < t1``, where the ramp starts and ends.
      initial_sparsity: ``s_i`` in ``[0, s_f]`` (default 0).
      frequency: steps between pruning events (the paper's ``Δt``; default 100);
        pruning happens at ``begin_step``, every ``frequency`` steps after, and at
        ``end_step``.
      filter: an NNX filter of ``(path, layer)`` choosing the layers (default: all).

    Returns:
      The algorithm (a frozen dataclass): call :meth:`update` after every step.

    Raises:
      ValueError: sparsities outside ``[0, 1)`` or decreasing, ``end_step <=
        begin_step``, or a non-positive frequency.

    Use after the optimizer step::

      gmp = GradualMagnitudePruning(0.9, begin_step=0, end_step=T // 2)
      for step in range(1, T + 1):
          train_step(model, optimizer, *batch)
          gmp.update(model, optimizer, step)   # eager; a no-op between pruning steps

    Example:
      >>> import jsparse
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(16, 16, rngs=nnx.Rngs(0)))
      >>> model = jsparse.nn.sparsify(model, format="bcsr", sparsity=0.0, block_shape=(4, 4))
      >>> gmp = GradualMagnitudePruning(0.5, begin_step=0, end_step=10, frequency=5)
      >>> [t for t in range(20) if gmp.is_update_step(t)], round(float(gmp.schedule(5)), 4)
      ([0, 5, 10], 0.4375)
      >>> gmp.update(model, None, 5), model.layers[0].kernel.nse  # round(0.5625 * 16)
      (True, 9)
    """

    final_sparsity: float
    begin_step: int
    end_step: int
    initial_sparsity: float = 0.0
    frequency: int = 100
    filter: Any = ...

    def __post_init__(self):
        check_steps(self.begin_step, self.end_step, self.frequency)
        _ = self.schedule  # validates the sparsities

    @property
    def schedule(self) -> optax.Schedule:
        """The target sparsity per step: :func:`~jsparse.train.cubic_sparsity`."""
        return cubic_sparsity(
            self.final_sparsity,
            begin_step=self.begin_step,
            end_step=self.end_step,
            initial_sparsity=self.initial_sparsity,
        )

    def is_update_step(self, step: int) -> bool:
        """Whether pruning happens at ``step`` (a Python int): every ``frequency``
        steps from ``begin_step``, and at ``end_step``."""
        step = int(step)
        if step < self.begin_step or step > self.end_step:
            return False
        return (step - self.begin_step) % self.frequency == 0 or step == self.end_step

    def update(self, model, optimizer: nnx.Optimizer | None, step: int) -> bool:
        """Prune if ``step`` is a pruning step. Eager (outside ``jit``): shapes change.

        Args:
          model: the NNX model holding the ``BCSRLinear`` layers (updated in place).
          optimizer: its ``nnx.Optimizer`` (moments shrunk in place), or ``None``.
          step: the optimizer step just taken (a Python int).

        Returns:
          Whether anything was pruned.
        """
        if not self.is_update_step(step):
            return False
        target = float(self.schedule(step))
        remaps = {}
        for path, layer in sparse_layers(model, filter=self.filter):
            if not isinstance(layer, BCSRLinear):
                continue
            w = layer.kernel
            nse, _ = block_count(w.shape, w.block_shape, min(target, 0.999999))
            if nse >= w.nse:
                continue
            new, remaps[(*path, KERNEL_VALUES)] = _keep_largest(w, nse)
            layer.set_kernel(new, resize=True)
        if optimizer is not None and remaps:
            remap_optimizer(optimizer, remaps)
        return bool(remaps)


def _keep_largest(w: BCSR, nse: int) -> tuple[BCSR, ValueRemap]:
    """The ``nse`` stored blocks of ``w`` with the largest L2 norm, and the remap."""
    norms = jnp.sum(jnp.square(w.data.astype(jnp.float32)), axis=(1, 2))
    _, keep = jax.lax.top_k(norms, nse)
    keep = jnp.sort(keep)  # stored order is canonical, so a sorted subset is too
    remap = ValueRemap(source=keep, reset=None, old_shape=tuple(w.data.shape))
    new = BCSR.from_positions(remap.apply(w.data), w.row_ids[keep], w.indices[keep], shape=w.shape)
    return new, remap
