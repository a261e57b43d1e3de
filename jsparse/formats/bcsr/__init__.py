"""BCSR (block compressed sparse row): the matrix, its XLA and Pallas implementations."""

from jsparse.core.entrywise import register_entrywise
from jsparse.formats.bcsr import cpu, examples, pallas, xla  # noqa: F401  (register them)
from jsparse.formats.bcsr.matrix import BCSR

register_entrywise(BCSR, gather=xla.gather)

__all__ = ["BCSR"]
