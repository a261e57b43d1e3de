"""N:M structured sparsity: the matrix, masks, its XLA and Pallas implementations."""

from jsparse.core.entrywise import register_entrywise
from jsparse.formats.nm import cpu, examples, pallas, xla  # noqa: F401  (register them)
from jsparse.formats.nm.masks import is_nm, nm_mask
from jsparse.formats.nm.matrix import NM

register_entrywise(NM, gather=xla.gather)

__all__ = ["NM", "is_nm", "nm_mask"]
