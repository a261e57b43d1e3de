"""Numerics that do not depend on the implementation (issue 16): non-finite dense
operands, N:M masks with NaN, zero-size dimensions, complex dtypes, host-only
functions under jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.core.nonfinite import nonfinite_part, stored_mask

KEY = jax.random.key(0)
ENTRYWISE = {
    "bcsr_1x1": lambda: jsparse.BCSR.random(KEY, (32, 32), density=0.1, block_shape=(1, 1)),
    "bcsr_8x8": lambda: jsparse.BCSR.random(KEY, (32, 32), density=0.5, block_shape=(8, 8)),
    "bcsr_4x4": lambda: jsparse.BCSR.random(KEY, (32, 32), density=0.3, block_shape=(4, 4)),
    "nm_axis1": lambda: jsparse.NM.random(KEY, (32, 32), n=2, m=4),
    "nm_axis0": lambda: jsparse.NM.random(KEY, (32, 32), n=2, m=4, axis=0),
}
FACTORED = {
    "monarch": lambda: jsparse.Monarch.init(KEY, (32, 32), nblocks=4),
    "lowrank": lambda: jsparse.LowRankSparse.random(
        KEY, (32, 32), rank=2, density=0.2, block_shape=(4, 4)
    ),
}


def stored_reference(a, x, transpose):
    """op(A) @ x over the stored entries only (the documented semantics)."""
    w, mask = a.todense(), stored_mask(a)
    if transpose:
        w, mask = w.T, mask.T
    return w @ jnp.where(jnp.isfinite(x), x, 0) + nonfinite_part(w, mask, x)


def product(a, x, impl, transpose):
    return jsparse.matmul(x.T, a, impl=impl).T if transpose else jsparse.matmul(a, x, impl=impl)


@pytest.mark.parametrize("value", [jnp.nan, jnp.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("ncols", [1, 3])
@pytest.mark.parametrize("transpose", [False, True], ids=["A@x", "x@A"])
@pytest.mark.parametrize("name", sorted(ENTRYWISE))
def test_nonfinite_operand_entrywise_formats(name, transpose, ncols, value):
    a = ENTRYWISE[name]()
    # ``value`` and -``value`` in two rows of x (an output both reach is NaN) and a NaN
    # in a third, in the last column.
    x = jnp.ones((32, ncols)).at[5, 0].set(value).at[20, 0].set(-value)
    x = x.at[9, ncols - 1].set(jnp.nan)
    ref = stored_reference(a, x, transpose)
    for impl in (*jsparse.implementations("matmul", type(a)), "auto"):
        y = product(a, x, impl, transpose)
        np.testing.assert_array_equal(np.isnan(y), np.isnan(ref), err_msg=impl)
        np.testing.assert_array_equal(np.isinf(y), np.isinf(ref), err_msg=impl)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5, err_msg=impl)


@pytest.mark.parametrize("value", [jnp.nan, jnp.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", sorted(FACTORED))
def test_nonfinite_operand_factored_formats(name, value):
    """Factored formats: the same non-finite outputs for every impl; NaN inputs give
    the same NaNs, an infinite one may give NaN where the dense form gives inf."""
    a = FACTORED[name]()
    x = jnp.ones((32, 2)).at[5, 0].set(value)
    ref = stored_reference(a, x, False)
    for impl in (*jsparse.implementations("matmul", type(a)), "auto"):
        y = jsparse.matmul(a, x, impl=impl)
        np.testing.assert_array_equal(np.isfinite(y), np.isfinite(ref), err_msg=impl)
        if np.isnan(value):
            np.testing.assert_array_equal(np.isnan(y), np.isnan(ref), err_msg=impl)
        fin = np.isfinite(ref)
        np.testing.assert_allclose(np.asarray(y)[fin], np.asarray(ref)[fin], rtol=1e-5, atol=1e-5)


def test_nonfinite_issue_repro_identity():
    x = jnp.ones(64).at[7].set(jnp.nan)
    for bs in [(1, 1), (8, 8)]:
        a = jsparse.BCSR.fromdense(jnp.eye(64), block_shape=bs)
        for impl in ("auto", "xla", "dense", "pallas"):
            y = jsparse.matmul(a, x, impl=impl)
            assert int(jnp.isnan(y).sum()) == (1 if bs == (1, 1) else 8), (bs, impl)


def test_finite_operand_unchanged_and_grad():
    a = ENTRYWISE["bcsr_8x8"]()
    x = jax.random.normal(KEY, (32, 3))
    y = jsparse.matmul(a, x, impl="dense")
    np.testing.assert_allclose(y, a.todense() @ x, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(jsparse.matmul(a, x, impl="dense") ** 2))(x)
    np.testing.assert_allclose(g, 2 * a.todense().T @ (a.todense() @ x), rtol=1e-4, atol=1e-4)
    yv = jax.vmap(lambda x: jsparse.matmul(a, x, impl="dense"))(x.T[:, :, None])
    np.testing.assert_allclose(yv[:, :, 0].T, a.todense() @ x, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ nm_mask and NaN
@pytest.mark.parametrize(
    "row",
    [[1, np.nan, 1, 1], [np.nan] * 4, [np.inf, np.nan, 1, np.inf], [0, np.inf, np.nan, -np.inf]],
)
@pytest.mark.parametrize("axis", [0, 1])
def test_nm_mask_nan_rule(row, axis):
    x = jnp.array([row] * 4, jnp.float32)
    x = x if axis == 1 else x.T
    mask = jsparse.nm_mask(x, 2, 4, axis=axis)
    assert int(jnp.moveaxis(mask, axis, -1).sum(-1).max()) == 2
    np.testing.assert_array_equal(mask, jsparse.NM.fromdense(x, n=2, m=4, axis=axis).mask())
    nans = jnp.moveaxis(jnp.isnan(x), axis, -1)[0]
    kept = jnp.moveaxis(mask, axis, -1)[0]
    assert bool(jnp.all(kept[:2]) if int(nans.sum()) >= 2 else jnp.all(kept[nans]))


def test_nm_mask_issue_repro_and_transposable():
    assert jsparse.nm_mask(jnp.array([[1, jnp.nan, 1, 1]]), 2, 4).tolist() == [
        [True, True, False, False]
    ]
    x = jnp.full((8, 8), jnp.nan)
    t = jsparse.nm_mask(x, 2, 4, transposable=True)
    assert int(t.sum(0).max()) <= 4 and int(t.reshape(8, 2, 4).sum(-1).max()) <= 2


# ------------------------------------------------------------------ zero-size dims
ZERO_MAKERS = {
    "bcsr": lambda s: jsparse.BCSR.fromdense(jnp.ones(s), block_shape=(2, 2)),
    "bcsr_random": lambda s: jsparse.BCSR.random(KEY, s, density=0.5, block_shape=(2, 2)),
    "nm_axis1": lambda s: jsparse.NM.fromdense(jnp.ones(s), n=2, m=4),
    "nm_axis0": lambda s: jsparse.NM.fromdense(jnp.ones(s), n=2, m=4, axis=0),
    "nm_random": lambda s: jsparse.NM.random(KEY, s, n=2, m=4),
    "lowrank": lambda s: jsparse.LowRankSparse.random(
        KEY, s, rank=0, density=0.5, block_shape=(2, 2)
    ),
}


@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (0, 0)])
@pytest.mark.parametrize("name", sorted(ZERO_MAKERS))
def test_zero_size_dimensions(name, shape):
    a = ZERO_MAKERS[name](shape)
    m, k = shape
    assert a.todense().shape == shape and a.T.todense().shape == shape[::-1]
    x = jnp.ones((k, 3))
    np.testing.assert_array_equal(a @ x, jnp.zeros((m, 3)))
    np.testing.assert_array_equal(jnp.ones((3, m)) @ a, jnp.zeros((3, k)))
    assert jax.jit(lambda a, x: a @ x)(a, x).shape == (m, 3)
    g = jax.grad(lambda x: jnp.sum(a @ x))(x)
    np.testing.assert_array_equal(g, jnp.zeros((k, 3)))


def test_zero_size_monarch_rejected_clearly():
    with pytest.raises(ValueError, match="Monarch needs both dimensions nonzero"):
        jsparse.Monarch.init(KEY, (0, 8), nblocks=2)
    with pytest.raises(ValueError, match="Monarch needs both dimensions nonzero"):
        jsparse.Monarch.fromdense(jnp.ones((8, 0)), nblocks=2)


# ------------------------------------------------------------------ complex dtypes
COMPLEX_BUILDERS = {
    "bcsr_fromdense": lambda: jsparse.BCSR.fromdense(jnp.eye(4, dtype=jnp.complex64)),
    "bcsr_astype": lambda: jsparse.BCSR.fromdense(jnp.eye(4)).astype(jnp.complex64),
    "bcsr_init": lambda: jsparse.BCSR(
        jnp.ones((1, 1, 1), jnp.complex64), [0], [0, 1], shape=(1, 1)
    ),
    "bcsr_random": lambda: jsparse.BCSR.random(KEY, (4, 4), density=0.5, dtype=jnp.complex64),
    "bcsr_scipy": lambda: jsparse.BCSR.from_scipy(
        __import__("scipy.sparse").sparse.eye(4, dtype=np.complex64, format="csr")
    ),
    "nm_fromdense": lambda: jsparse.NM.fromdense(jnp.ones((4, 4), jnp.complex64)),
    "nm_astype": lambda: jsparse.NM.fromdense(jnp.ones((4, 4))).astype(jnp.complex64),
    "monarch_fromdense": lambda: jsparse.Monarch.fromdense(
        jnp.eye(4, dtype=jnp.complex64), nblocks=2
    ),
    "monarch_astype": lambda: jsparse.Monarch.init(KEY, (4, 4), nblocks=2).astype(jnp.complex64),
    "lowrank_fromdense": lambda: jsparse.LowRankSparse.fromdense(
        jnp.eye(4, dtype=jnp.complex64), rank=1, nse=1
    ),
    "lowrank_astype": lambda: jsparse.LowRankSparse.random(KEY, (4, 4), rank=1, density=0.5).astype(
        jnp.complex64
    ),
    "with_values": lambda: jsparse.BCSR.eye(2).with_values(jnp.ones((2, 1, 1), jnp.complex64)),
}


@pytest.mark.parametrize("name", sorted(COMPLEX_BUILDERS))
def test_complex_rejected_at_construction(name):
    with pytest.raises(TypeError, match="complex"):
        COMPLEX_BUILDERS[name]()


def test_complex_dense_operand_rejected():
    with pytest.raises(TypeError, match="complex64"):
        jsparse.BCSR.eye(2) @ jnp.ones(2, jnp.complex64)
    with pytest.raises(TypeError, match="complex64"):
        jnp.ones(2, jnp.complex64) @ jsparse.BCSR.eye(2)


# ------------------------------------------------------------------ host-only under jit
def test_host_only_functions_under_jit_are_clear():
    from jax.experimental import sparse

    b = sparse.BCOO.fromdense(jnp.eye(4))
    with pytest.raises(ValueError, match="from_bcoo needs concrete arrays"):
        jax.jit(lambda b: jsparse.BCSR.from_bcoo(b).data)(b)
    with pytest.raises(ValueError, match="nse=None needs a concrete x"):
        jax.jit(lambda x: jsparse.BCSR.fromdense(x).data)(jnp.eye(4))
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(lambda a: a.to_scipy())(jsparse.BCSR.eye(4))
    for a in (jsparse.NM.fromdense(jnp.ones((4, 4))), jsparse.Monarch.init(KEY, (4, 4), nblocks=2)):
        with pytest.raises(ValueError, match="outside jit"):
            jax.jit(lambda a: a.to_scipy())(a)
    with pytest.raises(ValueError, match="concrete pattern"):
        jax.jit(lambda a: a.block_rows(0, 1).data)(jsparse.BCSR.eye(4))
