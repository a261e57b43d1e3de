"""One-shot pruning with calibration data, into jsparse layers, and sparse fine-tuning
by distillation.

- :func:`oneshot`: prune the ``nnx.Linear`` layers of any Flax NNX model once
  (magnitude, Wanda or SparseGPT; unstructured, blocks, N:M or optimal transposable
  N:M; uniform or OWL sparsities), sequentially in data-flow order by default, into
  :class:`~jsparse.nn.BCSRLinear` / :class:`~jsparse.nn.NMLinear` layers, with a
  :class:`PruneReport`.
- The pieces: :func:`collect_statistics` (``XᵀX`` and input norms through recording
  layers), :func:`magnitude_prune`, :func:`wanda_prune`, :func:`sparsegpt_prune`,
  :func:`prune_weight`, :func:`select_mask`, :func:`transposable_nm_mask`,
  :func:`owl_sparsities`, :func:`reconstruction_error`, :func:`to_sparse_layer`.
- Distillation: :func:`squarehead_loss` and :func:`hidden_states`.

See ``docs/pruning.md``.
"""

from jsparse.prune.distill import hidden_states, select_modules, squarehead_loss
from jsparse.prune.layers import to_sparse_layer
from jsparse.prune.methods import (
    corrected_kernel,
    magnitude_prune,
    prune_weight,
    reconstruction_error,
    select_mask,
    sparsegpt_prune,
    wanda_prune,
)
from jsparse.prune.oneshot import LayerReport, PruneReport, oneshot
from jsparse.prune.owl import OWL, outlier_ratio, owl_sparsities
from jsparse.prune.statistics import (
    LayerStatistics,
    calibration_batches,
    calibration_order,
    collect_statistics,
    order_groups,
    select_linears,
)
from jsparse.prune.structure import (
    Blocks,
    NMStructure,
    keep_count,
    parse_structure,
    transposable_nm_mask,
    transposable_patterns,
)

__all__ = [
    "OWL",
    "Blocks",
    "LayerReport",
    "LayerStatistics",
    "NMStructure",
    "PruneReport",
    "calibration_batches",
    "calibration_order",
    "collect_statistics",
    "corrected_kernel",
    "hidden_states",
    "keep_count",
    "magnitude_prune",
    "oneshot",
    "order_groups",
    "outlier_ratio",
    "owl_sparsities",
    "parse_structure",
    "prune_weight",
    "reconstruction_error",
    "select_linears",
    "select_mask",
    "select_modules",
    "sparsegpt_prune",
    "squarehead_loss",
    "to_sparse_layer",
    "transposable_nm_mask",
    "transposable_patterns",
    "wanda_prune",
]
