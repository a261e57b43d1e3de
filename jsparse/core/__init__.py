"""The core: the abstract matrix, the registry, the public verbs and the sparse
products' derivatives. Formats (``jsparse.formats``) build on it; it imports none of
them."""

from jsparse.core import inherited  # noqa: F401  (registers the inherited implementations)
from jsparse.core.entrywise import register_entrywise, same_pattern
from jsparse.core.matrix import (
    AbstractSparseMatrix,
    OracleExample,
    register_format,
    registered_formats,
)
from jsparse.core.product import ProductKernels
from jsparse.core.registry import implementations, register_impl, run, with_pallas
from jsparse.core.verbs import (
    add,
    map_values,
    matmul,
    scale,
    sddmm,
    todense,
    transpose,
    validate,
)

__all__ = [
    "AbstractSparseMatrix",
    "OracleExample",
    "ProductKernels",
    "add",
    "implementations",
    "map_values",
    "matmul",
    "register_entrywise",
    "register_format",
    "register_impl",
    "registered_formats",
    "run",
    "same_pattern",
    "scale",
    "sddmm",
    "todense",
    "transpose",
    "validate",
    "with_pallas",
]
