"""Flax NNX layers backed by jsparse formats, and model surgery.

- :class:`FormatLinear`, the base: ``nnx.Linear``'s arguments, in its order, with
  the kernel stored in a format. :class:`BCSRLinear` (alias :class:`SparseLinear`),
  :class:`NMLinear`, :class:`MonarchLinear` and :class:`LowRankSparseLinear` choose
  the format; each registers itself in :data:`FORMATS` under its ``format_name``.
- :class:`SRSTELinear`: a dense ``nnx.Linear`` trained through its N:M mask
  (:class:`jsparse.train.SRSTE`).
- :class:`SparseMultiHeadAttention`: ``nnx.MultiHeadAttention`` over a block-sparse
  attention pattern (:mod:`jsparse.attention`); its mask is an :class:`AttentionMask`.
- :func:`sparsify` / :func:`densify`: swap the ``nnx.Linear`` and ``nnx.LinearGeneral``
  layers of a model (stacked by ``nnx.vmap`` or not) for sparse ones (initialised from
  their kernels; :class:`FormatLinearGeneral` keeps ``LinearGeneral``'s shapes) and
  back; :func:`iter_linears`, :func:`linear_layers`, :func:`linear_shape`,
  :func:`sparse_layers`, :func:`replace_module` and :func:`path_str` find and
  replace layers; :func:`kernel_density` measures what a model stores.

Trainable values are :class:`flax.nnx.Param`; index arrays are
:class:`SparsityPattern` variables, which optimizers built with ``wrt=nnx.Param``
never see.
"""

from jsparse.nn.attention import AttentionMask, SparseMultiHeadAttention
from jsparse.nn.bcsr_linear import BCSRLinear, SparseLinear
from jsparse.nn.format_linear import FORMATS, FormatLinear
from jsparse.nn.linear_general import FormatLinearGeneral
from jsparse.nn.lowrank_linear import LowRankSparseLinear
from jsparse.nn.monarch_linear import MonarchLinear
from jsparse.nn.nm_linear import NMLinear
from jsparse.nn.sr_ste_linear import SRSTELinear
from jsparse.nn.surgery import (
    densify,
    iter_linears,
    kernel_density,
    linear_layers,
    linear_shape,
    path_str,
    replace_module,
    sparse_layers,
    sparsify,
)
from jsparse.nn.variables import SparsityPattern

__all__ = [
    "FORMATS",
    "AttentionMask",
    "BCSRLinear",
    "FormatLinear",
    "FormatLinearGeneral",
    "LowRankSparseLinear",
    "MonarchLinear",
    "NMLinear",
    "SRSTELinear",
    "SparseMultiHeadAttention",
    "SparseLinear",
    "SparsityPattern",
    "densify",
    "iter_linears",
    "kernel_density",
    "linear_layers",
    "linear_shape",
    "path_str",
    "replace_module",
    "sparse_layers",
    "sparsify",
]
