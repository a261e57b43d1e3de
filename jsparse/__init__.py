"""jsparse: sparse and structured linear algebra for JAX.

Formats are pytrees you can ``jit``, ``vmap`` and ``grad`` through; matmuls with a
dense operand on either side have exact sparse gradients.
"""

# _pallas registers the "pallas" implementations of every format.
from jsparse import _pallas, nn, ops, train  # noqa: F401
from jsparse._base import AbstractSparseMatrix
from jsparse._dispatch import implementations, register_impl
from jsparse.bcsr import BCSR
from jsparse.lowrank import LowRankSparse
from jsparse.monarch import Monarch
from jsparse.nm import NM, is_nm, nm_mask
from jsparse.ops import add, map_values, matmul, scale, sddmm, todense, transpose

__version__ = "0.1.0"

__all__ = [
    "BCSR",
    "AbstractSparseMatrix",
    "LowRankSparse",
    "Monarch",
    "NM",
    "add",
    "implementations",
    "is_nm",
    "map_values",
    "matmul",
    "nm_mask",
    "nn",
    "ops",
    "register_impl",
    "scale",
    "sddmm",
    "todense",
    "train",
    "transpose",
]
