"""Random low-rank + sparse matrices the shared dense-oracle test suite runs every op on."""

from __future__ import annotations

from jsparse.core.matrix import OracleExample
from jsparse.formats.lowrank.matrix import LowRankSparse


def _random(rank, block_shape, density):
    def make(key, shape, dtype):
        return LowRankSparse.random(
            key, shape, rank=rank, density=density, block_shape=block_shape, dtype=dtype
        )

    return make


LowRankSparse.oracle_examples = (
    OracleExample("lowrank_csr", _random(3, (1, 1), 0.2), ((12, 20),)),
    OracleExample("lowrank_bsr", _random(2, (4, 8), 0.3), ((32, 24),)),
    OracleExample("lowrank_r0_empty", _random(0, (2, 2), 0.0), ((8, 6),)),
)
