"""Random BCSR matrices the shared dense-oracle test suite runs every op on."""

from __future__ import annotations

from jsparse.core.matrix import OracleExample
from jsparse.formats.bcsr.matrix import BCSR


def _random(block_shape, density):
    def make(key, shape, dtype):
        return BCSR.random(key, shape, density=density, block_shape=block_shape, dtype=dtype)

    return make


BCSR.oracle_examples = (
    OracleExample("bcsr_4x8", _random((4, 8), 0.4), ((32, 24),)),
    OracleExample("bcsr_1x1", _random((1, 1), 0.3), ((12, 20),)),
    OracleExample("bcsr_32x32", _random((32, 32), 0.5), ((64, 96),)),
    # >= 64x64 blocks take the batched (both-cores) path of the XLA spmm.
    OracleExample("bcsr_64x128", _random((64, 128), 0.5), ((192, 256),)),
    OracleExample("bcsr_empty", _random((4, 4), 0.0), ((8, 12),)),
    OracleExample("bcsr_full", _random((2, 2), 1.0), ((6, 4),)),
)
