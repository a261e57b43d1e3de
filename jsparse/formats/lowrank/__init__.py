"""LowRankSparse: ``U @ V + S`` with a BCSR ``S``; the matrix and its factored product."""

from jsparse.formats.lowrank import examples, xla  # noqa: F401  (registers the implementations)
from jsparse.formats.lowrank.matrix import LowRankSparse

__all__ = ["LowRankSparse"]
