"""Factories of every format for the shared oracle suite (tests/test_oracle.py)."""

from __future__ import annotations

import jax.numpy as jnp

import jsparse

from oracle import Factory


def _bcsr(block_shape, density):
    def make(key, shape, dtype):
        return jsparse.BCSR.random(
            key, shape, density=density, block_shape=block_shape, dtype=dtype
        )

    return make


def _monarch(nblocks, block_rank=None):
    """Factors scaled so that the dense entries have unit variance."""

    def make(key, shape, dtype):
        w = jsparse.Monarch.init(key, shape, nblocks=nblocks, block_rank=block_rank, dtype=dtype)
        scale = (shape[0] // nblocks) ** 0.5
        return w.with_values(w.left * jnp.asarray(scale, dtype), w.right)

    return make


def _lowrank(rank, block_shape, density):
    def make(key, shape, dtype):
        return jsparse.LowRankSparse.random(
            key, shape, rank=rank, density=density, block_shape=block_shape, dtype=dtype
        )

    return make


def _nm(n, m, axis):
    def make(key, shape, dtype):
        return jsparse.NM.random(key, shape, n=n, m=m, axis=axis, dtype=dtype)

    return make


FACTORIES: list[Factory] = [
    Factory("bcsr_1x1", _bcsr((1, 1), 0.3), ((12, 20),)),
    Factory("bcsr_4x8", _bcsr((4, 8), 0.4), ((32, 24),)),
    Factory("bcsr_32x32", _bcsr((32, 32), 0.5), ((64, 96),)),
    # >= 64x64 blocks take the batched (both-cores) path of the XLA spmm.
    Factory("bcsr_64x128", _bcsr((64, 128), 0.5), ((192, 256),)),
    Factory("bcsr_empty", _bcsr((4, 4), 0.0), ((8, 12),)),
    Factory("bcsr_full", _bcsr((2, 2), 1.0), ((6, 4),)),
    Factory("monarch_b4", _monarch(4), ((32, 16), (16, 48))),
    Factory("monarch_b2", _monarch(2), ((12, 20),)),
    Factory("monarch_b8_g1", _monarch(8, 1), ((64, 128),)),
    Factory("monarch_b1", _monarch(1), ((6, 10),)),
    Factory("lowrank_csr", _lowrank(3, (1, 1), 0.2), ((12, 20),)),
    Factory("lowrank_bsr", _lowrank(2, (4, 8), 0.3), ((32, 24),)),
    Factory("nm_2of4_axis1", _nm(2, 4, -1), ((8, 16), (12, 32))),
    Factory("nm_1of4_axis0", _nm(1, 4, 0), ((16, 12), (8, 20))),
    Factory("nm_3of8_axis1", _nm(3, 8, 1), ((6, 16),)),
    Factory("lowrank_r0_empty", _lowrank(0, (2, 2), 0.0), ((8, 6),)),
]
