"""Random N:M matrices the shared dense-oracle test suite runs every op on."""

from __future__ import annotations

from jsparse.core.matrix import OracleExample
from jsparse.formats.nm.matrix import NM


def _random(n, m, axis):
    def make(key, shape, dtype):
        return NM.random(key, shape, n=n, m=m, axis=axis, dtype=dtype)

    return make


NM.oracle_examples = (
    OracleExample("nm_2of4_axis1", _random(2, 4, -1), ((8, 16), (12, 32))),
    OracleExample("nm_1of4_axis0", _random(1, 4, 0), ((16, 12), (8, 20))),
    OracleExample("nm_3of8_axis1", _random(3, 8, 1), ((6, 16),)),
)
