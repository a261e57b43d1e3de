"""Monarch: block-diagonal factors with a block shuffle between them; the matrix, its
closed-form projection, its XLA and Pallas implementations."""

from jsparse.formats.monarch import examples, pallas, xla  # noqa: F401  (register the implementations)
from jsparse.formats.monarch.matrix import Monarch

__all__ = ["Monarch"]
