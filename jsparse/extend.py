"""The extension API: what a format author uses to add a format (docs/extending.md).

A format is a frozen dataclass deriving from :class:`AbstractSparseMatrix`, decorated
with :func:`register_format`; it registers implementations of the verbs with
:func:`register_impl` (each with an optional ``supports`` check), overrides
``auto_order`` to choose among them, and lists :class:`OracleExample` instances so the
shared dense-oracle test suite covers it. Entrywise formats get ``scale``,
``map_values`` and ``add`` from :func:`register_entrywise`, and their products'
sparse derivatives from :mod:`jsparse.core.product` through a
:class:`ProductKernels` bundle.
"""

from jsparse.core import checks, product
from jsparse.core.entrywise import register_entrywise, same_pattern
from jsparse.core.matrix import (
    AbstractSparseMatrix,
    OracleExample,
    register_format,
    registered_formats,
)
from jsparse.core.product import ProductKernels
from jsparse.core.registry import PLATFORMS, implementations, register_impl, run, with_pallas

__all__ = [
    "PLATFORMS",
    "AbstractSparseMatrix",
    "OracleExample",
    "ProductKernels",
    "checks",
    "implementations",
    "product",
    "register_entrywise",
    "register_format",
    "register_impl",
    "registered_formats",
    "run",
    "same_pattern",
    "with_pallas",
]
