"""BCSR-specific behaviour: construction, validation, errors, sddmm, elementwise ops,
interop with scipy.sparse and jax.experimental.sparse, and property-based checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import jsparse
from jsparse import BCSR

from oracle import assert_close


def _random_blocky(rng, shape, block_shape, density):
    """A dense matrix whose nonzero blocks are a random ``density`` fraction."""
    bm, bn = block_shape
    mask = rng.random((shape[0] // bm, shape[1] // bn)) < density
    dense = rng.standard_normal(shape).astype(np.float32)
    return dense * np.kron(mask, np.ones(block_shape, bool))


# ---------------------------------------------------------------- construction
def test_fromdense_stores_nonzero_blocks():
    x = np.zeros((6, 8), np.float32)
    x[0, 5] = 1.0  # block (0, 2) with 2x2 blocks
    x[5, 0] = 2.0  # block (2, 0)
    a = BCSR.fromdense(x, block_shape=(2, 2))
    assert a.nse == 2
    np.testing.assert_array_equal(a.indices, [2, 0])
    np.testing.assert_array_equal(a.indptr, [0, 1, 1, 2])
    np.testing.assert_array_equal(a.todense(), x)
    assert a.density == 2 / 12


def test_fromdense_nse_keeps_largest_blocks_and_pads_under_jit():
    x = np.zeros((4, 4), np.float32)
    x[0:2, 2:4] = 3.0  # largest block (0, 1)
    x[2:4, 0:2] = 1.0  # block (1, 0)
    f = jax.jit(lambda x: BCSR.fromdense(x, block_shape=(2, 2), nse=1))
    a = f(x)
    assert a.nse == 1
    np.testing.assert_array_equal(a.indices, [1])
    np.testing.assert_array_equal(a.indptr, [0, 1, 1])
    # more blocks than nonzeros: zero blocks pad, positions stay valid and unique
    b = jax.jit(lambda x: BCSR.fromdense(x, block_shape=(2, 2), nse=3))(x)
    b.validate()
    assert b.nse == 3
    np.testing.assert_array_equal(b.todense(), x)


def test_fromdense_nse_matches_numpy_topk():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 48)).astype(np.float32)
    a = BCSR.fromdense(x, block_shape=(8, 8), nse=7)
    norms = (x.reshape(4, 8, 6, 8) ** 2).sum(axis=(1, 3))
    expected = np.sort(np.argsort(-norms.ravel(), kind="stable")[:7])
    got = np.asarray(a.row_ids) * 6 + np.asarray(a.indices)
    np.testing.assert_array_equal(got, expected)


def test_random_density_and_dtype():
    a = BCSR.random(
        jax.random.key(0), (64, 32), density=0.25, block_shape=(8, 4), dtype=jnp.bfloat16
    )
    assert a.nse == round(0.25 * 8 * 8) and a.dtype == jnp.bfloat16
    a.validate()
    # 16 bf16 blocks of 8x4 (1024 B); int32 indices, row_ids, col_order (3 x 64 B);
    # indptr and col_ptr over 8 block-rows / block-columns (2 x 36 B).
    assert a.nbytes == 1024 + 3 * 64 + 2 * 36


def test_transpose_under_jit():
    a = BCSR.random(jax.random.key(1), (12, 20), density=0.4, block_shape=(3, 4))
    t = jax.jit(lambda a: a.T)(a)
    t.validate()
    assert t.block_shape == (4, 3)
    np.testing.assert_array_equal(t.todense(), a.todense().T)


def test_pytree_structure_and_key_paths():
    a = BCSR.random(jax.random.key(2), (8, 8), density=0.5, block_shape=(2, 2))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]
    assert paths == [".data", ".indices", ".indptr", ".row_ids", ".col_ptr", ".col_order"]
    assert "BCSR(shape=(8, 8)" in repr(a)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(block_shape=(3, 2)),
            ValueError,
            r"block_shape \(3, 2\) does not divide the shape \(8, 6\)",
        ),
        (dict(block_shape=(0, 2)), ValueError, "must be positive"),
        (dict(block_shape=(2,)), TypeError, "pair of ints"),
        (dict(block_shape=(2, 2), nse=13), ValueError, r"nse must be in \[0, 12\]"),
    ],
)
def test_fromdense_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        BCSR.fromdense(jnp.ones((8, 6)), **kwargs)


def test_fromdense_type_and_trace_errors():
    with pytest.raises(TypeError, match="floating-point"):
        BCSR.fromdense(jnp.ones((4, 4), jnp.int32))
    with pytest.raises(ValueError, match="2-D"):
        BCSR.fromdense(jnp.ones((4,)))
    with pytest.raises(ValueError, match="nse=None needs a concrete x"):
        jax.jit(lambda x: BCSR.fromdense(x))(jnp.ones((4, 4)))
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
        BCSR.random(jax.random.key(0), (4, 4), density=1.5)


def _parts():
    data = np.ones((3, 2, 2), np.float32)
    return data, np.array([0, 2, 1], np.int32), np.array([0, 2, 3], np.int32)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(indices=np.array([0, 3, 1])), ValueError, r"block-columns in \[0, 3\).*found 3"),
        (dict(indices=np.array([0, -1, 1])), ValueError, "found -1"),
        (dict(indptr=np.array([0, 3, 2])), ValueError, "end at nse=3"),
        (dict(indptr=np.array([1, 2, 3])), ValueError, "start at 0"),
        (
            dict(indptr=np.array([0, 2, 1, 3])),
            ValueError,
            r"indptr must have shape \(M // bm \+ 1,\) = \(3,\)",
        ),
        (
            dict(indices=np.array([2, 0, 1])),
            ValueError,
            "strictly increasing within each block-row",
        ),
        (dict(indices=np.array([0, 0, 1])), ValueError, "no duplicates"),
        (dict(indices=np.array([0.0, 2.0, 1.0])), TypeError, "integer dtype"),
        (dict(data=np.ones((3, 2, 2), np.int32)), TypeError, "floating-point dtype, got int32"),
        (dict(data=np.ones((3, 4))), ValueError, r"data must have shape \(nse, bm, bn\)"),
        (dict(indices=np.array([0, 2])), ValueError, r"indices must have shape \(nse,\) = \(3,\)"),
        (dict(shape=(4, 5)), ValueError, r"block_shape \(2, 2\) does not divide"),
    ],
)
def test_constructor_validation(change, error, match):
    data, indices, indptr = _parts()
    kwargs = dict(data=data, indices=indices, indptr=indptr, shape=(4, 6))
    kwargs.update(change)
    shape = kwargs.pop("shape")
    with pytest.raises(error, match=match):
        BCSR(**kwargs, shape=shape)


def test_non_decreasing_indptr_error():
    data = np.ones((2, 1, 1), np.float32)
    with pytest.raises(ValueError, match="non-decreasing"):
        BCSR(data, np.array([0, 0]), np.array([0, 2, 1, 2]), shape=(3, 1))


def test_validate_catches_corruption_made_without_validation():
    a = BCSR.random(jax.random.key(3), (8, 8), density=0.5, block_shape=(2, 2))
    bad = a._replace(indices=a.indices.at[0].set(99))
    with pytest.raises(ValueError, match="found 99"):
        bad.validate()


def test_valid_under_jit_and_empty():
    data, indices, indptr = _parts()
    a = jax.jit(lambda d, i, p: BCSR(d, i, p, shape=(4, 6)))(data, indices, indptr)
    np.testing.assert_array_equal(a.todense()[:2, 4:], 1.0)
    empty = BCSR(
        np.zeros((0, 2, 2), np.float32), np.zeros(0, np.int32), np.zeros(3, np.int32), shape=(4, 6)
    )
    np.testing.assert_array_equal(empty @ jnp.ones((6, 2)), np.zeros((4, 2)))


def test_matmul_errors():
    a = BCSR.random(jax.random.key(4), (8, 6), density=0.5, block_shape=(2, 2))
    with pytest.raises(ValueError, match=r"shapes \(8, 6\) and \(5, 3\) are not aligned"):
        a @ jnp.ones((5, 3))
    with pytest.raises(ValueError, match=r"shapes \(3, 6\) and \(8, 6\) are not aligned"):
        jnp.ones((3, 6)) @ a
    with pytest.raises(TypeError, match="sparse @ sparse"):
        a @ a.T
    with pytest.raises(ValueError, match="impl must be one of"):
        jsparse.matmul(a, jnp.ones((6,)), impl="cuda")
    with pytest.raises(TypeError, match="real floating point"):
        a @ jnp.ones((6,), jnp.complex64)
    with pytest.raises(ValueError, match="at least 1 dimension"):
        a @ jnp.float32(1.0)


def test_integer_dense_operand_is_promoted():
    a = BCSR.random(jax.random.key(5), (4, 6), density=0.5, block_shape=(2, 2))
    y = a @ jnp.arange(6)
    assert y.dtype == jnp.float32
    assert_close(y, a.todense() @ jnp.arange(6.0), jnp.float32, 6)


def test_mixed_dtypes_promote():
    a = BCSR.random(jax.random.key(6), (4, 6), density=0.5, block_shape=(2, 2), dtype=jnp.bfloat16)
    y = a @ jnp.ones((6, 2), jnp.float32)
    assert y.dtype == jnp.float32


# ---------------------------------------------------------------- auto impl
def test_auto_picks_dense_for_dense_patterns():

    dense = BCSR.random(jax.random.key(7), (64, 64), density=0.6, block_shape=(32, 32))
    sparse = BCSR.random(jax.random.key(7), (320, 320), density=0.1, block_shape=(32, 32))
    assert dense.auto_order("matmul")["default"][0] == "dense"
    assert sparse.auto_order("matmul")["default"][0] != "dense"


# ---------------------------------------------------------------- sddmm
@pytest.mark.parametrize("block_shape", [(1, 1), (4, 2), (32, 32)])
def test_sddmm_matches_masked_dense(block_shape):
    m, k, j = 64, 32, 5
    pattern = BCSR.random(jax.random.key(8), (m, k), density=0.3, block_shape=block_shape)
    x = jax.random.normal(jax.random.key(9), (m, j))
    y = jax.random.normal(jax.random.key(10), (j, k))
    out = jax.jit(jsparse.sddmm)(x, y, pattern)
    assert isinstance(out, BCSR) and out.nse == pattern.nse
    np.testing.assert_array_equal(out.indices, pattern.indices)
    mask = pattern.with_values(jnp.ones_like(pattern.data)).todense()
    assert_close(out.todense(), (x @ y) * mask, jnp.float32, j)

    # gradients with respect to both dense factors
    w = jax.random.normal(jax.random.key(11), (m, k))

    def f(x, y):
        return jnp.sum(jsparse.sddmm(x, y, pattern).todense() * w)

    def f_dense(x, y):
        return jnp.sum((x @ y) * mask * w)

    for g, g_ref in zip(jax.grad(f, (0, 1))(x, y), jax.grad(f_dense, (0, 1))(x, y), strict=True):
        assert_close(g, g_ref, jnp.float32, k)


def test_sddmm_errors():
    pattern = BCSR.random(jax.random.key(12), (8, 6), density=0.5, block_shape=(2, 2))
    with pytest.raises(ValueError, match=r"x \(8, 3\) @ y \(4, 6\) does not match"):
        jsparse.sddmm(jnp.ones((8, 3)), jnp.ones((4, 6)), pattern)
    with pytest.raises(ValueError, match=r"pattern's shape \(8, 6\)"):
        jsparse.sddmm(jnp.ones((8, 3)), jnp.ones((3, 4)), pattern)
    with pytest.raises(TypeError, match="must be a jsparse format"):
        jsparse.sddmm(jnp.ones((8, 3)), jnp.ones((3, 6)), jnp.ones((8, 6)))


# ---------------------------------------------------------------- elementwise
def test_scale_map_add():
    a = BCSR.random(jax.random.key(13), (8, 6), density=0.5, block_shape=(2, 2))
    d = a.todense()
    np.testing.assert_allclose((2.0 * a).todense(), 2.0 * d)
    np.testing.assert_allclose((a * 3).todense(), 3 * d)
    np.testing.assert_allclose((a / 4).todense(), d / 4)
    np.testing.assert_allclose((-a).todense(), -d)
    np.testing.assert_allclose(jsparse.map_values(jax.nn.relu, a).todense(), jax.nn.relu(d))
    np.testing.assert_allclose((a + a * 2).todense(), 3 * d, rtol=1e-6)
    np.testing.assert_allclose((a - a).todense(), 0 * d)
    # under jit, the same pattern arrays can be added
    np.testing.assert_allclose(jax.jit(lambda a: a + a)(a).todense(), 2 * d)
    with pytest.raises(ValueError, match="zero-preserving"):
        jsparse.map_values(jnp.cos, a)
    with pytest.raises(ValueError, match="the matrix's shape"):
        a * jnp.ones(3)  # A * dense needs a dense array of A's shape (tests/test_user_ops.py)
    other = BCSR.random(jax.random.key(14), (8, 6), density=0.5, block_shape=(2, 2))
    with pytest.raises(ValueError, match="same pattern"):
        a + other.with_values(other.data)  # same nse, different pattern
    # under jit, separate arguments are compared when the program runs
    np.testing.assert_allclose(jax.jit(lambda a, b: a + b)(a, a).todense(), 2 * d)
    with pytest.raises(ValueError, match="shapes differ"):
        a + BCSR.random(jax.random.key(14), (6, 8), density=0.5, block_shape=(2, 2))
    with pytest.raises(ValueError, match="with_values: new data have shape"):
        a.with_values(jnp.ones((1, 2, 2)))


# ---------------------------------------------------------------- interop
@pytest.mark.parametrize("block_shape", [(1, 1), (2, 3), (4, 4)])
def test_scipy_round_trip_and_matmul(block_shape):
    rng = np.random.default_rng(15)
    x = _random_blocky(rng, (16, 24), block_shape, 0.4)
    a = BCSR.fromdense(x, block_shape=block_shape)
    bsr = a.to_scipy()
    assert bsr.format == "bsr" and bsr.blocksize == block_shape
    np.testing.assert_array_equal(bsr.toarray(), x)
    np.testing.assert_array_equal(a.to_scipy("csr").toarray(), x)
    back = BCSR.from_scipy(bsr)
    assert back.block_shape == block_shape
    np.testing.assert_array_equal(back.todense(), x)
    # a CSR with duplicates and unsorted entries, blocked on import
    coo = sp.coo_array(x)
    dup = sp.csr_array(
        (
            np.concatenate([coo.data, coo.data]),
            (np.concatenate([coo.row, coo.row]), np.concatenate([coo.col, coo.col])),
        ),
        shape=x.shape,
    )
    c = BCSR.from_scipy(dup, block_shape=block_shape)
    np.testing.assert_allclose(c.todense(), 2 * x)
    # products agree with scipy
    v = rng.standard_normal((24, 3)).astype(np.float32)
    assert_close(a @ v, bsr @ v, jnp.float32, 24)
    w = rng.standard_normal((2, 16)).astype(np.float32)
    assert_close(w @ a, (bsr.T @ w.T).T, jnp.float32, 16)


def test_scipy_errors():
    with pytest.raises(TypeError, match="scipy.sparse"):
        BCSR.from_scipy(np.ones((2, 2)))
    a = BCSR.random(jax.random.key(16), (4, 4), density=0.5)
    with pytest.raises(ValueError, match="format must be"):
        a.to_scipy("coo")


def test_bcoo_round_trip():
    from jax.experimental import sparse as jsp

    rng = np.random.default_rng(17)
    x = _random_blocky(rng, (12, 8), (1, 1), 0.3)
    b = jsp.BCOO.fromdense(x)
    a = BCSR.from_bcoo(b, block_shape=(3, 2))
    np.testing.assert_array_equal(a.todense(), x)
    c = a.to_bcoo()
    np.testing.assert_array_equal(c.todense(), x)
    np.testing.assert_array_equal(jax.jit(lambda a: a.to_bcoo().todense())(a), x)
    # BCOO padding entries (index == shape) are dropped
    padded = jsp.BCOO.fromdense(x, nse=int((x != 0).sum()) + 3)
    np.testing.assert_array_equal(BCSR.from_bcoo(padded).todense(), x)
    with pytest.raises(ValueError, match="without batch or dense dims"):
        BCSR.from_bcoo(jsp.BCOO.fromdense(np.ones((2, 3, 4), np.float32), n_batch=1))
    with pytest.raises(TypeError, match="expects a BCOO"):
        BCSR.from_bcoo(x)


# ---------------------------------------------------------------- properties
@st.composite
def _matrices(draw):
    bm = draw(st.sampled_from([1, 2, 3, 4]))
    bn = draw(st.sampled_from([1, 2, 5]))
    nbr = draw(st.integers(1, 5))
    nbc = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["random", "zero", "full", "empty_rows"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    shape = (nbr * bm, nbc * bn)
    if kind == "zero":
        x = np.zeros(shape, np.float32)
    elif kind == "full":
        x = rng.standard_normal(shape).astype(np.float32) + 5.0
    else:
        x = _random_blocky(rng, shape, (bm, bn), draw(st.floats(0.05, 0.9)))
        if kind == "empty_rows":
            x[: bm * ((nbr + 1) // 2)] = 0.0
    return x, (bm, bn), rng


@settings(max_examples=8, deadline=None)  # each example compiles for its own shapes
@given(_matrices())
def test_property_roundtrip_matmul_transpose(case):
    x, block_shape, rng = case
    a = BCSR.fromdense(x, block_shape=block_shape)
    a.validate()
    np.testing.assert_array_equal(a.todense(), x)
    np.testing.assert_array_equal(a.T.todense(), x.T)
    v = rng.standard_normal((x.shape[1], 2)).astype(np.float32)
    w = rng.standard_normal((3, x.shape[0])).astype(np.float32)
    assert_close(a @ v, x @ v, jnp.float32, x.shape[1])
    assert_close(w @ a, w @ x, jnp.float32, x.shape[0])
    np.testing.assert_array_equal(a.to_scipy().toarray(), x)
    s = sp.csr_array(x)
    assert_close(a @ v, s @ v, jnp.float32, x.shape[1])
    nse = int(rng.integers(0, a._grid[0] * a._grid[1] + 1))
    b = BCSR.fromdense(x, block_shape=block_shape, nse=nse)
    b.validate()
    assert b.nse == nse
