"""Factories of every format for the shared oracle suite (tests/test_oracle.py)."""

from __future__ import annotations

import jsparse

from oracle import Factory


def _bcsr(block_shape, density):
    def make(key, shape, dtype):
        return jsparse.BCSR.random(
            key, shape, density=density, block_shape=block_shape, dtype=dtype
        )

    return make


FACTORIES: list[Factory] = [
    Factory("bcsr_1x1", _bcsr((1, 1), 0.3), ((12, 20), (16, 16))),
    Factory("bcsr_4x8", _bcsr((4, 8), 0.4), ((16, 32), (32, 24))),
    Factory("bcsr_32x32", _bcsr((32, 32), 0.5), ((64, 96),)),
    Factory("bcsr_empty", _bcsr((4, 4), 0.0), ((8, 12),)),
    Factory("bcsr_full", _bcsr((2, 2), 1.0), ((6, 4),)),
]
