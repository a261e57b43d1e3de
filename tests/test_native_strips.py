"""The native BCSR kernels on strip blocks (1 x k, k x 1; jsparse_native/src/bcsr_strips.inc).

Strips run their own kernels (one output row per block-row: the row-strip product; one
row or column per block: the strip SDDMM). Every case runs on every instruction set
this CPU runs, with the strip kernels on and off (``jsparse_native.set_bcsr_strips``:
off, the general register tile), against a dense float64 reference: ``A @ X``,
``A.T @ X`` (the CSC walk), ``X @ A`` and the SDDMM, X widths across the vector and
panel tails, float32 and bfloat16, empty rows, empty and full patterns; then ``jit``,
``grad``, ``jvp`` and ``vmap`` against the ``"xla"`` implementation, and corrupted
indices under ``jit``.
"""

from __future__ import annotations

import contextlib
import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import jsparse
import jsparse_native
from jsparse.core import product
from jsparse.formats.bcsr.cpu import CPU_KERNELS

from native_cases import corrupted_bcsr_product
from oracle import assert_close, tolerance

ISAS = jsparse_native.supported_isas()
# X widths: scalars only, one vector and a tail, past one panel (AVX-512: 64 columns).
WIDTHS = (1, 7, 16, 33, 100)
STRIPS = [(1, 4), (1, 8), (1, 16), (1, 32), (4, 1), (8, 1), (16, 1), (32, 1)]
ODD = [(1, 3), (5, 1), (1, 1), (1, 17), (9, 1)]  # not multiples of any vector or tile


@contextlib.contextmanager
def _strips(on: bool):
    previous = jsparse_native.set_bcsr_strips(on)
    try:
        yield
    finally:
        jsparse_native.set_bcsr_strips(previous)


# One compilation per shape (eagerly, the derived CSC view compiles a dozen small ops).
_make_bcsr = jax.jit(lambda d, i, p, shape: jsparse.BCSR(d, i, p, shape=shape), static_argnums=3)


def _bcsr(rng, grid, block_shape, density, dtype, empty_rows=()):
    """A random BCSR on a ``grid`` of blocks (``empty_rows`` block-rows hold nothing) and
    its dense float64 matrix, built in numpy (``fromdense`` compiles per shape)."""
    (nbr, nbc), (bm, bn) = grid, block_shape
    mask = rng.random(grid) < density
    mask[list(empty_rows), :] = False
    rows, cols = np.nonzero(mask)  # row-major
    data = jax.device_put(rng.standard_normal((rows.size, bm, bn)).astype(dtype))
    indptr = np.searchsorted(rows, np.arange(nbr + 1)).astype(np.int32)
    indices = jax.device_put(cols.astype(np.int32))
    a = _make_bcsr(data, indices, jax.device_put(indptr), (nbr * bm, nbc * bn))
    dense = np.zeros((nbr, nbc, bm, bn))
    dense[rows, cols] = np.asarray(data).astype(np.float64)
    return a, dense.transpose(0, 2, 1, 3).reshape(nbr * bm, nbc * bn)


def _grid(block_shape):
    """About 40 x 40 elements, the strip's long side across few blocks, the other across
    a block count that is not a multiple of any register tile."""
    bm, bn = block_shape
    return (max(1, 37 // bm) + (bm > 1), max(1, 41 // bn) + (bn > 1))


def _products(a, xs, xts, us, vs):
    cfg, pat = a.kernel_config, a.pattern
    return [
        (
            product.spmm(CPU_KERNELS, cfg, False, a.data, pat, x),
            product.spmm(CPU_KERNELS, cfg, True, a.data, pat, xt),
            product.sample(CPU_KERNELS, cfg, pat, u, v),
        )
        for x, xt, u, v in zip(xs, xts, us, vs, strict=True)
    ]


_products_jit = jax.jit(_products)


def _close(actual, expected, dtype, k, err_msg):
    """``assert_close`` in numpy only (an eager jax conversion per shape would compile)."""
    actual = np.asarray(actual).astype(np.float32)
    np.testing.assert_allclose(actual, expected, err_msg=err_msg, **tolerance(dtype, k))


def _check_all(a, w, dtype, rng, widths=WIDTHS):
    """Every width, ISA and strips on / off against the float64 reference."""
    m, k = w.shape

    def operands(rows):  # numpy and device_put: jnp.asarray / astype compile per shape
        return [jax.device_put(rng.standard_normal((rows, n)).astype(dtype)) for n in widths]

    xs, xts, us, vs = operands(k), operands(m), operands(m), operands(k)
    f64 = [[np.asarray(t, np.float64) for t in ts] for ts in (xs, xts, us, vs)]
    bm, bn = a.block_shape
    rows, cols = np.asarray(a.row_ids), np.asarray(a.indices)

    def blocks(dense):  # the stored blocks of a dense matrix, (nse, bm, bn)
        grid = dense.reshape(m // bm, bm, k // bn, bn).transpose(0, 2, 1, 3)
        return grid[rows, cols]

    expected = [
        (w @ f64[0][i], w.T @ f64[1][i], blocks(f64[2][i] @ f64[3][i].T))
        for i in range(len(widths))
    ]
    for isa in ISAS:
        for on in (True, False):
            with jsparse_native.forced_isa(isa), _strips(on):
                results = _products_jit(a, xs, xts, us, vs)
            for i, (y, yt, s) in enumerate(results):
                where = f"{a.block_shape} width {widths[i]} on {isa}, strips {on}"
                assert y.dtype == yt.dtype == s.dtype == dtype
                _close(y, expected[i][0], dtype, k, err_msg=f"A @ X, {where}")
                _close(yt, expected[i][1], dtype, m, err_msg=f"A.T @ X, {where}")
                _close(s, expected[i][2], dtype, widths[i], err_msg=f"SDDMM, {where}")


@pytest.mark.parametrize(
    "block_shape,dtype",
    [(b, jnp.float32) for b in STRIPS + ODD]
    + [(b, jnp.bfloat16) for b in [(1, 16), (16, 1), (1, 3), (5, 1)]],
    ids=lambda p: f"{p[0]}x{p[1]}" if isinstance(p, tuple) else jnp.dtype(p).name,
)
def test_strip_products_match_dense(block_shape, dtype):
    rng = np.random.default_rng(100 * block_shape[0] + block_shape[1])
    grid = _grid(block_shape)
    empty = (0, grid[0] - 1) if grid[0] > 2 else (0,)
    a, w = _bcsr(rng, grid, block_shape, 0.4, dtype, empty_rows=empty)
    _check_all(a, w, dtype, rng, widths=WIDTHS if block_shape in STRIPS else (1, 7, 33))


@pytest.mark.parametrize("block_shape", [(1, 8), (8, 1), (1, 1)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("density", [0.0, 1.0], ids=["empty", "full"])
def test_empty_and_full_patterns(block_shape, density):
    rng = np.random.default_rng(1)
    a, w = _bcsr(rng, _grid(block_shape), block_shape, density, jnp.float32)
    assert a.nse == (0 if density == 0.0 else _grid(block_shape)[0] * _grid(block_shape)[1])
    _check_all(a, w, jnp.float32, rng, widths=(7, 33))


@pytest.mark.slow
@settings(
    max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    k=st.integers(1, 40),
    row=st.booleans(),
    blocks=st.integers(1, 9),
    density=st.sampled_from([0.0, 0.3, 1.0]),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_any_strip_matches_dense(k, row, blocks, density, n, seed):
    rng = np.random.default_rng(seed)
    block_shape = (1, k) if row else (k, 1)
    grid = (blocks, 3) if row else (3, blocks)
    a, w = _bcsr(rng, grid, block_shape, density, jnp.float32)
    _check_all(a, w, jnp.float32, rng, widths=(n,))


# ------------------------------------------------------------------ verbs
@pytest.mark.parametrize("block_shape", [(1, 16), (16, 1)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_jit_grad_jvp_vmap_against_xla(block_shape):
    rng = np.random.default_rng(2)
    a, w64 = _bcsr(rng, _grid(block_shape), block_shape, 0.5, jnp.float32, empty_rows=(1,))
    w = jnp.asarray(w64, jnp.float32)
    m, k = w.shape
    x = jnp.asarray(rng.standard_normal((k, 33)), jnp.float32)
    xl = jnp.asarray(rng.standard_normal((7, m)), jnp.float32)  # X @ A
    u = jnp.asarray(rng.standard_normal((m, 5)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((5, k)), jnp.float32)

    @functools.partial(jax.jit, static_argnums=0)
    def run(impl, a, x, xl, u, v):
        def f(a, x):
            return jsparse.matmul(a, x, impl=impl)

        def loss(a, x, xl):
            return jnp.sum(f(a, x) ** 2) + jnp.sum(jnp.sin(jsparse.matmul(xl, a, impl=impl)))

        grads = jax.grad(loss, argnums=(0, 1, 2), allow_int=True)(a, x, xl)
        _, tangent = jax.jvp(lambda x: f(a, x), (x,), (jnp.cos(x),))
        return (
            f(a, x),
            jsparse.matmul(xl, a, impl=impl),
            (grads[0].data, grads[1], grads[2]),
            tangent,
            jax.vmap(lambda x: f(a, x))(jnp.stack([x, 2 * x, -x])),
            jsparse.sddmm(u, v, a, impl=impl).data,
        )

    got = run("cpu", a, x, xl, u, v)
    want = run("xla", a, x, xl, u, v)
    y, left, (ga, gx, gxl), tangent, batched, sampled = got
    gw, gx_ref, gxl_ref = jax.grad(
        lambda w, x, xl: jnp.sum((w @ x) ** 2) + jnp.sum(jnp.sin(xl @ w)), argnums=(0, 1, 2)
    )(w, x, xl)
    dense = (
        w @ x,
        xl @ w,
        (None, gx_ref, gxl_ref),
        w @ jnp.cos(x),
        jnp.einsum("ik,bkn->bin", w, jnp.stack([x, 2 * x, -x])),
        None,
    )
    ks = (k, m, (2 * k, 2 * m, k), k, k, 5)
    # against the "xla" implementation and against dense references (the "xla" kernels
    # are not the oracle)
    for g, r, kk in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(ks),
                           strict=True):  # fmt: skip
        assert_close(g, r, jnp.float32, kk)
    for g, d, kk in [(y, dense[0], k), (left, dense[1], m), (gx, gx_ref, 2 * m),
                     (gxl, gxl_ref, k), (tangent, dense[3], k), (batched, dense[4], k)]:  # fmt: skip
        assert_close(g, d, jnp.float32, kk)
    assert_close(a.with_values(ga).todense(), gw * (w != 0), jnp.float32, 2 * k)
    assert_close(a.with_values(sampled).todense(), (u @ v) * (w != 0), jnp.float32, 5)


def test_bfloat16_verbs_against_xla():
    rng = np.random.default_rng(3)
    a, _ = _bcsr(rng, (3, 20), (16, 1), 0.5, jnp.bfloat16)  # 48 x 20
    x = jnp.asarray(rng.standard_normal((20, 40)), jnp.bfloat16)
    xl = jnp.asarray(rng.standard_normal((9, 48)), jnp.bfloat16)

    @jax.jit
    def run(a, x, xl):
        def loss(impl):
            return lambda a, x: jnp.sum(jsparse.matmul(a, x, impl=impl).astype(jnp.float32) ** 2)

        out = []
        for impl in ("cpu", "xla"):
            out.append(jsparse.matmul(a, x, impl=impl))
            out.append(jsparse.matmul(xl, a, impl=impl))
            out.append(jax.grad(loss(impl), argnums=1)(a, x))
        return out

    y, left, gx, ry, rleft, rgx = run(a, x, xl)
    assert y.dtype == ry.dtype == left.dtype == gx.dtype == jnp.bfloat16
    for got, want, k in [(y, ry, 20), (left, rleft, 48), (gx, rgx, 48)]:
        assert_close(got, want, jnp.bfloat16, k)


def test_thread_split_gives_the_same_result():
    rng = np.random.default_rng(5)
    a, _ = _bcsr(rng, (96, 12), (1, 16), 0.3, jnp.float32)  # 96 output rows
    x = jax.device_put(rng.standard_normal((192, 70)).astype(np.float32))
    f = jax.jit(lambda a, x: jsparse.matmul(a, x, impl="cpu"))
    previous = jsparse_native.set_max_threads(1)
    try:
        one = np.asarray(f(a, x))
        jsparse_native.set_max_threads(0)
        every = np.asarray(f(a, x))
    finally:
        jsparse_native.set_max_threads(previous)
    np.testing.assert_array_equal(one, every)  # rows are independent: no order changes


def test_strips_control():
    assert jsparse_native.set_bcsr_strips(True) is True  # the default
    with _strips(False):
        assert jsparse_native.set_bcsr_strips(False) is False
    with pytest.raises(ValueError, match="on must be a bool"):
        jsparse_native.set_bcsr_strips(1)


# ------------------------------------------------------------------ bounds safety
# 1 x 16 runs the strip kernel in A @ X (CSR indices), 16 x 1 in A.T @ X (the CSC view).
@pytest.mark.parametrize(
    "block_shape,field,edit,match",
    [
        ((1, 16), "indices", lambda t: t.at[0].set(10**6), "corrupted block index"),
        ((1, 16), "indices", lambda t: t.at[-1].set(-1), "corrupted block index"),
        ((1, 16), "indptr", lambda t: t.at[1].set(10**6), "corrupted block pointer"),
        ((1, 16), "row_ids", lambda t: t.at[0].set(-3), "corrupted block coordinates"),
        ((16, 1), "col_ptr", lambda t: t.at[-1].set(10**6), "corrupted block pointer"),
        ((16, 1), "col_order", lambda t: t.at[0].set(10**6), "corrupted block order"),
        ((16, 1), "col_order", lambda t: t.at[0].set(t[-1]), "transposed view disagrees"),
    ],
    ids=lambda p: f"{p[0]}x{p[1]}" if isinstance(p, tuple) else None,
)
def test_corrupted_indices_raise(block_shape, field, edit, match):
    a = jsparse.BCSR.random(jax.random.key(0), (32, 32), density=0.5, block_shape=block_shape)
    x = jnp.ones((32, 20))
    f = corrupted_bcsr_product(field)
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(f(a, x, edit(getattr(a.pattern, field))))
    ok = jax.block_until_ready(f(a, x, getattr(a.pattern, field)))  # the same compiled call
    assert np.all(np.isfinite(np.asarray(ok)))
