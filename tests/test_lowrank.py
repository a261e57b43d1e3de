"""LowRankSparse: pytree plumbing, fromdense (recovery, never-worse guarantee), errors.

Matmul, jit, vmap and grad against the dense oracle run in tests/test_oracle.py
(factories ``lowrank_*``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse import BCSR, LowRankSparse

from oracle import assert_close, stack_values, value_axes


def _planted(key, shape=(40, 32), rank=2, nse=12, block_shape=(1, 1), magnitude=5.0):
    """``L0 + S0`` with a rank-``rank`` L0 and ``nse`` large blocks in S0."""
    ku, kv, ks = jax.random.split(key, 3)
    low = jax.random.normal(ku, (shape[0], rank)) @ jax.random.normal(kv, (rank, shape[1]))
    s0 = BCSR.random(
        ks,
        shape,
        density=nse / (shape[0] * shape[1] // np.prod(block_shape)),
        block_shape=block_shape,
    )
    s0 = s0.with_values(magnitude * jnp.sign(s0.data) + s0.data)
    return low, s0


def test_members_and_S_view():
    a = LowRankSparse.random(jax.random.key(0), (16, 24), rank=3, density=0.25, block_shape=(4, 4))
    assert a.shape == (16, 24) and a.rank == 3 and a.dtype == jnp.float32
    assert isinstance(a.S, BCSR) and a.S.shape == (16, 24) and a.S.block_shape == (4, 4)
    assert_close(a.todense(), a.U @ a.V + a.S.todense(), jnp.float32, 3)
    assert a.nstored == 3 * (16 + 24) + a.S.nse * 16
    leaves = jax.tree_util.tree_leaves(a)
    assert len(leaves) == 2 + len(BCSR._leaf_fields)
    assert a.nbytes == sum(x.nbytes for x in leaves)
    empty = LowRankSparse(a.U, a.V)
    assert empty.S.nse == 0
    assert_close(empty.todense(), a.U @ a.V, jnp.float32, 3)


def test_transpose_and_replace():
    a = LowRankSparse.random(jax.random.key(1), (12, 20), rank=2, density=0.3)
    t = a.T
    assert type(t) is LowRankSparse and t.shape == (20, 12)
    # U @ V transposed sums in another order (XLA's dot differs between AVX2 and
    # AVX-512 machines): equal to a few float32 ulps.
    np.testing.assert_allclose(np.asarray(t.todense()), np.asarray(a.todense()).T,
                               rtol=1e-6, atol=1e-6)
    t.validate()
    b = a._replace(U=2 * a.U)
    assert_close(b.todense(), 2 * a.U @ a.V + a.S.todense(), jnp.float32, 2)


def test_matmul_both_sides():
    a = LowRankSparse.random(jax.random.key(2), (32, 24), rank=4, density=0.2, block_shape=(4, 8))
    d = a.todense()
    x = jax.random.normal(jax.random.key(3), (24, 5))
    y = jax.random.normal(jax.random.key(4), (3, 2, 32))
    for impl in ("auto", "xla", "dense"):
        assert_close(jsparse.matmul(a, x, impl=impl), d @ x, jnp.float32, 24)
        assert_close(jsparse.matmul(y, a, impl=impl), y @ d, jnp.float32, 32)
    assert_close(a @ x[:, 0], d @ x[:, 0], jnp.float32, 24)


def test_grad_allow_int_and_vmap_values():
    a = LowRankSparse.random(jax.random.key(5), (12, 8), rank=2, density=0.25)
    x = jax.random.normal(jax.random.key(6), (8, 3))
    g = jax.grad(lambda a: jnp.sum(jnp.tanh(a @ x)), allow_int=True)(a)
    assert type(g) is LowRankSparse
    assert g.S_indices.dtype == jax.dtypes.float0 and g.S_indptr.dtype == jax.dtypes.float0
    ref = jax.grad(lambda a: jnp.sum(jnp.tanh(a.todense() @ x)), allow_int=True)(a)
    for f in ("U", "V", "S_data"):
        assert_close(getattr(g, f), getattr(ref, f), jnp.float32, 12)
    g.validate()
    mats = [a, a._replace(U=-a.U, S_data=2 * a.S_data)]
    out = jax.vmap(lambda a: a @ x, in_axes=(value_axes(a),))(stack_values(mats))
    assert_close(out, jnp.stack([m.todense() @ x for m in mats]), jnp.float32, 8)


def test_scale_and_astype():
    a = LowRankSparse.random(jax.random.key(7), (8, 12), rank=2, density=0.5)
    assert_close((3.0 * a).todense(), 3.0 * a.todense(), jnp.float32, 2)
    b = a.astype(jnp.bfloat16)
    assert {b.U.dtype, b.V.dtype, b.S_data.dtype} == {jnp.dtype(jnp.bfloat16)}
    assert b.S_indices.dtype == jnp.int32


@pytest.mark.parametrize("block_shape", [(1, 1), (4, 4)])
def test_fromdense_recovers_planted_low_rank_plus_sparse(block_shape):
    low, s0 = _planted(jax.random.key(8), rank=2, nse=10, block_shape=block_shape)
    x = low + s0.todense()
    a, err = LowRankSparse.fromdense(
        x, rank=2, nse=s0.nse, block_shape=block_shape, iters=50, return_error=True
    )
    assert float(err) < 1e-4, float(err)
    assert_close(a.todense(), x, jnp.float32, 32)
    assert_close(a.U @ a.V, low, jnp.float32, 32)
    # the recovered support is the planted one
    np.testing.assert_array_equal(np.asarray(a.S.indices), np.asarray(s0.indices))
    np.testing.assert_array_equal(np.asarray(a.S.indptr), np.asarray(s0.indptr))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fromdense_never_worse_than_either_part(seed):
    x = jax.random.normal(jax.random.key(seed), (24, 16))
    x = x + 0.5 * jax.random.normal(jax.random.key(seed + 10), (24, 1)) @ jnp.ones((1, 16))
    rank, nse, bs = 2, 6, (4, 4)
    _, err = LowRankSparse.fromdense(
        x, rank=rank, nse=nse, block_shape=bs, iters=3, return_error=True
    )
    norm = float(jnp.linalg.norm(x))
    sv = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
    low_only = np.sqrt(np.sum(sv[rank:] ** 2)) / norm
    sparse_only = (
        float(jnp.linalg.norm(x - BCSR.fromdense(x, block_shape=bs, nse=nse).todense())) / norm
    )
    assert float(err) <= min(low_only, sparse_only) * (1 + 1e-5)
    # more refinement never hurts
    errs = [
        float(
            LowRankSparse.fromdense(
                x, rank=rank, nse=nse, block_shape=bs, iters=k, return_error=True
            )[1]
        )
        for k in (0, 1, 4)
    ]
    assert errs[0] >= errs[1] * (1 - 1e-5) >= errs[2] * (1 - 2e-5)


def test_fromdense_pure_parts_and_reported_error():
    x = jax.random.normal(jax.random.key(11), (10, 14))
    a, err = LowRankSparse.fromdense(x, rank=0, density=0.5, return_error=True)
    assert a.rank == 0 and a.S.nse == 70
    np.testing.assert_allclose(
        float(err), float(jnp.linalg.norm(x - a.todense()) / jnp.linalg.norm(x)), rtol=1e-5
    )
    b, err = LowRankSparse.fromdense(x, rank=10, nse=0, return_error=True)
    assert float(err) < 1e-5 and b.S.nse == 0


def test_fromdense_under_jit():
    low, s0 = _planted(jax.random.key(12), shape=(16, 12), rank=1, nse=5)
    x = low + s0.todense()
    f = jax.jit(lambda x: LowRankSparse.fromdense(x, rank=1, nse=5, iters=20, return_error=True))
    a, err = f(x)
    assert float(err) < 1e-4
    assert a.S.nse == 5


# ------------------------------------------------------------------ bad input
def test_bad_construction():
    u, v = jnp.ones((6, 2)), jnp.ones((2, 4))
    with pytest.raises(ValueError, match=r"rank mismatch: U \(6, 2\) .* V \(3, 4\)"):
        LowRankSparse(u, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match=r"2-D U .* got U \(6,\) and V \(2, 4\)"):
        LowRankSparse(jnp.ones(6), v)
    with pytest.raises(
        ValueError, match=r"S has shape \(4, 6\), but U \(6, 2\) @ V \(2, 4\) has shape \(6, 4\)"
    ):
        LowRankSparse(u, v, BCSR.fromdense(jnp.ones((4, 6))))
    with pytest.raises(TypeError, match="S must be a jsparse.BCSR, got ndarray"):
        LowRankSparse(u, v, np.ones((6, 4)))
    with pytest.raises(TypeError, match="share one dtype"):
        LowRankSparse(u, v, BCSR.fromdense(jnp.ones((6, 4), jnp.bfloat16)))
    with pytest.raises(TypeError, match="floating-point"):
        LowRankSparse(jnp.ones((6, 2), jnp.int32), v)


def test_bad_fromdense():
    x = jnp.ones((8, 12))
    with pytest.raises(ValueError, match=r"exactly one of nse= and density="):
        LowRankSparse.fromdense(x, rank=1)
    with pytest.raises(ValueError, match=r"exactly one of nse= and density="):
        LowRankSparse.fromdense(x, rank=1, nse=2, density=0.1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 8\] for shape \(8, 12\), got 9"):
        LowRankSparse.fromdense(x, rank=9, nse=1)
    with pytest.raises(TypeError, match="rank must be an int"):
        LowRankSparse.fromdense(x, rank=1.0, nse=1)
    with pytest.raises(
        ValueError, match=r"nse must be in \[0, 6\] .* \(4, 4\) blocks in \(8, 12\)"
    ):
        LowRankSparse.fromdense(x, rank=1, nse=7, block_shape=(4, 4))
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        LowRankSparse.fromdense(x, rank=1, density=1.5)
    with pytest.raises(
        ValueError, match=r"block_shape \(5, 4\) does not divide the shape \(8, 12\)"
    ):
        LowRankSparse.fromdense(x, rank=1, nse=1, block_shape=(5, 4))
    with pytest.raises(ValueError, match="iters must be a non-negative int"):
        LowRankSparse.fromdense(x, rank=1, nse=1, iters=-1)
    with pytest.raises(ValueError, match=r"2-D array, got shape \(8,\)"):
        LowRankSparse.fromdense(jnp.ones(8), rank=1, nse=1)
    with pytest.raises(TypeError, match="floating-point"):
        LowRankSparse.fromdense(jnp.ones((8, 12), jnp.int32), rank=1, nse=1)


def test_bad_matmul_shapes():
    a = LowRankSparse.random(jax.random.key(0), (6, 4), rank=1, density=0.5)
    with pytest.raises(ValueError, match=r"shapes \(6, 4\) and \(6,\) are not aligned"):
        a @ jnp.ones(6)
    with pytest.raises(TypeError, match="scaled by a scalar"):
        jsparse.scale(a, jnp.ones(2))
