"""The formats, one folder each: the matrix class, its implementations, its helpers."""

from jsparse.formats.bcsr import BCSR
from jsparse.formats.lowrank import LowRankSparse
from jsparse.formats.monarch import Monarch
from jsparse.formats.nm import NM, is_nm, nm_mask

__all__ = ["BCSR", "NM", "LowRankSparse", "Monarch", "is_nm", "nm_mask"]
