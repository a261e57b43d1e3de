"""Monarch: definition, projection (exactness and optimality), init, transpose, errors.

Matmul, jit, vmap and grad against the dense oracle run in tests/test_oracle.py
(factories ``monarch_*``); this file covers what is specific to the format.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse import Monarch

from oracle import assert_close

# (shape, nblocks, block_rank): square and rectangular, nblocks != sqrt(n), g > 1.
SHAPES = [
    ((16, 16), 4, 1),
    ((32, 64), 4, None),
    ((96, 48), 4, 2),
    ((48, 72), 6, None),
    ((64, 32), 32, None),  # more than 16 blocks: the batched kernel path
    ((8, 12), 1, None),
]
IDS = [f"{s[0]}x{s[1]}-b{b}-g{g}" for s, b, g in SHAPES]


def _random(shape, nblocks, block_rank, seed=0):
    return Monarch.init(jax.random.key(seed), shape, nblocks=nblocks, block_rank=block_rank)


def _entrywise(w: Monarch) -> np.ndarray:
    """The documented definition, one entry at a time."""
    left, right = np.asarray(w.left, np.float64), np.asarray(w.right, np.float64)
    g = w.block_rank
    s, p = w.block_shape
    out = np.zeros(w.shape)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            lb, u, kb, t = i // s, i % s, j // p, j % p
            out[i, j] = sum(left[lb, u, kb * g + e] * right[kb, lb * g + e, t] for e in range(g))
    return out


@pytest.mark.parametrize("shape,nblocks,block_rank", SHAPES, ids=IDS)
def test_definition_and_block_rank(shape, nblocks, block_rank):
    w = _random(shape, nblocks, block_rank)
    assert w.shape == shape and w.nblocks == nblocks
    q = w.nblocks * w.block_rank
    assert w.left.shape == (nblocks, shape[0] // nblocks, q)
    assert w.right.shape == (nblocks, q, shape[1] // nblocks)
    assert w.nstored == q * (shape[0] + shape[1])
    d = np.asarray(w.todense())
    np.testing.assert_allclose(d, _entrywise(w), rtol=1e-5, atol=1e-6)
    s, p = w.block_shape
    blocks = d.reshape(nblocks, s, nblocks, p).transpose(0, 2, 1, 3)
    assert np.linalg.matrix_rank(blocks).max() <= w.block_rank


def test_default_block_rank():
    from jsparse.formats.monarch.matrix import _check_blocks

    # ceil(min(m, n) / nblocks**2): square-ish factor blocks (q ~ min(m, n) / nblocks).
    assert _check_blocks((4096, 4096), 4, None) == (4, 256)
    assert _check_blocks((4096, 4096), 16, None) == (16, 16)
    assert _check_blocks((256, 256), 16, None) == (16, 1)
    assert _check_blocks((64, 64), 32, None) == (32, 1)
    assert Monarch.init(jax.random.key(0), (64, 32), nblocks=4).block_rank == 2


@pytest.mark.parametrize("shape,nblocks,block_rank", SHAPES, ids=IDS)
def test_matmul_both_sides_and_impls(shape, nblocks, block_rank):
    w = _random(shape, nblocks, block_rank, seed=1)
    d = w.todense()
    x = jax.random.normal(jax.random.key(2), (shape[1], 3))
    y = jax.random.normal(jax.random.key(3), (2, 5, shape[0]))
    for impl in ("auto", "xla", "dense"):
        assert_close(jsparse.matmul(w, x, impl=impl), d @ x, jnp.float32, shape[1])
        assert_close(jsparse.matmul(y, w, impl=impl), y @ d, jnp.float32, shape[0])
    assert_close(jax.jit(lambda w, x: w @ x)(w, x), d @ x, jnp.float32, shape[1])


@pytest.mark.parametrize("shape,nblocks,block_rank", SHAPES, ids=IDS)
def test_transpose_is_monarch(shape, nblocks, block_rank):
    w = _random(shape, nblocks, block_rank)
    t = w.T
    assert type(t) is Monarch and t.shape == shape[::-1] and t.nblocks == nblocks
    assert t.block_rank == w.block_rank
    # The block products transposed sum in another order (XLA's dot differs between
    # AVX2 and AVX-512 machines): equal to a few float32 ulps; the factors exactly.
    np.testing.assert_allclose(np.asarray(t.todense()), np.asarray(w.todense()).T,
                               rtol=1e-6, atol=1e-6)
    tt = t.T
    np.testing.assert_array_equal(np.asarray(tt.left), np.asarray(w.left))
    np.testing.assert_array_equal(np.asarray(tt.right), np.asarray(w.right))
    x = jax.random.normal(jax.random.key(4), (shape[0], 2))
    assert_close(t @ x, w.todense().T @ x, jnp.float32, shape[0])


@pytest.mark.parametrize("shape,nblocks,block_rank", SHAPES, ids=IDS)
def test_projection_of_a_monarch_is_exact(shape, nblocks, block_rank):
    w = _random(shape, nblocks, block_rank, seed=5)
    d = w.todense()
    p, err = Monarch.fromdense(d, nblocks=nblocks, block_rank=w.block_rank, return_error=True)
    rel = float(jnp.linalg.norm(p.todense() - d) / jnp.linalg.norm(d))
    assert rel < 1e-5, rel
    assert float(err) < 1e-5
    assert p.left.shape == w.left.shape and p.right.shape == w.right.shape


def _projection_error(x, p):
    return float(jnp.linalg.norm(x - p.todense()))


@pytest.mark.parametrize(
    "shape,nblocks,block_rank",
    [((16, 16), 4, 1), ((32, 48), 4, 2), ((24, 36), 3, 1), ((40, 20), 2, 3)],
)
def test_projection_is_optimal_against_perturbations(shape, nblocks, block_rank):
    x = jax.random.normal(jax.random.key(6), shape)
    p, err = Monarch.fromdense(x, nblocks=nblocks, block_rank=block_rank, return_error=True)
    best = _projection_error(x, p)
    np.testing.assert_allclose(float(err), best / float(jnp.linalg.norm(x)), rtol=1e-5)
    keys = jax.random.split(jax.random.key(7), 60)
    for i, key in enumerate(keys):
        eps = [1e-3, 1e-2, 1e-1][i % 3]
        kl, kr = jax.random.split(key)
        q = p.with_values(
            p.left + eps * jax.random.normal(kl, p.left.shape),
            p.right + eps * jax.random.normal(kr, p.right.shape),
        )
        assert _projection_error(x, q) >= best * (1 - 1e-6), (i, eps)
    # and it beats any random Monarch of the same structure by far
    other = Monarch.init(jax.random.key(8), shape, nblocks=nblocks, block_rank=block_rank)
    assert _projection_error(x, other) > best


def test_projection_error_is_the_discarded_spectrum():
    shape, nb, g = (24, 32), 4, 2
    x = np.asarray(jax.random.normal(jax.random.key(9), shape), np.float64)
    _, err = Monarch.fromdense(
        jnp.asarray(x, jnp.float32), nblocks=nb, block_rank=g, return_error=True
    )
    s, p = shape[0] // nb, shape[1] // nb
    sv = np.linalg.svd(x.reshape(nb, s, nb, p).transpose(0, 2, 1, 3), compute_uv=False)
    expected = np.sqrt(np.sum(sv[..., g:] ** 2)) / np.linalg.norm(x)
    np.testing.assert_allclose(float(err), expected, rtol=1e-4)


def test_projection_full_rank_is_exact_and_jit():
    # block_rank >= min(s, p): every matrix is a Monarch (extra factors are zero).
    x = jax.random.normal(jax.random.key(10), (12, 8))
    p = jax.jit(lambda x: Monarch.fromdense(x, nblocks=2, block_rank=6))(x)
    assert p.block_rank == 6
    assert_close(p.todense(), x, jnp.float32, 8)


def test_init_is_norm_preserving():
    shape, nb = (32, 24), 4
    v = jax.random.normal(jax.random.key(11), (shape[1],))
    v = v / jnp.linalg.norm(v)
    keys = jax.random.split(jax.random.key(12), 1000)
    ws = jax.vmap(lambda k: Monarch.init(k, shape, nblocks=nb).todense())(keys)
    norms = jnp.sum(jnp.square(ws @ v), axis=-1)
    assert abs(float(jnp.mean(norms)) - 1.0) < 0.05
    var = float(jnp.var(ws))
    np.testing.assert_allclose(var, 1.0 / shape[0], rtol=0.05)  # lecun_normal's variance
    assert abs(float(jnp.mean(ws))) < 3e-3


def test_init_dtype_and_pytree():
    w = Monarch.init(jax.random.key(0), (32, 16), nblocks=4, dtype=jnp.bfloat16)
    assert w.dtype == jnp.bfloat16 and w.left.dtype == w.right.dtype == jnp.bfloat16
    leaves, tree = jax.tree_util.tree_flatten(w)
    assert len(leaves) == 2
    back = jax.tree_util.tree_unflatten(tree, leaves)
    assert back.shape == w.shape and back.nblocks == w.nblocks


def test_grad_is_a_monarch_and_matches_dense():
    w = Monarch.init(jax.random.key(13), (32, 48), nblocks=4)
    x = jax.random.normal(jax.random.key(14), (48, 3))
    g = jax.grad(lambda w: jnp.sum(jnp.sin(w @ x)))(w)
    assert type(g) is Monarch
    ref = jax.grad(lambda w: jnp.sum(jnp.sin(w.todense() @ x)))(w)
    assert_close(g.left, ref.left, jnp.float32, 48)
    assert_close(g.right, ref.right, jnp.float32, 48)


def test_jit_does_not_recompile():
    traces = []  # one entry per trace, hence per compilation

    def product(w, x):
        traces.append(None)
        return x @ w

    f = jax.jit(product)
    x = jnp.ones((3, 32))
    f(Monarch.init(jax.random.key(0), (32, 16), nblocks=4), x)
    f(Monarch.init(jax.random.key(1), (32, 16), nblocks=4), x)
    assert len(traces) == 1


def test_scale_and_astype():
    w = _random((32, 16), 4, None)
    assert_close((2.5 * w).todense(), 2.5 * w.todense(), jnp.float32)
    assert_close((-w).todense(), -w.todense(), jnp.float32)
    h = w.astype(jnp.bfloat16)
    assert h.dtype == jnp.bfloat16 and h.right.dtype == jnp.bfloat16


def test_auto_order():

    assert _random((64, 64), 8, None).auto_order("matmul")["default"][0] == "xla"
    assert _random((8, 12), 1, None).auto_order("matmul")["default"][0] == "dense"


# ------------------------------------------------------------------ bad input
def test_bad_nblocks_and_block_rank():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"nblocks=3 must be a positive divisor .* \(16, 12\)"):
        Monarch.init(key, (16, 12), nblocks=3)
    with pytest.raises(ValueError, match=r"nblocks=0"):
        Monarch.init(key, (16, 16), nblocks=0)
    with pytest.raises(TypeError, match="nblocks must be an int"):
        Monarch.init(key, (16, 16), nblocks=2.0)
    with pytest.raises(ValueError, match="block_rank must be >= 1"):
        Monarch.init(key, (16, 16), nblocks=4, block_rank=0)
    with pytest.raises(TypeError, match="block_rank must be an int"):
        Monarch.init(key, (16, 16), nblocks=4, block_rank=1.5)
    with pytest.raises(ValueError, match=r"shape must be 2-D, got \(16,\)"):
        Monarch.init(key, (16,), nblocks=4)
    with pytest.raises(TypeError, match="floating-point"):
        Monarch.init(key, (16, 16), nblocks=4, dtype=jnp.int32)
    with pytest.raises(ValueError, match=r"nblocks=5 .* \(20, 12\)"):
        Monarch.fromdense(jnp.ones((20, 12)), nblocks=5)
    with pytest.raises(ValueError, match=r"2-D array, got shape \(4,\)"):
        Monarch.fromdense(jnp.ones(4), nblocks=2)
    with pytest.raises(TypeError, match="floating-point"):
        Monarch.fromdense(jnp.ones((4, 4), jnp.int32), nblocks=2)


def test_bad_factors():
    with pytest.raises(ValueError, match=r"3-D.*got left \(2, 3\) and right \(2, 4, 4\)"):
        Monarch(jnp.ones((2, 3)), jnp.ones((2, 4, 4)))
    with pytest.raises(
        ValueError, match=r"nblocks=2 blocks, got left \(2, 3, 4\) and right \(3, 4, 5\)"
    ):
        Monarch(jnp.ones((2, 3, 4)), jnp.ones((3, 4, 5)))
    with pytest.raises(
        ValueError, match=r"middle sizes differ: left \(2, 3, 4\) .* right \(2, 6, 5\)"
    ):
        Monarch(jnp.ones((2, 3, 4)), jnp.ones((2, 6, 5)))
    with pytest.raises(ValueError, match=r"q=3 must be a positive multiple of nblocks=2"):
        Monarch(jnp.ones((2, 3, 3)), jnp.ones((2, 3, 5)))
    with pytest.raises(TypeError, match="share one dtype"):
        Monarch(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5), jnp.bfloat16))
    with pytest.raises(TypeError, match="floating-point"):
        Monarch(jnp.ones((2, 3, 4), jnp.int32), jnp.ones((2, 4, 5), jnp.int32))
    w = _random((16, 16), 4, None)
    with pytest.raises(ValueError, match=r"with_values: new left have shape"):
        w.with_values(jnp.ones((4, 4, 8)), jnp.ones((4, 8, 4)))
    with pytest.raises(TypeError, match="scaled by a scalar"):
        jsparse.scale(w, jnp.ones(3))


def test_bad_matmul_shapes():
    w = _random((32, 16), 4, None)
    with pytest.raises(ValueError, match=r"shapes \(32, 16\) and \(32, 2\) are not aligned"):
        w @ jnp.ones((32, 2))
    with pytest.raises(ValueError, match=r"shapes \(3, 16\) and \(32, 16\) are not aligned"):
        jnp.ones((3, 16)) @ w
