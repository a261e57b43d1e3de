"""jsparse: sparse and structured linear algebra for JAX.

Formats are pytrees you can ``jit``, ``vmap`` and ``grad`` through; matmuls with a
dense operand on either side have exact sparse gradients.
"""

from jsparse import (  # noqa: F401
    attention,
    checkpoint,
    core,
    extend,
    formats,
    nn,
    parallel,
    prune,
    train,
)
from jsparse.core import (
    AbstractSparseMatrix,
    add,
    implementations,
    map_values,
    matmul,
    scale,
    sddmm,
    todense,
    transpose,
    validate,
)
from jsparse.formats import BCSR, NM, LowRankSparse, Monarch, is_nm, nm_mask

__version__ = "0.1.0"

__all__ = [
    "BCSR",
    "NM",
    "AbstractSparseMatrix",
    "LowRankSparse",
    "Monarch",
    "add",
    "attention",
    "checkpoint",
    "extend",
    "implementations",
    "is_nm",
    "map_values",
    "matmul",
    "nm_mask",
    "nn",
    "parallel",
    "prune",
    "scale",
    "sddmm",
    "todense",
    "train",
    "transpose",
    "validate",
]
