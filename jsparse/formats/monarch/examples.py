"""Random Monarch matrices the shared dense-oracle test suite runs every op on."""

from __future__ import annotations

import jax.numpy as jnp

from jsparse.core.matrix import OracleExample
from jsparse.formats.monarch.matrix import Monarch


def _random(nblocks, block_rank=None):
    """Factors scaled so that the dense entries have unit variance."""

    def make(key, shape, dtype):
        w = Monarch.init(key, shape, nblocks=nblocks, block_rank=block_rank, dtype=dtype)
        return w.with_values(w.left * jnp.asarray((shape[0] // nblocks) ** 0.5, dtype), w.right)

    return make


Monarch.oracle_examples = (
    OracleExample("monarch_b4", _random(4), ((32, 16), (16, 48))),
    OracleExample("monarch_b2", _random(2), ((12, 20),)),
    OracleExample("monarch_b8_g1", _random(8, 1), ((64, 128),)),
    OracleExample("monarch_b1", _random(1), ((6, 10),)),
)
