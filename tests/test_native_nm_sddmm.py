"""The native N:M SDDMM (``jsparse_nm_sddmm``: the values' gradient of an N:M product,
``(U @ V.T)`` at the stored positions) against a dense numpy reference and the ``"xla"``
sample: every n:m, both grouped axes, contraction lengths around every vector width,
float32 and bfloat16, every instruction set this CPU runs, chunk and block boundaries,
``jit`` / ``vmap`` / ``grad`` / ``jvp``, ``jsparse.sddmm``, NaN reach, corrupted
positions under ``jit``, the thread split and the shape checks of the handler.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
import jsparse_native
from jsparse.core import product
from jsparse.formats.nm.cpu import CPU_KERNELS
from jsparse.formats.nm.xla import XLA_KERNELS

from oracle import assert_close

ISAS = jsparse_native.supported_isas()
_CONFIGS = [(1, 2), (2, 4), (1, 4), (2, 8), (4, 8), (3, 8)]
_WIDTHS = (1, 2, 7, 16, 33, 100)


def _pattern(rng, n, m, axis, groups, other, dtype=jnp.float32):
    shape = (groups * m, other) if axis == 0 else (other, groups * m)
    dense = rng.standard_normal(shape)
    a = jsparse.NM.fromdense(jnp.asarray(dense, dtype), n=n, m=m, axis=axis)
    return a


def _reference(a, u, v):
    """(u @ v.T) at a's stored positions, values-shaped, in float64 (numpy only)."""
    dense = np.asarray(u, np.float64) @ np.asarray(v, np.float64).T
    pos = np.asarray(a.unpacked_positions, np.int64)
    n, m = a.n, a.m
    if a.axis == 1:
        rows = np.arange(pos.shape[0])[:, None]
        cols = np.arange(pos.shape[1])[None, :] // n * m + pos
    else:
        rows = np.arange(pos.shape[0])[:, None] // n * m + pos
        cols = np.arange(pos.shape[1])[None, :]
    return dense[rows, cols]


def _sample(kernels):
    return jax.jit(lambda a, u, v, p: product.sample(kernels, a.kernel_config, p, u, v))


_cpu = _sample(CPU_KERNELS)
_xla = _sample(XLA_KERNELS)


def _operands(rng, a, k, dtype):
    rows, cols = a.shape
    u = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    v = jnp.asarray(rng.standard_normal((cols, k)), dtype)
    return u, v


@contextlib.contextmanager
def _blocking(kc, rows):
    old = jsparse_native.set_nm_sddmm_blocking(kc, rows)
    try:
        yield
    finally:
        jsparse_native.set_nm_sddmm_blocking(*old)


def _check_every_isa(a, u, v, dtype, k, msg=""):
    want = _reference(a, u, v)
    for isa in ISAS:
        with jsparse_native.forced_isa(isa):
            got = _cpu(a, u, v, a.positions)
        assert got.dtype == dtype and got.shape == a.values.shape
        assert_close(got, want, dtype, k, err_msg=f"{msg} {isa}")


@pytest.mark.parametrize("nm", _CONFIGS, ids=lambda nm: f"{nm[0]}of{nm[1]}")
@pytest.mark.parametrize("axis", [0, 1])
def test_matches_dense_float32(nm, axis):
    n, m = nm
    rng = np.random.default_rng(0)
    # 9 groups (not a multiple of any tile) by 37 rows of the other operand (a packed
    # sub-block of 32 rows and a tail; two vectors of positions and a scalar tail).
    a = _pattern(rng, n, m, axis, 9, 37)
    # Every width for 2:4 (the 32-value permute at k = 1) and 3:8 (groups across
    # vectors); the vector tail widths (7, 100) and k = 1, 16 for the rest.
    for k in _WIDTHS if nm in ((2, 4), (3, 8)) else (1, 7, 16, 100):
        u, v = _operands(rng, a, k, jnp.float32)
        _check_every_isa(a, u, v, jnp.float32, k, f"{n}:{m} axis {axis} K {k}")


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (3, 8)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
@pytest.mark.parametrize("axis", [0, 1])
def test_matches_dense_bfloat16(nm, axis):
    n, m = nm
    rng = np.random.default_rng(1)
    a = _pattern(rng, n, m, axis, 9, 37, jnp.bfloat16)
    for k in (1, 7, 33):
        u, v = _operands(rng, a, k, jnp.bfloat16)
        _check_every_isa(a, u, v, jnp.bfloat16, k, f"{n}:{m} axis {axis} K {k}")


@pytest.mark.parametrize("axis", [0, 1])
def test_chunk_and_block_boundaries(axis):
    """Small blocking: many contraction chunks (one a partial vector) and group blocks
    (the last one partial) per call; then the default blocking for a long contraction."""
    rng = np.random.default_rng(2)
    a = _pattern(rng, 2, 4, axis, 21, 40)
    u, v = _operands(rng, a, 75, jnp.float32)
    with _blocking(16, 12):
        _check_every_isa(a, u, v, jnp.float32, 75, "blocks of 3 groups, chunks of 16")
    with _blocking(0, 0):
        b = _pattern(rng, 3, 8, axis, 5, 33)
        u, v = _operands(rng, b, 1100, jnp.float32)
        _check_every_isa(b, u, v, jnp.float32, 1100, "3:8, K 1100")


@pytest.mark.parametrize("axis", [0, 1])
def test_equals_the_xla_sample_and_the_sddmm_verb(axis):
    rng = np.random.default_rng(3)
    a = _pattern(rng, 2, 4, axis, 8, 20)
    for k in (1, 16):
        u, v = _operands(rng, a, k, jnp.float32)
        want = _xla(a, u, v, a.positions)
        assert_close(_cpu(a, u, v, a.positions), want, jnp.float32, k)
        # jsparse.sddmm(x, y, pattern): (x @ y) at the pattern, x (rows, K), y (K, cols).
        got = jax.jit(lambda a, x, y: jsparse.sddmm(x, y, a, impl="cpu"))(a, u, v.T)
        ref = jsparse.sddmm(u, v.T, a, impl="xla")
        assert isinstance(got, jsparse.NM)
        assert_close(got.values, ref.values, jnp.float32, k)
        assert_close(got.values, _reference(a, u, v), jnp.float32, k)
    assert "cpu" in jsparse.implementations("sddmm", jsparse.NM)
    text = jax.jit(lambda a, x, y: jsparse.sddmm(x, y, a, impl="cpu")).lower(a, u, v.T).as_text()
    assert "jsparse_nm_sddmm" in text


@pytest.mark.parametrize("axis", [0, 1])
def test_gradient_jvp_vmap_through_cpu(axis):
    """The values' gradient of matmul(impl="cpu") runs the native SDDMM and equals the
    "xla" implementation's and the dense gradient at the stored entries."""
    a = jsparse.NM.random(jax.random.key(0), (16, 32), n=2, m=4, axis=axis)
    mask = a.todense() != 0
    for k in (1, 9):
        x = jax.random.normal(jax.random.key(k), (32, k))

        def loss(values, x, impl):
            return jnp.sum(jnp.sin(jsparse.matmul(a.with_values(values), x, impl=impl)))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
        assert "jsparse_nm_sddmm" in grad.lower(a.values, x, "cpu").as_text()
        gv, gx = grad(a.values, x, "cpu")
        if k > 1:
            gv_xla, gx_xla = grad(a.values, x, "xla")
            assert_close(gv, gv_xla, jnp.float32, k)
            assert_close(gx, gx_xla, jnp.float32, 16)
        gw = jax.grad(lambda w, x: jnp.sum(jnp.sin(w @ x)))(a.todense(), x)
        assert_close(a.with_values(gv).todense(), gw * mask, jnp.float32, k)
    # jvp of the sample in both operands; vmap over u (a loop of native calls).
    u = jax.random.normal(jax.random.key(5), (16, 9))
    v = jax.random.normal(jax.random.key(6), (32, 9))
    du, dv = jnp.ones_like(u), jnp.cos(v)

    def f(u, v):
        return product.sample(CPU_KERNELS, a.kernel_config, a.positions, u, v)

    out, tangent = jax.jvp(f, (u, v), (du, dv))
    assert_close(out, _reference(a, u, v), jnp.float32, 9)
    assert_close(tangent, _reference(a, du, v) + _reference(a, u, dv), jnp.float32, 18)
    us = jax.random.normal(jax.random.key(7), (3, 16, 9))
    got = jax.jit(jax.vmap(lambda u: f(u, v)))(us)
    for i in range(3):
        assert_close(got[i], _reference(a, us[i], v), jnp.float32, 9)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("k", [1, 17])
def test_nan_reaches_only_entries_that_select_it(axis, k):
    """A NaN in a row of the grouped operand reaches exactly the stored entries whose
    position selects that row (as in the "xla" sample); the rest stay finite."""
    rng = np.random.default_rng(4)
    a = _pattern(rng, 2, 4, axis, 6, 19)
    u, v = _operands(rng, a, k, jnp.float32)
    if axis == 1:
        v = v.at[1].set(jnp.nan)  # dense column 1 of the pattern
    else:
        u = u.at[1].set(jnp.nan)  # dense row 1
    pos = np.asarray(a.unpacked_positions)  # entries of group 0 at position 1 select it
    if axis == 1:
        hit = (np.arange(pos.shape[1])[None, :] // 2 == 0) & (pos == 1)
    else:
        hit = (np.arange(pos.shape[0])[:, None] // 2 == 0) & (pos == 1)
    assert hit.any() and (~hit).any()
    for isa in ISAS:
        with jsparse_native.forced_isa(isa):
            got = np.asarray(_cpu(a, u, v, a.positions))
        np.testing.assert_array_equal(np.isnan(got), hit, err_msg=isa)
    np.testing.assert_array_equal(np.isnan(np.asarray(_xla(a, u, v, a.positions))), hit)


def _corrupt(a, kind):
    """Packed positions with the first byte of row 0 corrupted."""
    byte = {"decreasing": 0b00_01_01_00, "repeated": 0b11_10_01_01, "out_of_range": 0b11}[kind]
    return a.positions.at[0, 0].set(jnp.uint8(byte))


@pytest.mark.parametrize("kind", ["decreasing", "repeated", "out_of_range"])
@pytest.mark.parametrize("axis", [0, 1])
def test_corrupted_positions_raise(kind, axis):
    n, m = (1, 3) if kind == "out_of_range" else (2, 4)
    rng = np.random.default_rng(5)
    a = _pattern(rng, n, m, axis, 8, 16)
    bad = _corrupt(a, kind)
    for k in (1, 17):
        u, v = _operands(rng, a, k, jnp.float32)
        for isa in ISAS:
            with jsparse_native.forced_isa(isa):
                with pytest.raises(Exception, match="corrupted N:M positions"):
                    jax.block_until_ready(_cpu(a, u, v, bad))
                ok = _cpu(a, u, v, a.positions)
            assert_close(ok, _reference(a, u, v), jnp.float32, k, err_msg=f"{isa} K {k}")


@pytest.mark.parametrize("axis", [0, 1])
def test_threads_give_identical_results(axis):
    rng = np.random.default_rng(6)
    a = _pattern(rng, 2, 4, axis, 16, 160)  # 2 work items (128 rows each), one per thread
    for k in (1, 40):
        u, v = _operands(rng, a, k, jnp.float32)
        many = np.asarray(_cpu(a, u, v, a.positions))
        previous = jsparse_native.set_max_threads(1)
        try:
            one = np.asarray(_cpu(a, u, v, a.positions))
            assert jsparse_native.last_threads() == 1
        finally:
            jsparse_native.set_max_threads(previous)
        np.testing.assert_array_equal(many, one)


def test_empty_contraction_and_empty_pattern():
    a = jsparse.NM.random(jax.random.key(0), (8, 16), n=2, m=4)
    u, v = jnp.ones((8, 0)), jnp.ones((16, 0))
    np.testing.assert_array_equal(_cpu(a, u, v, a.positions), np.zeros(a.values.shape))
    empty = jsparse.NM.fromdense(jnp.zeros((0, 16)), n=2, m=4)
    assert _cpu(empty, jnp.ones((0, 3)), jnp.ones((16, 3)), empty.positions).shape == (0, 8)


def test_handler_checks_shapes_and_dtypes():
    a = jsparse.NM.random(jax.random.key(0), (8, 16), n=2, m=4)
    call = jax.ffi.ffi_call("jsparse_nm_sddmm", jax.ShapeDtypeStruct((8, 8), jnp.float32))
    with pytest.raises(Exception, match="u or v has the wrong shape"):
        call(jnp.ones((8, 3)), jnp.ones((12, 3)), a.positions, n=2, m=4, axis=1)
    with pytest.raises(Exception, match="u and v differ in width"):
        call(jnp.ones((8, 3)), jnp.ones((16, 2)), a.positions, n=2, m=4, axis=1)
    with pytest.raises(Exception, match="packed positions of the wrong shape"):
        call(jnp.ones((8, 3)), jnp.ones((16, 3)), a.positions[:4], n=2, m=4, axis=1)
    with pytest.raises(Exception, match="share one dtype"):
        call(jnp.ones((8, 3)), jnp.ones((16, 3), jnp.bfloat16), a.positions, n=2, m=4, axis=1)
    with pytest.raises(Exception, match="bad n, m or axis"):
        call(jnp.ones((8, 3)), jnp.ones((16, 3)), a.positions, n=4, m=4, axis=1)


def test_unsupported_dtype_is_declined():
    a = jsparse.NM.random(jax.random.key(0), (8, 16), n=2, m=4)
    x, y = jnp.ones((8, 3), jnp.float16), jnp.ones((3, 16), jnp.float16)
    with pytest.raises(ValueError, match="float16"):
        jsparse.sddmm(x, y, a, impl="cpu")


def test_blocking_control_rejects_bad_values():
    with pytest.raises(ValueError, match="kc must be an int >= 0"):
        jsparse_native.set_nm_sddmm_blocking(-1, 0)
    with pytest.raises(ValueError, match="rows must be an int >= 0"):
        jsparse_native.set_nm_sddmm_blocking(0, 1.5)
