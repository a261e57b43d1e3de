"""The native N:M pruning (``jsparse_nm_prune``, ``NM.fromdense(impl="cpu")``) against
the ``"xla"`` pruning (``lax.top_k``) and a numpy reference: every n:m with m <= 16 (the
unrolled group lengths and the generic one), both grouped axes, widths around the tile
of 16 lanes, float32 and bfloat16, NaN / infinity / signed zeros / ties, every
instruction set this CPU runs, the keep mask, ``jit`` / ``vmap`` / ``grad`` / ``jvp``,
the fallback for m > 16 and the handler's checks. Then :func:`sr_ste_matmul` and
``SRSTELinear``'s N:M path against the masked dense product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import jsparse
import jsparse_native
from jsparse.formats.nm.matrix import prune
from jsparse.formats.nm.xla import gather
from jsparse.nn import SRSTELinear
from jsparse.nn.sr_ste_linear import sr_ste_masked, sr_ste_matmul

ISAS = jsparse_native.supported_isas()
_CONFIGS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (2, 16), (7, 16), (2, 6), (5, 12)]


def _reference(x: np.ndarray, n: int, m: int, axis: int):
    """(values, unpacked positions, mask) in numpy: per group, the n largest |x| (NaN
    above everything, ties to the lower position), in increasing position."""
    xt = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    g = xt.reshape(*xt.shape[:-1], -1, m)
    key = np.where(np.isnan(g), np.inf, np.abs(g))
    nan = np.isnan(g)
    # Rank by (NaN first, magnitude descending, position ascending).
    idx = np.empty(g.shape[:-1] + (n,), np.int64)
    for flat in np.ndindex(g.shape[:-1]):
        ranked = sorted(range(m), key=lambda j: (not nan[flat][j], -key[flat][j], j))
        idx[flat] = sorted(ranked[:n])
    vals = np.take_along_axis(g, idx, axis=-1)
    mask = np.zeros(g.shape, bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    shape = (*xt.shape[:-1], xt.shape[-1] // m * n)
    vals = np.moveaxis(vals.reshape(shape), -1, axis)
    pos = np.moveaxis(idx.reshape(shape), -1, axis)
    mask = np.moveaxis(mask.reshape(xt.shape), -1, axis)
    return vals, pos, mask


def _special(rng, shape, dtype):
    """Normal entries with ties, NaN, infinities and signed zeros sprinkled in."""
    x = rng.standard_normal(shape)
    x[rng.random(shape) < 0.08] = np.nan
    x[rng.random(shape) < 0.05] = np.inf
    x[rng.random(shape) < 0.05] = -np.inf
    x[rng.random(shape) < 0.08] = 0.0
    x[rng.random(shape) < 0.08] = -0.0
    x[rng.random(shape) < 0.1] = 1.5  # ties
    x[rng.random(shape) < 0.1] = -1.5
    return jnp.asarray(x, dtype)


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def _check(x, n, m, axis, msg=""):
    want_v, want_p, want_mask = _reference(np.asarray(x, np.float32), n, m, axis)
    ref, ref_mask = prune(x, n=n, m=m, axis=axis, impl="xla", with_mask=True)
    for isa in ISAS:
        with jsparse_native.forced_isa(isa):
            got, mask = jax.jit(
                lambda x: prune(x, n=n, m=m, axis=axis, impl="cpu", with_mask=True)
            )(x)
        where = f"{msg} {n}:{m} axis {axis} {x.dtype} {x.shape} {isa}"
        assert got.dtype == x.dtype and got.values.shape == ref.values.shape, where
        # Bit-identical to the XLA pruning (the same entries, NaN payloads and zero
        # signs included) and to the numpy reference's choice.
        np.testing.assert_array_equal(_bits(got.values), _bits(ref.values), err_msg=where)
        np.testing.assert_array_equal(got.positions, ref.positions, err_msg=where)
        np.testing.assert_array_equal(got.unpacked_positions, want_p, err_msg=where)
        np.testing.assert_array_equal(mask, want_mask, err_msg=where)
        np.testing.assert_array_equal(ref_mask, want_mask, err_msg=where)
        np.testing.assert_array_equal(
            np.asarray(got.values, np.float32), want_v.astype(np.float32), err_msg=where
        )


@pytest.mark.parametrize("nm", _CONFIGS, ids=lambda nm: f"{nm[0]}of{nm[1]}")
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_matches_the_xla_pruning_and_numpy(nm, axis, dtype):
    n, m = nm
    rng = np.random.default_rng(m * 10 + n)
    # Groups per item across the 16-lane tile: one partial tile; two whole tiles and a
    # tail.
    for lanes in (3, 37):
        shape = (m * 3, lanes) if axis == 0 else (5, m * lanes)
        _check(_special(rng, shape, dtype), n, m, axis)


@settings(max_examples=12, deadline=None)
@given(
    nm=st.sampled_from(_CONFIGS),
    axis=st.sampled_from([0, 1]),
    groups=st.integers(1, 6),
    other=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_shapes(nm, axis, groups, other, seed):
    n, m = nm
    shape = (groups * m, other) if axis == 0 else (other, groups * m)
    _check(_special(np.random.default_rng(seed), shape, jnp.float32), n, m, axis, "hypothesis")


def test_all_equal_groups_keep_the_first_positions():
    a = jsparse.NM.fromdense(jnp.ones((8, 8)), n=3, m=4, axis=1, impl="cpu")
    np.testing.assert_array_equal(a.unpacked_positions, np.tile([0, 1, 2], (8, 2)))
    a = jsparse.NM.fromdense(-jnp.ones((8, 8)), n=3, m=4, axis=0, impl="cpu")
    np.testing.assert_array_equal(a.unpacked_positions, np.tile([[0], [1], [2]], (2, 8)))


def test_threads_give_identical_results():
    x = _special(np.random.default_rng(5), (256, 96), jnp.float32)
    old = jsparse_native.set_max_threads(1)
    try:
        one = jsparse.NM.fromdense(x, n=2, m=4, axis=0, impl="cpu")
    finally:
        jsparse_native.set_max_threads(old)
    many = jsparse.NM.fromdense(x, n=2, m=4, axis=0, impl="cpu")
    np.testing.assert_array_equal(_bits(one.values), _bits(many.values))
    np.testing.assert_array_equal(one.positions, many.positions)


def test_auto_prunes_natively_on_cpu_and_falls_back_for_long_groups():
    x = jnp.ones((16, 64))
    text = jax.jit(lambda x: jsparse.NM.fromdense(x).values).lower(x).as_text()
    assert "jsparse_nm_prune" in text
    text = jax.jit(lambda x: jsparse.NM.fromdense(x, n=2, m=32).values).lower(x).as_text()
    assert "jsparse_nm_prune" not in text
    with pytest.raises(ValueError, match="m <= 16, got m=32"):
        jsparse.NM.fromdense(x, n=2, m=32, impl="cpu")
    with pytest.raises(ValueError, match="float16"):
        jsparse.NM.fromdense(x.astype(jnp.float16), impl="cpu")
    with pytest.raises(TypeError, match="impl must be a string"):
        jsparse.NM.fromdense(x, impl=None)


@pytest.mark.parametrize("axis", [0, 1])
def test_grad_jvp_vmap(axis):
    x = jax.random.normal(jax.random.key(0), (8, 16))

    def values(x, impl):
        return jsparse.NM.fromdense(x, n=2, m=4, axis=axis, impl=impl).values

    f = lambda x: jnp.sum(jnp.sin(values(x, "cpu")))  # noqa: E731
    g = jax.grad(f)(x)
    np.testing.assert_allclose(g, jax.grad(lambda x: jnp.sum(jnp.sin(values(x, "xla"))))(x))
    mask = prune(x, n=2, m=4, axis=axis, with_mask=True)[1]
    assert bool(jnp.all(jnp.where(mask, True, g == 0)))  # pruned entries get no gradient
    t = jax.random.normal(jax.random.key(1), x.shape)
    _, tan = jax.jvp(lambda x: values(x, "cpu"), (x,), (t,))
    a = jsparse.NM.fromdense(x, n=2, m=4, axis=axis, impl="xla")
    np.testing.assert_array_equal(tan, gather(a, t))  # t at the kept entries
    np.testing.assert_allclose(tan, jax.jvp(lambda x: values(x, "xla"), (x,), (t,))[1])
    xs = jnp.stack([x, -2 * x, x[::-1]])
    got = jax.vmap(lambda x: values(x, "cpu"))(xs)
    for i in range(3):
        np.testing.assert_array_equal(got[i], values(xs[i], "xla"))


def test_handler_checks_shapes_and_dtypes():
    def call(x, vshape, pshape, kshape, n=2, m=4, axis=0, vdtype=jnp.float32):
        outs = (
            jax.ShapeDtypeStruct(vshape, vdtype),
            jax.ShapeDtypeStruct(pshape, jnp.uint8),
            jax.ShapeDtypeStruct(kshape, jnp.bool_),
        )
        return jax.ffi.ffi_call("jsparse_nm_prune", outs)(x, n=n, m=m, axis=axis)

    x = jnp.ones((8, 6))
    call(x, (4, 6), (4, 2), (8, 6))  # well formed
    call(x, (4, 6), (4, 2), (0, 0))  # without the mask
    with pytest.raises(Exception, match="values of the wrong shape"):
        call(x, (4, 5), (4, 2), (0, 0))
    with pytest.raises(Exception, match="packed positions of the wrong shape"):
        call(x, (4, 6), (4, 1), (0, 0))
    with pytest.raises(Exception, match="keep mask must be shaped like x"):
        call(x, (4, 6), (4, 2), (8, 5))
    with pytest.raises(Exception, match="m does not divide"):
        call(jnp.ones((6, 6)), (3, 6), (3, 2), (0, 0))
    with pytest.raises(Exception, match="bad n, m or axis"):
        call(x, (4, 6), (4, 2), (0, 0), m=32)
    with pytest.raises(Exception, match="differ in dtype"):
        call(x, (4, 6), (4, 2), (0, 0), vdtype=jnp.bfloat16)
    with pytest.raises(Exception, match="float32 or bfloat16"):
        call(x.astype(jnp.float16), (4, 6), (4, 2), (0, 0), vdtype=jnp.float16)


# ------------------------------------------------------------------ SR-STE's N:M path
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_sr_ste_matmul_matches_the_masked_dense_product(dtype):
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, 64), dtype)
    w = jax.random.normal(kw, (64, 24), dtype)
    dy = jax.random.normal(kd, (3, 5, 24), dtype)
    decay = 0.5  # large, so that the decay term is visible against the rounding
    for impl in ("cpu", "xla", "auto"):
        y, vjp = jax.vjp(lambda x, w, i=impl: sr_ste_matmul(x, w, 2, 4, decay, i), x, w)
        y0, vjp0 = jax.vjp(lambda x, w: x @ sr_ste_masked(w, 2, 4, decay), x, w)
        tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == jnp.float32 else {"atol": 0.1, "rtol": 0.03}
        assert y.dtype == dtype
        np.testing.assert_allclose(np.float32(y), np.float32(y0), **tol)
        for got, want in zip(vjp(dy), vjp0(dy), strict=True):
            assert got.dtype == want.dtype
            np.testing.assert_allclose(np.float32(got), np.float32(want), **tol)


def test_sr_ste_linear_picks_the_nm_products_on_cpu():
    linear = nnx.Linear(32, 12, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 32))

    def loss(layer, x):
        return jnp.sum(jnp.sin(layer(x)))

    dense = SRSTELinear(linear, impl="dense")
    want_y = dense(x)
    want_g = nnx.grad(loss, argnums=(0, 1))(dense, x)
    for impl in ("auto", "cpu", "xla"):
        layer = SRSTELinear(linear, impl=impl)
        np.testing.assert_allclose(layer(x), want_y, atol=1e-5)
        g, gx = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, x)
        np.testing.assert_allclose(g.kernel[...], want_g[0].kernel[...], atol=1e-5)
        np.testing.assert_allclose(g.bias[...], want_g[0].bias[...], atol=1e-5)
        np.testing.assert_allclose(gx, want_g[1], atol=1e-5)
    text = jax.jit(lambda x: SRSTELinear(linear)(x)).lower(x).as_text()
    assert "jsparse_nm_prune" in text and "jsparse_nm_spmm" in text
    text = jax.jit(lambda x: SRSTELinear(linear, impl="dense")(x)).lower(x).as_text()
    assert "jsparse_nm_" not in text
    # A custom dot_general keeps the dense product under "auto".
    custom = nnx.Linear(
        32, 12, rngs=nnx.Rngs(0), dot_general=lambda *a, **k: jax.lax.dot_general(*a, **k)
    )
    text = jax.jit(lambda x: SRSTELinear(custom)(x)).lower(x).as_text()
    assert "jsparse_nm_" not in text
    with pytest.raises(TypeError, match="impl must be a string"):
        SRSTELinear(linear, impl=3)
