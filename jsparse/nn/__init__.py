"""Flax NNX layers backed by jsparse formats, and model surgery.

- :class:`SparseLinear` (BCSR), :class:`NMLinear` (N:M), :class:`MonarchLinear`
  (Monarch) and :class:`LowRankSparseLinear` (low rank + block sparse), written like
  :class:`flax.nnx.Linear`.
- :func:`sparsify` / :func:`densify`: swap the ``nnx.Linear`` layers of a model for
  sparse ones (initialised from their kernels) and back.

Trainable values are :class:`flax.nnx.Param`; index arrays are
:class:`SparsityPattern` variables, which optimizers built with ``wrt=nnx.Param``
never see.
"""

from jsparse.nn._format_linear import FormatLinear
from jsparse.nn.lowrank_linear import LowRankSparseLinear
from jsparse.nn.monarch_linear import MonarchLinear
from jsparse.nn.nm_linear import NMLinear
from jsparse.nn.sparse_linear import SparseLinear
from jsparse.nn.surgery import FORMATS, densify, path_str, sparse_layers, sparsify
from jsparse.nn.variables import SparsityPattern

__all__ = [
    "FORMATS",
    "FormatLinear",
    "LowRankSparseLinear",
    "MonarchLinear",
    "NMLinear",
    "SparseLinear",
    "SparsityPattern",
    "densify",
    "path_str",
    "sparse_layers",
    "sparsify",
]
