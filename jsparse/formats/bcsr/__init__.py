"""BCSR (block compressed sparse row): the matrix, its XLA and Pallas implementations."""

from jsparse.core.entrywise import register_entrywise
from jsparse.formats.bcsr import examples, pallas, xla  # noqa: F401  (register the implementations)
from jsparse.formats.bcsr.matrix import BCSR

register_entrywise(BCSR, gather=xla.gather)

__all__ = ["BCSR"]
