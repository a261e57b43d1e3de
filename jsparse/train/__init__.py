"""Sparse training for ordinary Flax NNX + optax loops.

- Magnitude pruning: :func:`magnitude_prune` (one-shot, per layer or global) and
  :class:`GradualMagnitudePruning` along Zhu & Gupta's cubic schedule
  (:func:`cubic_sparsity`, an optax schedule).
- Dynamic sparse training on the real BCSR representation: :class:`SET` and
  :class:`RigL` (cosine-decayed drop fraction, :func:`cosine_drop_fraction`), with
  ERK allocation (:func:`erk`, :func:`erk_sparsities`). Patterns change under ``jit``
  without recompiling; grown blocks start at zero with reset optimizer moments
  (:class:`ValueRemap`, :func:`remap_optimizer`).
- N:M: :class:`SRSTE`, ending in :class:`jsparse.nn.NMLinear` layers.
- optax on whole formats: :func:`values_only` (updates the values, keeps the indices).

See ``docs/training.md``.
"""

from jsparse.train.dst import SET, RigL, dense_gradients, grow_and_drop
from jsparse.train.erk import erk, erk_sparsities
from jsparse.train.opt_state import ValueRemap, remap_opt_state, remap_optimizer
from jsparse.train.optimizers import is_value_leaf, values_only
from jsparse.train.pruning import GradualMagnitudePruning, magnitude_prune
from jsparse.train.schedules import cosine_drop_fraction, cubic_sparsity
from jsparse.train.sr_ste import SRSTE, SRSTELinear  # SRSTELinear: jsparse.nn's, re-exported

__all__ = [
    "SET",
    "GradualMagnitudePruning",
    "RigL",
    "SRSTE",
    "SRSTELinear",
    "ValueRemap",
    "cosine_drop_fraction",
    "cubic_sparsity",
    "dense_gradients",
    "erk",
    "erk_sparsities",
    "grow_and_drop",
    "is_value_leaf",
    "magnitude_prune",
    "remap_opt_state",
    "remap_optimizer",
    "values_only",
]
