"""The native CPU kernels (``impl="cpu"``, jsparse_native) against dense references.

Every op also runs through ``impl="cpu"`` in the shared oracle suite
(tests/test_oracle.py iterates over the registered implementations); this file covers
what is particular to the native kernels: every instruction set this CPU runs, block
shapes that are not multiples of the register tiles, empty rows and patterns, bounds
checks on corrupted indices under ``jit``, the thread split, the ``auto`` choice and
the fallback without the extension.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import warnings

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import jsparse
import jsparse_native
from jsparse.core import product
from jsparse.formats.bcsr import cpu as bcsr_cpu
from jsparse.formats.bcsr.cpu import CPU_KERNELS
from jsparse.formats.nm.cpu import CPU_KERNELS as NM_KERNELS

from native_cases import corrupted_bcsr_product
from oracle import assert_close

ISAS = jsparse_native.supported_isas()


def _cpu_has(flag: str) -> bool:
    """Whether /proc/cpuinfo lists ``flag`` (False where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


# Where the pattern-bucket kernel (2:4 W @ X across the groups) can run: AVX-512 with
# VBMI and VBMI2.
BUCKET_CPU = "avx512" in ISAS and _cpu_has("avx512vbmi") and _cpu_has("avx512_vbmi2")


def test_extension_is_built_and_registered():
    assert jsparse_native.available(), jsparse_native.load_error()
    assert jsparse_native.isa() in ISAS
    assert "cpu" in jsparse.implementations("matmul", jsparse.BCSR)
    assert "cpu" in jsparse.implementations("sddmm", jsparse.BCSR)
    assert "cpu" in jsparse.implementations("matmul", jsparse.NM)


def _bcsr(rng, grid, block_shape, density, dtype, empty_rows=()):
    """A random BCSR on a ``grid`` of blocks; ``empty_rows`` block-rows hold nothing."""
    nbr, nbc = grid
    bm, bn = block_shape
    mask = rng.random(grid) < density
    mask[list(empty_rows), :] = False
    dense = rng.standard_normal((nbr * bm, nbc * bn)).astype(np.float32)
    dense *= np.kron(mask, np.ones(block_shape, np.float32))
    a = jsparse.BCSR.fromdense(jnp.asarray(dense, dtype), block_shape=block_shape)
    return a, np.asarray(a.todense(), np.float64)


def _products(a, x, xt, u, v):
    cfg, pat = a.kernel_config, a.pattern
    return (
        product.spmm(CPU_KERNELS, cfg, False, a.data, pat, x),
        product.spmm(CPU_KERNELS, cfg, True, a.data, pat, xt),
        product.sample(CPU_KERNELS, cfg, pat, u, v),
    )


_products_jit = jax.jit(_products)


@pytest.mark.slow
@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    bm=st.sampled_from([1, 2, 3, 8, 9, 16, 17, 32]),
    bn=st.sampled_from([1, 2, 5, 8, 16, 33]),
    grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    density=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    n=st.sampled_from([1, 3, 8, 16, 37, 64]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    empty_first=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernels_match_dense_on_every_isa(bm, bn, grid, density, n, dtype, empty_first, seed):
    rng = np.random.default_rng(seed)
    a, w = _bcsr(rng, grid, (bm, bn), density, dtype, empty_rows=(0,) if empty_first else ())
    m, k = w.shape

    def operand(rows, cols):
        return jnp.asarray(rng.standard_normal((rows, cols)), dtype)

    x, xt, u, v = operand(k, n), operand(m, n), operand(m, n), operand(k, n)
    f64 = [np.asarray(t, np.float64) for t in (x, xt, u, v)]
    expected = (w @ f64[0], w.T @ f64[1], (f64[2] @ f64[3].T) * (w != 0))
    for isa in ISAS:
        with jsparse_native.forced_isa(isa):
            y, yt, s = _products_jit(a, x, xt, u, v)
        assert y.dtype == yt.dtype == s.dtype == dtype
        assert_close(y, expected[0], dtype, k, err_msg=f"A @ X on {isa}")
        assert_close(yt, expected[1], dtype, m, err_msg=f"A.T @ X on {isa}")
        # The SDDMM at the stored blocks, scattered back to a dense matrix.
        dense_s = np.asarray(a.with_values(s.astype(jnp.float32)).todense(), np.float64)
        assert_close(dense_s, expected[2], dtype, n, err_msg=f"SDDMM on {isa}")


def test_wide_operand_covers_every_tile_path():
    """Widths past one register panel and a column tail, on every ISA, both orientations."""
    rng = np.random.default_rng(0)
    a, w = _bcsr(rng, (3, 2), (16, 32), 0.6, jnp.float32, empty_rows=(1,))
    x = jnp.asarray(rng.standard_normal((64, 211)), jnp.float32)
    xt = jnp.asarray(rng.standard_normal((48, 211)), jnp.float32)
    for isa in ISAS:
        with jsparse_native.forced_isa(isa):
            y, yt, _ = _products_jit(a, x, xt, xt, x)
        assert_close(y, w @ np.asarray(x, np.float64), jnp.float32, 64, err_msg=isa)
        assert_close(yt, w.T @ np.asarray(xt, np.float64), jnp.float32, 48, err_msg=isa)


def test_verbs_jit_grad_jvp_vmap_through_cpu():
    a = jsparse.BCSR.random(jax.random.key(0), (48, 32), density=0.4, block_shape=(8, 16))
    x = jax.random.normal(jax.random.key(1), (32, 5))
    w = a.todense()

    def f(a, x):
        return jsparse.matmul(a, x, impl="cpu")

    assert_close(jax.jit(f)(a, x), w @ x, jnp.float32, 32)
    ga, gx = jax.grad(lambda a, x: jnp.sum(f(a, x) ** 2), argnums=(0, 1), allow_int=True)(a, x)
    gw, gx_ref = jax.grad(lambda w, x: jnp.sum((w @ x) ** 2), argnums=(0, 1))(w, x)
    assert_close(a.with_values(ga.data).todense(), gw * (w != 0), jnp.float32, 48)
    assert_close(gx, gx_ref, jnp.float32, 48)
    _, tangent = jax.jvp(lambda x: f(a, x), (x,), (jnp.ones_like(x),))
    assert_close(tangent, w @ jnp.ones_like(x), jnp.float32, 32)
    xs = jax.random.normal(jax.random.key(2), (3, 32, 4))
    assert_close(jax.vmap(lambda x: f(a, x))(xs), jnp.einsum("ik,bkn->bin", w, xs), jnp.float32, 32)
    u, v = (
        jax.random.normal(jax.random.key(3), (48, 6)),
        jax.random.normal(jax.random.key(4), (6, 32)),
    )
    out = jsparse.sddmm(u, v, a, impl="cpu")
    assert_close(out.todense(), (u @ v) * (w != 0), jnp.float32, 6)


def test_new_pattern_does_not_recompile():
    traces = []  # one entry per trace, hence per compilation

    def product(a, x):
        traces.append(None)
        return jsparse.matmul(a, x, impl="cpu")

    f = jax.jit(product)
    x = jnp.ones((32, 3))
    for seed in range(3):
        a = jsparse.BCSR.random(jax.random.key(seed), (32, 32), density=0.5, block_shape=(8, 8))
        assert_close(f(a, x), a.todense() @ x, jnp.float32, 32)
    assert len(traces) == 1


def test_auto_picks_the_native_kernels_on_cpu():
    a = jsparse.BCSR.random(jax.random.key(0), (64, 64), density=0.1, block_shape=(16, 16))
    x = jnp.ones((64, 8))
    hlo = jax.jit(lambda a, x: a @ x).lower(a, x).as_text()
    assert "jsparse_bcsr_spmm" in hlo
    grad_hlo = jax.jit(jax.grad(lambda a: jnp.sum(a @ x), allow_int=True)).lower(a).as_text()
    assert "jsparse_bcsr_sddmm" in grad_hlo
    with jax.enable_x64(True):  # float64 is not native: auto takes "xla"
        a64 = a.astype(jnp.float64)
        assert "jsparse_bcsr" not in jax.jit(lambda a, x: a @ x).lower(a64, x).as_text()
        with pytest.raises(ValueError, match="float32 or bfloat16, got float64"):
            jsparse.matmul(a64, x, impl="cpu")


# ------------------------------------------------------------------ bounds safety
@pytest.mark.parametrize(
    "field,edit,match",
    [
        ("indices", lambda t: t.at[0].set(10**6), "corrupted block index"),
        ("indices", lambda t: t.at[-1].set(-1), "corrupted block index"),
        ("indptr", lambda t: t.at[1].set(10**6), "corrupted block pointer"),
        ("indptr", lambda t: t.at[1].set(-5), "corrupted block pointer"),
        ("col_ptr", lambda t: t.at[-1].set(10**6), "corrupted block pointer"),
        ("col_order", lambda t: t.at[0].set(10**6), "corrupted block order"),
        ("col_order", lambda t: t.at[0].set(t[-1]), "transposed view disagrees"),
        ("row_ids", lambda t: t.at[0].set(-3), "corrupted block coordinates"),
    ],
)
def test_corrupted_indices_raise_instead_of_reading_out_of_bounds(field, edit, match):
    a = jsparse.BCSR.random(jax.random.key(0), (32, 32), density=0.5, block_shape=(8, 8))
    x = jnp.ones((32, 4))
    f = corrupted_bcsr_product(field)
    bad = edit(getattr(a.pattern, field))
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(f(a, x, bad))
    # the same compiled function runs the intact pattern
    ok = jax.block_until_ready(f(a, x, getattr(a.pattern, field)))
    assert np.all(np.isfinite(np.asarray(ok)))


# ------------------------------------------------------------------ threads, ISA controls
def test_thread_split_gives_the_same_result():
    a = jsparse.BCSR.random(jax.random.key(0), (256, 256), density=0.3, block_shape=(16, 16))
    x = jax.random.normal(jax.random.key(1), (256, 64))
    f = jax.jit(lambda a, x: jsparse.matmul(a, x, impl="cpu"))
    previous = jsparse_native.set_max_threads(1)
    try:
        one = np.asarray(f(a, x))
        assert jsparse_native.last_threads() == 1
        jsparse_native.set_max_threads(0)
        all_threads = np.asarray(f(a, x))
        assert jsparse_native.last_threads() >= 1
    finally:
        jsparse_native.set_max_threads(previous)
    np.testing.assert_array_equal(one, all_threads)  # the split never changes a sum's order


# Run in a fresh process, so that the output is the process's first 32 MiB allocation:
# freshly mapped memory that no earlier call advised (in a process that has run other
# tests, the allocator may hand back memory an earlier output's advice still marks).
# Prints the output's address and size, the bounds and flags of the mapping that holds
# its middle, and the product's largest error against dense.
_HUGE_PAGES_PROBE = """
import json, sys
import jax, numpy as np
import jsparse, jsparse_native
jsparse_native.set_huge_pages(sys.argv[1] == "on")
a = jsparse.NM.random(jax.random.key(0), (8192, 64), n=2, m=4, axis=1)
x = jax.random.normal(jax.random.key(1), (64, 1024))
y = jax.jit(lambda a, x: jsparse.matmul(a, x, impl="cpu"))(a, x).block_until_ready()
first, size = y.unsafe_buffer_pointer(), y.nbytes
middle = first + size // 2
with open("/proc/self/smaps") as f:
    lines = f.read().splitlines()
for i, line in enumerate(lines):
    head = line.split(maxsplit=1)[0]
    if "-" in head and not head.endswith(":"):
        lo, hi = (int(h, 16) for h in head.split("-"))
        if lo <= middle < hi:
            flags = next(l for l in lines[i + 1 :] if l.startswith("VmFlags:")).split()[1:]
            break
expected = np.asarray(a.todense(), np.float64) @ np.asarray(x, np.float64)
error = float(np.max(np.abs(np.asarray(y, np.float64) - expected)))
print(json.dumps(dict(first=first, size=size, start=lo, end=hi, flags=flags, error=error)))
"""


@pytest.mark.skipif(
    not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"),
    reason="transparent huge pages are a Linux feature",
)
@pytest.mark.parametrize("on", [True, False])
def test_large_outputs_are_advised_onto_huge_pages(on):
    # With the advice on, the mapping that holds the middle of a fresh 32 MiB output
    # carries the huge-page advice ("hg") and lies inside the output on 2 MiB boundaries
    # (nothing outside the buffer is advised); with it off, no advice.
    proc = subprocess.run(
        [sys.executable, "-c", _HUGE_PAGES_PROBE, "on" if on else "off"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    first, size, start, end = got["first"], got["size"], got["start"], got["end"]
    assert size == 32 << 20
    assert got["error"] < 1e-3
    if on:
        assert "hg" in got["flags"]
        assert first <= start and end <= first + size
        assert start % (2 << 20) == 0 and end % (2 << 20) == 0
    else:
        assert "hg" not in got["flags"]
    with pytest.raises(ValueError, match="on must be a bool"):
        jsparse_native.set_huge_pages(1)


def test_isa_controls_reject_bad_names():
    with pytest.raises(ValueError, match="isa must be one of"):
        jsparse_native.set_isa("sse9")
    with pytest.raises(ValueError, match="n must be an int"):
        jsparse_native.set_max_threads(-1)
    assert jsparse_native.best_isa() == ISAS[-1]


def test_missing_extension_falls_back_to_xla_with_one_warning(monkeypatch):
    monkeypatch.setattr(jsparse_native, "available", lambda: False)
    monkeypatch.setattr(jsparse_native, "load_error", lambda: "not built (test)")
    monkeypatch.setattr(bcsr_cpu, "_WARNED", False)
    a = jsparse.BCSR.random(jax.random.key(0), (16, 16), density=0.5, block_shape=(4, 4))
    x = jnp.ones((16, 2))
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable"):
        y = jsparse.matmul(a, x, impl="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jsparse.matmul(a, 2 * x, impl="cpu")  # no second warning
    assert (
        "jsparse_bcsr"
        not in jax.jit(lambda a, x: jsparse.matmul(a, x, impl="cpu")).lower(a, x).as_text()
    )
    assert_close(y, a.todense() @ x, jnp.float32, 16)


# ------------------------------------------------------------------ N:M
def _nm(rng, n, m, axis, groups, other, dtype):
    shape = (groups * m, other) if axis == 0 else (other, groups * m)
    dense = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    a = jsparse.NM.fromdense(dense.astype(dtype), n=n, m=m, axis=axis)
    return a, np.asarray(a.todense(), np.float64)


def _nm_products(a, x, xt):
    cfg = a.kernel_config
    return (
        product.spmm(NM_KERNELS, cfg, False, a.values, a.positions, x),
        product.spmm(NM_KERNELS, cfg, True, a.values, a.positions, xt),
    )


_nm_products_jit = jax.jit(_nm_products)


@pytest.mark.slow
@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (5, 8), (3, 5), (4, 16), (7, 20)]),
    axis=st.sampled_from([0, 1]),
    groups=st.integers(1, 5),
    other=st.sampled_from([1, 3, 8, 17]),
    ncols=st.sampled_from([1, 2, 16, 37, 64]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_nm_products_match_dense_on_every_isa(nm, axis, groups, other, ncols, dtype, seed):
    n, m = nm
    rng = np.random.default_rng(seed)
    a, w = _nm(rng, n, m, axis, groups, other, dtype)
    rows, cols = w.shape
    x = jnp.asarray(rng.standard_normal((cols, ncols)), dtype)
    xt = jnp.asarray(rng.standard_normal((rows, ncols)), dtype)
    for isa in ISAS:
        with jsparse_native.forced_isa(isa):
            y, yt = _nm_products_jit(a, x, xt)
        assert y.dtype == yt.dtype == dtype
        assert_close(y, w @ np.asarray(x, np.float64), dtype, cols, err_msg=f"W @ X on {isa}")
        assert_close(yt, w.T @ np.asarray(xt, np.float64), dtype, rows, err_msg=f"W.T @ X {isa}")


def test_nm_grad_and_vmap_through_cpu():
    a = jsparse.NM.random(jax.random.key(0), (8, 16), n=2, m=4, axis=1)
    x = jax.random.normal(jax.random.key(1), (16, 3))
    w = a.todense()
    f = lambda a, x: jsparse.matmul(a, x, impl="cpu")  # noqa: E731
    ga, gx = jax.jit(jax.grad(lambda a, x: jnp.sum(f(a, x) ** 2), argnums=(0, 1), allow_int=True))(
        a, x
    )
    gw, gx_ref = jax.grad(lambda w, x: jnp.sum((w @ x) ** 2), argnums=(0, 1))(w, x)
    assert_close(a.with_values(ga.values).todense(), gw * (w != 0), jnp.float32, 16)
    assert_close(gx, gx_ref, jnp.float32, 16)
    xs = jax.random.normal(jax.random.key(2), (2, 16, 4))
    assert_close(jax.vmap(lambda x: f(a, x))(xs), jnp.einsum("ik,bkn->bin", w, xs), jnp.float32, 16)


def test_nm_corrupted_positions_raise():
    # m = 3 packs positions in 2 bits: a field of 3 is representable but out of range.
    a = jsparse.NM.random(jax.random.key(0), (4, 12), n=1, m=3, axis=1)
    x = jnp.ones((12, 2))
    f = jax.jit(lambda a, x, p: product.spmm(NM_KERNELS, a.kernel_config, False, a.values, p, x))
    bad = a.positions.at[0, 0].set(jnp.uint8(0b11))
    with pytest.raises(Exception, match="corrupted N:M positions"):
        jax.block_until_ready(f(a, x, bad))
    assert_close(f(a, x, a.positions), a.todense() @ x, jnp.float32, 12)


@pytest.mark.parametrize("fmt", ["bcsr", "nm"])
def test_nan_reaches_only_stored_entries(fmt):
    """An unstored entry contributes nothing, even against a NaN of X."""
    if fmt == "bcsr":
        d = jnp.zeros((4, 4)).at[:2, :2].set(1.0)
        a = jsparse.BCSR.fromdense(d, block_shape=(2, 2))
    else:
        d = jnp.array([[1.0, 2.0, 0.0, 0.0]] * 2)
        a = jsparse.NM.fromdense(d, n=2, m=4)
    x = jnp.ones((4, 1)).at[3, 0].set(jnp.nan)
    y = np.asarray(jsparse.matmul(a, x, impl="cpu"))
    assert np.all(np.isfinite(y)), y


# ------------------------------------------------------------------ N:M: every path
# The kernels pick a path per call: a matrix-vector loop (one column), expanded tiles
# multiplied densely, the stored-entries gather (wide X, contraction along the groups;
# forced here with set_nm_gather_from(1)) and stored-entries-only loops when X holds a
# NaN or an infinity. The AVX-512 kernels expand 16 lanes at a time for 1:2, 2:4, 1:4,
# 1:8, 2:8, so the grouped length below is 4 full vectors plus a tail of groups.
_NM_CONFIGS = [(1, 2), (2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (1, 3)]


def _nm_case(rng, n, m, axis, dtype, grouped=None, other=37):
    grouped = grouped or m * (64 // m + 1)
    return _nm(rng, n, m, axis, grouped // m, other, dtype)


@contextlib.contextmanager
def _nm_path(path):
    """Force a kernel path of the N:M products: "auto" (the handler's choice by width:
    up to 64 columns the row-dot / column-axpy (AVX-512, along the groups), dot and
    gather kernels, each up to its measured width, expanded tiles above; the row-gather
    for ``W @ X`` along axis 1 from 5 columns at every width with AVX2 or AVX-512),
    "gather" (stored entries at every width, contraction along the groups), "permute"
    (``W.T @ X`` along axis 0 from 2 columns: the AVX-512 permute kernel, whatever the
    CPU's vendor), "rowgather" (``W @ X`` along axis 1 from 2 columns at every width and
    instruction set: the row-gather kernel where the n:m fits it), "bucket" (``W @ X``
    along axis 0 from 2 columns: the AVX-512 pattern-bucket kernel for 2:4), "groupdot"
    ("auto" without the pattern-bucket, permute and row-gather kernels: ``W @ X`` along
    axis 0 runs the group-dot kernel up to 8 columns) or "dense" (expanded tiles at
    every width > 1)."""
    old_from = jsparse_native.set_nm_gather_from(1 if path == "gather" else 10**6)
    old_upto = jsparse_native.set_nm_gather_upto({"dense": 0, "rowgather": 10**6}.get(path))
    permute = {"permute": 2, "auto": None}.get(path, 10**6)
    old_permute = jsparse_native.set_nm_permute_from(permute)
    rowgather = {"rowgather": 2, "auto": None}.get(path, 10**6)
    old_rowgather = jsparse_native.set_nm_rowgather_from(rowgather)
    old_bucket = jsparse_native.set_nm_bucket_from({"bucket": 2, "auto": None}.get(path, 10**6))
    try:
        yield
    finally:
        jsparse_native.set_nm_gather_from(old_from)
        jsparse_native.set_nm_gather_upto(old_upto)
        jsparse_native.set_nm_permute_from(old_permute)
        jsparse_native.set_nm_rowgather_from(old_rowgather)
        jsparse_native.set_nm_bucket_from(old_bucket)


_PATHS = ("auto", "gather", "permute", "rowgather", "bucket", "dense")


def _nm_check_all_isas(a, w, widths, dtype, paths=_PATHS, nan=False):
    rng = np.random.default_rng(1)
    rows, cols = w.shape
    for b in widths:
        x = rng.standard_normal((cols, b))
        xt = rng.standard_normal((rows, b))
        if nan:  # a NaN in a row of X no stored entry reads: only the stored-entries loops
            x[0] = np.nan
            xt[0] = np.nan
        xj, xtj = jnp.asarray(x, dtype), jnp.asarray(xt, dtype)
        # The reference, stored entries only: a NaN in row 0 of X reaches exactly the
        # outputs whose row of W stores an entry in column 0 (the rest stay finite).
        x64, xt64 = np.asarray(xj, np.float64), np.asarray(xtj, np.float64)
        want_y = w @ np.nan_to_num(x64)
        want_yt = w.T @ np.nan_to_num(xt64)
        if nan:
            want_y = np.where(w[:, :1] != 0, np.nan, want_y)
            want_yt = np.where(w[:1, :].T != 0, np.nan, want_yt)
        for isa in ISAS:
            for path in paths if b > 1 else ("auto",):  # one column: the vector loop
                with _nm_path(path), jsparse_native.forced_isa(isa):
                    y, yt = _nm_products_jit(a, xj, xtj)
                msg = f"{a.n}:{a.m} axis {a.axis} B {b} {isa} {path}"
                assert y.dtype == yt.dtype == dtype
                assert_close(y, want_y, dtype, cols, err_msg=f"W @ X {msg}")
                assert_close(yt, want_yt, dtype, rows, err_msg=f"W.T @ X {msg}")


@pytest.mark.parametrize("nm", _NM_CONFIGS, ids=lambda nm: f"{nm[0]}of{nm[1]}")
@pytest.mark.parametrize("axis", [0, 1])
def test_nm_every_path_float32(nm, axis):
    n, m = nm
    a, w = _nm_case(np.random.default_rng(0), n, m, axis, jnp.float32)
    _nm_check_all_isas(a, w, (1, 3, 17, 33), jnp.float32)


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8), (1, 3)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
@pytest.mark.parametrize("axis", [0, 1])
def test_nm_every_path_bfloat16(nm, axis):
    n, m = nm
    a, w = _nm_case(np.random.default_rng(0), n, m, axis, jnp.bfloat16)
    _nm_check_all_isas(a, w, (1, 17), jnp.bfloat16)


@pytest.mark.parametrize("axis", [0, 1])
def test_nm_long_contraction_and_wide_x(axis):
    """Past one contraction chunk (256 dense entries) and one column block (512)."""
    rng = np.random.default_rng(2)
    a, w = _nm(rng, 2, 4, axis, 70, 20, jnp.float32)  # grouped length 280
    _nm_check_all_isas(a, w, (600,), jnp.float32)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nm_nan_meets_only_stored_entries_on_every_path(axis, dtype):
    a, w = _nm_case(np.random.default_rng(3), 2, 4, axis, dtype)
    _nm_check_all_isas(a, w, (1, 17), dtype, paths=("auto",), nan=True)


def _corrupt_positions(a, kind):
    """Packed positions with one corrupted byte (the first of row 0)."""
    if kind == "decreasing":  # 2:4: fields (0, 1 | 1, 0): the second group decreases
        byte = 0b00_01_01_00
    elif kind == "repeated":  # 2:4: fields (1, 1 | 2, 3)
        byte = 0b11_10_01_01
    else:  # 1:3: a field of 3 >= m
        byte = 0b11_00_00_00
    return a.positions.at[0, 0].set(jnp.uint8(byte))


@pytest.mark.parametrize("kind", ["decreasing", "repeated", "out_of_range"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("transpose", [False, True])
def test_nm_corrupted_positions_raise_on_every_path(kind, axis, transpose):
    n, m = (1, 3) if kind == "out_of_range" else (2, 4)
    # 2:4 over 64 columns: whole 16-lane vectors (the AVX-512 row-dot kernel at B = 3, the
    # dot kernel at 17 along the groups on AVX-512 and across them everywhere).
    grouped = 64 if m == 4 else None
    a, w = _nm_case(np.random.default_rng(4), n, m, axis, jnp.float32, grouped, other=16)
    rows, cols = w.shape
    bad = _corrupt_positions(a, kind)
    f = jax.jit(lambda p, x: product.spmm(NM_KERNELS, a.kernel_config, transpose, a.values, p, x))
    for b in (1, 3, 17):
        x = jnp.ones((rows if transpose else cols, b))
        for isa in ISAS:
            paths = [(path, x) for path in _PATHS] + [("auto", x.at[0].set(jnp.nan))]
            for path, x_in in paths:
                with _nm_path(path), jsparse_native.forced_isa(isa):
                    with pytest.raises(Exception, match="corrupted N:M positions"):
                        jax.block_until_ready(f(bad, x_in))
                    ok = f(a.positions, x)
                want = (w.T if transpose else w) @ np.ones((x.shape[0], b))
                assert_close(ok, want, jnp.float32, x.shape[0], err_msg=f"{isa} B {b}")


@pytest.mark.parametrize("axis", [0, 1])
def test_nm_jit_grad_jvp_vmap_both_axes(axis):
    a = jsparse.NM.random(jax.random.key(5), (16, 32), n=2, m=4, axis=axis)
    w = a.todense()
    x = jax.random.normal(jax.random.key(6), (32, 17))
    f = lambda v, x: jsparse.matmul(a.with_values(v), x, impl="cpu")  # noqa: E731
    loss = lambda v, x: jnp.sum(jnp.sin(f(v, x)))  # noqa: E731
    gv, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(a.values, x)
    gw, gx_ref = jax.grad(lambda w, x: jnp.sum(jnp.sin(w @ x)), argnums=(0, 1))(w, x)
    assert_close(a.with_values(gv).todense(), gw * (w != 0), jnp.float32, 32)
    assert_close(gx, gx_ref, jnp.float32, 32)
    _, tangent = jax.jvp(lambda x: f(a.values, x), (x,), (jnp.ones_like(x),))
    assert_close(tangent, w @ jnp.ones_like(x), jnp.float32, 32)
    _, tangent_v = jax.jvp(lambda v: f(v, x), (a.values,), (jnp.ones_like(a.values),))
    assert_close(tangent_v, (w != 0).astype(jnp.float32) @ x, jnp.float32, 32)
    xs = jax.random.normal(jax.random.key(7), (3, 32, 2))
    assert_close(
        jax.vmap(lambda x: f(a.values, x))(xs), jnp.einsum("ik,bkn->bin", w, xs), jnp.float32, 32
    )
    xr = jax.random.normal(jax.random.key(8), (3, 16))  # X @ W: the transposed kernel
    assert_close(jsparse.matmul(xr, a, impl="cpu"), xr @ w, jnp.float32, 16)


def test_nm_gather_from_control_rejects_bad_values():
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        jsparse_native.set_nm_gather_from(0)
    with pytest.raises(ValueError, match="n must be None or an int >= 0"):
        jsparse_native.set_nm_gather_upto(-1)
    with pytest.raises(ValueError, match="n must be None or an int >= 1"):
        jsparse_native.set_nm_permute_from(0)
    with pytest.raises(ValueError, match="n must be None or an int >= 1"):
        jsparse_native.set_nm_rowgather_from(0)
    with pytest.raises(ValueError, match="n must be None or an int >= 1"):
        jsparse_native.set_nm_bucket_from(0)


@pytest.mark.parametrize(
    "nm",
    [(1, 2), (2, 4), (3, 4), (2, 8), (5, 8), (2, 16), (1, 3)],
    ids=lambda nm: f"{nm[0]}of{nm[1]}",
)
def test_nm_permute_kernel_tiles_chunks_and_tails(nm):
    """The permute kernel (``W.T @ X`` along axis 0; m dividing 16, else the expanded
    tiles): 16 output rows per tile and a tail of 5 left to the expanded tiles, a last
    chunk of one group (part of the first of its two vectors of X's rows), whole and
    partial blocks of 4 columns, and a second block of columns past 256."""
    n, m = nm
    groups = 2 * (16 // m if 16 % m == 0 else 4) + 1
    a, w = _nm(np.random.default_rng(9), n, m, 0, groups, 37, jnp.float32)
    _nm_check_all_isas(a, w, (2, 4, 7, 300), jnp.float32, paths=("permute",))
    if "avx512" not in jsparse_native.supported_isas():
        return
    f = jax.jit(lambda p, x: product.spmm(NM_KERNELS, a.kernel_config, True, a.values, p, x))
    x = jnp.ones((w.shape[0], 4))
    for path, runs in (("permute", 16 % m == 0), ("dense", False)):
        with _nm_path(path), jsparse_native.forced_isa("avx512"):
            jax.block_until_ready(f(a.positions, x))
            assert jsparse_native.nm_last_permuted() == runs, path


@pytest.mark.parametrize(
    "nm",
    [(1, 2), (1, 4), (2, 4), (1, 8), (2, 8), (4, 8), (1, 3)],
    ids=lambda nm: f"{nm[0]}of{nm[1]}",
)
def test_nm_rowgather_kernel_blocks_chunks_and_tails(nm):
    """The row-gather kernel (``W @ X`` along axis 1; 1:2, 1:4, 2:4, 1:8, 2:8, else the
    other kernels): 150 rows (two blocks of 64 and a tail per thread), two chunks of
    groups and a last one that is not whole words of positions, X's rows read in place
    (8 and 16 columns, AVX-512's 8- and 16-float vectors; 64) or copied and zero-padded
    once (2, 7, 24, 33; on AVX-512 one to three vectors take the values by shuffles, four
    by broadcast loads), and passes of four vectors and one over the rest of the columns
    (70: passes of 64 and 6 columns on AVX-512, of 32, 32 and 6 on AVX2; 100: 64 and 36,
    three of 32 and 4). By default it runs at every width from 5 with AVX2 or AVX-512
    (not on the portable path). A corrupted position in a whole word of positions or in
    the scalar tail raises."""
    n, m = nm
    fits = nm in ((1, 2), (1, 4), (2, 4), (1, 8), (2, 8))
    # 16 KiB chunks of X's rows at 16 columns: 64 groups of 4 rows, 32 of 8, 128 of 2.
    groups = 2 * (256 // m) + 3
    a, w = _nm(np.random.default_rng(10), n, m, 1, groups, 150, jnp.float32)
    _nm_check_all_isas(a, w, (2, 7, 8, 16, 24, 33, 64, 70, 100), jnp.float32, paths=("rowgather",))
    ab, wb = _nm(np.random.default_rng(11), n, m, 1, groups, 150, jnp.bfloat16)
    _nm_check_all_isas(ab, wb, (7, 16, 33, 70), jnp.bfloat16, paths=("rowgather",))
    f = jax.jit(lambda p, x: product.spmm(NM_KERNELS, a.kernel_config, False, a.values, p, x))
    x = jnp.ones((w.shape[1], 16))
    for isa in ISAS:
        for path, width, runs in (
            ("rowgather", 16, fits),
            ("dense", 16, False),
            ("auto", 4, False),
            ("auto", 5, fits and isa != "generic"),
            ("auto", 100, fits and isa != "generic"),
        ):
            with _nm_path(path), jsparse_native.forced_isa(isa):
                jax.block_until_ready(f(a.positions, jnp.ones((w.shape[1], width))))
                assert jsparse_native.nm_last_rowgathered() == runs, (isa, path, width)
        if fits and nm != (1, 4):  # (every 2-bit field is a valid 1:4 position)
            # The first byte of row 0 (a whole word of positions, checked at once) or its
            # last (the scalar tail): its first two fields (3, 1) decrease within a 2:4
            # group; a field >= m for the others.
            for byte in (0, -1):
                corrupt = jnp.uint8(0b00_00_01_11 if m == 4 else 0xFF)
                bad = a.positions.at[0, byte].set(corrupt)
                with _nm_path("rowgather"), jsparse_native.forced_isa(isa):
                    with pytest.raises(Exception, match="corrupted N:M positions"):
                        jax.block_until_ready(f(bad, x))


@pytest.mark.parametrize("nm", [(2, 4), (1, 2), (1, 4)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
def test_nm_rowperm_kernel_words_and_tails(nm):
    """The row-permute kernel (``W @ X`` along axis 1, 1 to 4 columns, 2:4 with
    AVX-512; else the matrix-vector loops and the row-dot and dot kernels): 37 rows
    (from 2 columns two at a time, and a last one) of 54 stored entries (a pair of
    whole words of positions, one more word, a tail of 6 entries), float32 and
    bfloat16. A corrupted position in a whole word of positions or in the tail
    raises."""
    n, m = nm
    fits = nm == (2, 4)
    groups = 54 // n
    a, w = _nm(np.random.default_rng(16), n, m, 1, groups, 37, jnp.float32)
    _nm_check_all_isas(a, w, (1, 2, 3, 4), jnp.float32, paths=("auto",))
    ab, wb = _nm(np.random.default_rng(17), n, m, 1, groups, 37, jnp.bfloat16)
    _nm_check_all_isas(ab, wb, (1, 4), jnp.bfloat16, paths=("auto",))
    f = jax.jit(lambda p, x: product.spmm(NM_KERNELS, a.kernel_config, False, a.values, p, x))
    for isa in ISAS:
        for width in (1, 2, 4, 5):
            x = jnp.ones((w.shape[1], width))
            with jsparse_native.forced_isa(isa):
                jax.block_until_ready(f(a.positions, x))
                runs = fits and isa == "avx512" and width <= 4
                assert jsparse_native.nm_last_rowpermuted() == runs, (isa, width)
                if runs and width in (1, 4):
                    # Row 0's first byte (in a whole word) or its last (in the tail):
                    # its two fields (3, 1) decrease within a group.
                    for byte in (0, -1):
                        bad = a.positions.at[0, byte].set(jnp.uint8(0b00_00_01_11))
                        with pytest.raises(Exception, match="corrupted N:M positions"):
                            jax.block_until_ready(f(bad, x))


@pytest.mark.parametrize("nm", [(2, 4), (1, 4), (2, 8)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
def test_nm_bucket_kernel_blocks_chunks_and_tails(nm):
    """The pattern-bucket kernel (``W @ X`` along axis 0, 2:4, AVX-512 with VBMI2; else
    the other kernels): 37 groups (two blocks of 16 and a tail), 533 columns of ``W``
    (two chunks of 256 at one vector of ``X`` and a last of 21, not a whole block of 64
    columns; 8 chunks of 64 at four vectors), ``X`` read in place (8, 16, 64) or copied
    and zero-padded (2, 33), up to 8 columns in 8-float vectors (2, 8, and the last pass
    of 70), passes of four vectors and one over the rest (70, 100); float32 values read
    in place (passes of one vector) or copied (wider), bfloat16 values widened. By
    default it runs from 9 columns (the group-dot kernel takes 1 to 8). A corrupted pair
    of positions in a whole block of 64 columns or in the last, partial block raises."""
    n, m = nm
    fits = nm == (2, 4) and BUCKET_CPU
    a, w = _nm(np.random.default_rng(12), n, m, 0, 37, 533, jnp.float32)
    _nm_check_all_isas(a, w, (2, 8, 16, 17, 33, 64, 70, 100), jnp.float32, paths=("bucket",))
    ab, wb = _nm(np.random.default_rng(13), n, m, 0, 37, 533, jnp.bfloat16)
    _nm_check_all_isas(ab, wb, (8, 16, 33, 70), jnp.bfloat16, paths=("bucket",))
    f = jax.jit(lambda p, x: product.spmm(NM_KERNELS, a.kernel_config, False, a.values, p, x))
    for path, width, runs in (
        ("bucket", 16, fits),
        ("dense", 16, False),
        ("auto", 8, False),
        ("auto", 9, fits),
        ("auto", 100, fits),
    ):
        with _nm_path(path):
            jax.block_until_ready(f(a.positions, jnp.ones((w.shape[1], width))))
            assert jsparse_native.nm_last_bucketed() == runs, (path, width)
    if fits:
        # Group 0's two stored rows: the same field in both (a pair that is not one of
        # the six) in columns 0..3 (a whole block) or in column 532 (the partial one).
        for byte in (0, -1):
            pos = a.positions
            bad = pos.at[1, byte].set(pos[0, byte])
            with _nm_path("bucket"):
                with pytest.raises(Exception, match="corrupted N:M positions"):
                    jax.block_until_ready(f(bad, jnp.ones((w.shape[1], 16))))


@pytest.mark.parametrize(
    "nm", [(2, 4), (1, 4), (2, 8), (1, 16), (3, 5), (5, 8)], ids=lambda nm: f"{nm[0]}of{nm[1]}"
)
def test_nm_groupdot_kernel_passes_and_tails(nm):
    """The group-dot kernel (``W @ X`` along axis 0, 1 to 8 columns, n <= 4 and m <= 16,
    every instruction set; else the other kernels): 533 columns of ``W`` (33 vectors of
    16 lanes, or 66 of 8, and a tail of 5), ``X``'s columns in passes of at most four
    whose accumulators fit the registers (m x columns <= 16 on AVX-512, 8 elsewhere: at
    m = 4, 5 columns run as 4 + 1 and 8 as 4 + 4 on AVX-512, 2 + 2 + 1 and four of 2 on
    AVX2; m = 16 one column a pass), n:m at compile time (2:4, 1:4, 2:8) and at run time
    (1:16, 3:5), bfloat16 (all with the pattern-bucket kernel off); on AVX-512, 2:4 takes
    its dense rows from mask registers (group_rows24). By default it runs from 1 to 8
    columns and not from 9 (2:4 from 9: the pattern-bucket kernel, where it runs), nor
    for n > 4. A corrupted pair of positions (equal in the two stored rows, or decreasing)
    in a whole vector or in the column tail raises."""
    n, m = nm
    fits = n <= 4
    a, w = _nm(np.random.default_rng(14), n, m, 0, 13, 533, jnp.float32)
    _nm_check_all_isas(a, w, (1, 2, 3, 5, 8), jnp.float32, paths=("groupdot",))
    ab, wb = _nm(np.random.default_rng(15), n, m, 0, 13, 533, jnp.bfloat16)
    _nm_check_all_isas(ab, wb, (1, 5), jnp.bfloat16, paths=("groupdot",))
    f = jax.jit(lambda p, x: product.spmm(NM_KERNELS, a.kernel_config, False, a.values, p, x))
    for isa in ISAS:
        for path, width, runs in (
            ("auto", 1, fits),
            ("auto", 4, fits),
            ("auto", 7, fits),
            ("auto", 8, fits),
            ("groupdot", 8, fits),
            ("groupdot", 9, False),
        ):
            with jsparse_native.forced_isa(isa), _nm_path(path):
                jax.block_until_ready(f(a.positions, jnp.ones((w.shape[1], width))))
                assert jsparse_native.nm_last_groupdotted() == runs, (isa, path, width)
        if nm == (2, 4):
            # Group 0's two stored rows: the same fields in both in columns 0..3 (a
            # whole vector), swapped (decreasing) in columns 528..532 (the tail).
            pos = a.positions
            for byte in (0, -1):
                bad = pos.at[1, byte].set(pos[0, byte])
                if byte == -1:
                    bad = bad.at[0, byte].set(pos[1, byte])
                for width in (1, 5):
                    with jsparse_native.forced_isa(isa), _nm_path("groupdot"):
                        with pytest.raises(Exception, match="corrupted N:M positions"):
                            jax.block_until_ready(f(bad, jnp.ones((w.shape[1], width))))


@pytest.mark.parametrize(
    "nm", [(2, 4), (1, 4), (2, 8), (1, 8), (1, 2)], ids=lambda nm: f"{nm[0]}of{nm[1]}"
)
def test_nm_row_dot_kernel_row_pairs_and_tails(nm):
    """The AVX-512 row-dot loops (``W @ X`` along axis 1, rows a whole number of 16-lane
    steps: one column (the matrix-vector loop) and 2..4 (the row-dot kernel, two rows at
    a time from 3 columns)): 21 rows (pairs and a last odd row), 80 dense entries a row
    (two 32-lane steps and one of 16), every packing of the mask table (2:4 and 1:4 with
    8 or 16 lanes a byte, 2:8, 1:8, 1:2), bfloat16. A corrupted position in either row of
    a pair, in a 32-lane step or in the last 16 lanes, raises."""
    n, m = nm
    a, w = _nm(np.random.default_rng(16), n, m, 1, 80 // m, 21, jnp.float32)
    _nm_check_all_isas(a, w, (1, 2, 3, 4), jnp.float32, paths=("auto",))
    ab, wb = _nm(np.random.default_rng(17), n, m, 1, 80 // m, 21, jnp.bfloat16)
    _nm_check_all_isas(ab, wb, (1, 3), jnp.bfloat16, paths=("auto",))
    if nm == (2, 4) and "avx512" in ISAS:
        f = jax.jit(lambda p, x: product.spmm(NM_KERNELS, a.kernel_config, False, a.values, p, x))
        # Row 1 (the second of the first pair) or row 20 (the odd one): its first byte
        # (a 32-lane step) or its last (the 16-lane step): fields (3, 1) decrease.
        for row, byte in ((1, 0), (1, -1), (20, 0), (20, -1)):
            bad = a.positions.at[row, byte].set(jnp.uint8(0b00_00_01_11))
            for width in (1, 2, 3):
                with jsparse_native.forced_isa("avx512"):
                    with pytest.raises(Exception, match="corrupted N:M positions"):
                        jax.block_until_ready(f(bad, jnp.ones((w.shape[1], width))))


# Narrow X (2 .. 64 columns): the row-dot (AVX-512, whole 16-lane vectors of a row, 2..4
# columns), column-axpy (AVX-512, 2..8), dot (W @ X, the contraction along W's columns)
# and gather kernels (its column tail: a masked partial vector) against the expanded
# tiles, around every vector width of every instruction set, both orientations.
_NARROW = (2, 3, 8, 15, 16, 17, 33, 48, 49)


@pytest.mark.parametrize(
    "nm", [(1, 4), (2, 4), (2, 8), (4, 8), (1, 2)], ids=lambda nm: f"{nm[0]}of{nm[1]}"
)
@pytest.mark.parametrize("axis", [0, 1])
def test_nm_narrow_x_every_path(nm, axis):
    n, m = nm
    # 64 grouped entries: whole vectors (row-dot); other = 21: a tail of output rows (and,
    # across the groups, of the dot kernel's contraction).
    a, w = _nm_case(np.random.default_rng(6), n, m, axis, jnp.float32, grouped=64, other=21)
    _nm_check_all_isas(a, w, _NARROW if nm == (2, 4) else (2, 16, 49), jnp.float32)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nm_dot_and_outer_kernels_chunks_and_tails(axis, dtype):
    """The dot kernel (W @ X, narrow X, the contraction along W's columns) and the
    outer-product kernel (W.T @ X) past their chunk of the contraction (dot: 1024 columns
    along the groups, 512 across; outer: 256 rows), with a last chunk that is not whole
    vectors, a tail of outputs that is not a whole register tile, and widths that pad X
    to whole register tiles (dot) or leave a partial tile of columns (outer). Across the
    groups the dot kernel takes 9 and 18 columns (5: the group-dot kernel) where the
    pattern-bucket kernel does not run (AVX-512 without VBMI2, AVX2, the portable path;
    "permute" turns it off)."""
    rng = np.random.default_rng(8)
    # W @ X contracts 1204 = 1024 + 180 (axis 1) or 1101 (axis 0) columns; W.T @ X
    # contracts 1101 (axis 1) or 280 = 256 + 24 (axis 0) rows.
    groups, other = (301, 1101) if axis == 1 else (70, 1101)
    a, w = _nm(rng, 2, 4, axis, groups, other, dtype)
    _nm_check_all_isas(a, w, (5, 9, 18), dtype, paths=("auto", "permute"))


@pytest.mark.parametrize("nm", [(2, 4), (1, 2)], ids=lambda nm: f"{nm[0]}of{nm[1]}")
@pytest.mark.parametrize("axis", [0, 1])
def test_nm_narrow_x_every_path_bfloat16(nm, axis):
    n, m = nm
    a, w = _nm_case(np.random.default_rng(7), n, m, axis, jnp.bfloat16, grouped=64, other=19)
    _nm_check_all_isas(a, w, (3, 16, 33), jnp.bfloat16)


def test_nm_auto_picks_the_native_kernels_on_cpu():
    a = jsparse.NM.random(jax.random.key(0), (32, 64), n=2, m=4)
    for width in (1, 16):
        x = jnp.ones((64, width))
        assert "jsparse_nm_spmm" in jax.jit(lambda a, x: a @ x).lower(a, x).as_text()
    with jax.enable_x64(True):  # float64 is not native: auto takes "xla"
        a64 = a.astype(jnp.float64)
        assert "jsparse_nm" not in jax.jit(lambda a, x: a @ x).lower(a64, x).as_text()


@pytest.mark.parametrize("axis", [0, 1])
def test_nm_empty_contraction_gives_zeros(axis):
    """A dimension of 0 along the contraction: the kernel writes zeros, reads nothing."""
    shape = (0, 8) if axis == 0 else (8, 0)
    a = jsparse.NM.fromdense(jnp.zeros(shape), n=2, m=4, axis=axis)
    x, xt = jnp.ones((shape[1], 3)), jnp.ones((shape[0], 3))
    for isa in ISAS:
        with jsparse_native.forced_isa(isa):
            y, yt = _nm_products_jit(a, x, xt)
        np.testing.assert_array_equal(y, np.zeros((shape[0], 3)), err_msg=isa)
        np.testing.assert_array_equal(yt, np.zeros((shape[1], 3)), err_msg=isa)
