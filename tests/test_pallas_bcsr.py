"""Pallas BCSR kernels on CPU: interpret mode against XLA and dense, lowering for accelerators.

No test needs a GPU: every kernel runs in the Pallas interpreter (``interpret=True``)
and is lowered for ``cuda`` (Triton) and ``tpu`` (Mosaic) from this machine.
"""

from __future__ import annotations

import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.formats.bcsr import xla
from pallas_kernels.bcsr import (
    SddmmConfig,
    SpmmConfig,
    bcsr_sddmm,
    bcsr_sddmm_reference,
    bcsr_spmm,
    bcsr_spmm_reference,
    csc_view,
)
from pallas_kernels.common import Unsupported

from oracle import assert_close


def _matrix(shape, block_shape, density, dtype, *, empty_rows=(), seed=0):
    """A random BCSR whose listed block-rows are empty (uneven row lengths)."""
    a = jsparse.BCSR.random(
        jax.random.key(seed), shape, density=density, block_shape=block_shape, dtype=dtype
    )
    d = a.todense()
    bm = block_shape[0]
    for r in empty_rows:
        d = d.at[r * bm : (r + 1) * bm].set(0)
    return jsparse.BCSR.fromdense(d, block_shape=block_shape)


def _spmm_operands(a, transpose):
    """``(ptr, src)`` and ``perm=`` for :func:`bcsr_spmm`: CSR order for ``A @ X``,
    the CSC view for ``A.T @ X``."""
    if not transpose:
        return (a.indptr, a.indices), {}
    colptr, perm, rows = csc_view(a.indptr, a.indices, a.shape[1] // a.block_shape[1])
    return (colptr, rows), {"perm": perm}


# (block shape, shape, N, dtype, empty block-rows)
CASES = [
    ((16, 16), (64, 96), 5, jnp.float32, (1,)),
    ((8, 8), (32, 48), 1, jnp.float32, (0, 3)),
    ((16, 32), (64, 96), 17, jnp.bfloat16, (2,)),
]
GPU_ONLY = [((4, 8), (16, 32), 3, jnp.float32, (1,)), ((1, 1), (12, 20), 2, jnp.float32, ())]


def _ids(cases):
    return [f"{b[0]}x{b[1]}-N{n}-{jnp.dtype(dt).name}" for b, _, n, dt, _ in cases]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("transpose", [False, True], ids=["AX", "ATX"])
@pytest.mark.parametrize("case", CASES + GPU_ONLY, ids=_ids(CASES + GPU_ONLY))
def test_spmm_interpret(case, transpose, backend):
    block_shape, shape, n, dtype, empty = case
    a = _matrix(shape, block_shape, 0.4, dtype, empty_rows=empty)
    x = jax.random.normal(jax.random.key(1), (shape[0] if transpose else shape[1], n), dtype)
    (ptr, src), perm = _spmm_operands(a, transpose)
    call = functools.partial(
        bcsr_spmm, shape=shape, transpose=transpose, backend=backend, interpret=True, **perm
    )
    if backend == "tpu" and case in GPU_ONLY:
        with pytest.raises(Unsupported, match="multiples of 8"):
            call(a.data, ptr, src, x)
        return
    y = call(a.data, ptr, src, x)
    assert y.shape == (shape[1] if transpose else shape[0], n) and y.dtype == dtype
    expected = xla.spmm(a.data, a.row_ids, a.indices, x, shape=shape, transpose=transpose)
    w = a.todense().astype(jnp.float32)
    k = shape[0] if transpose else shape[1]
    assert_close(y, expected, dtype, k)
    assert_close(y, (w.T if transpose else w) @ x.astype(jnp.float32), dtype, k)
    ref = bcsr_spmm_reference(a.data, a.indptr, a.indices, x, shape=shape, transpose=transpose)
    assert_close(ref, expected, dtype, k)


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("case", CASES + GPU_ONLY, ids=_ids(CASES + GPU_ONLY))
def test_sddmm_interpret(case, backend):
    block_shape, shape, j, dtype, empty = case
    a = _matrix(shape, block_shape, 0.4, dtype, empty_rows=empty)
    u = jax.random.normal(jax.random.key(2), (shape[0], j), dtype)
    v = jax.random.normal(jax.random.key(3), (shape[1], j), dtype)
    call = functools.partial(bcsr_sddmm, block_shape=block_shape, backend=backend, interpret=True)
    if backend == "tpu" and case in GPU_ONLY:
        with pytest.raises(Unsupported, match="multiples of 8"):
            call(u, v, a.row_ids, a.indices)
        return
    out = call(u, v, a.row_ids, a.indices)
    assert out.shape == a.data.shape and out.dtype == dtype
    expected = xla.sddmm(u, v, a.row_ids, a.indices, block_shape=block_shape)
    assert_close(out, expected, dtype, j)
    dense = u.astype(jnp.float32) @ v.astype(jnp.float32).T
    bm, bn = block_shape
    grid = dense.reshape(dense.shape[0] // bm, bm, dense.shape[1] // bn, bn).transpose(0, 2, 1, 3)
    gathered = grid[a.row_ids, a.indices]
    assert_close(out, gathered, dtype, j)
    assert_close(bcsr_sddmm_reference(u, v, a.row_ids, a.indices, block_shape=block_shape),
                 expected, dtype, j)  # fmt: skip


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_empty_matrix(backend):
    a = jsparse.BCSR.fromdense(jnp.zeros((32, 16)), block_shape=(8, 8))
    assert a.nse == 0
    x = jnp.ones((16, 3))
    y = bcsr_spmm(a.data, a.indptr, a.indices, x, shape=a.shape, backend=backend, interpret=True)
    np.testing.assert_array_equal(y, jnp.zeros((32, 3)))
    out = bcsr_sddmm(jnp.ones((32, 4)), jnp.ones((16, 4)), a.row_ids, a.indices,
                     block_shape=(8, 8), backend=backend, interpret=True)  # fmt: skip
    assert out.shape == (0, 8, 8)


def test_csc_view():
    a = _matrix((32, 48), (8, 8), 0.4, jnp.float32, empty_rows=(1,))
    colptr, perm, rows = csc_view(a.indptr, a.indices, 6)
    cols = np.asarray(a.indices)[np.asarray(perm)]
    assert np.all(np.diff(cols) >= 0)
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(a.row_ids)[np.asarray(perm)])
    np.testing.assert_array_equal(np.asarray(colptr), np.searchsorted(cols, np.arange(7)))


def test_spmm_positions_and_perm():
    """Position ``p`` reads stored block ``perm[p]`` (``p`` without ``perm``), in
    either direction; ``ptr`` must fit the output block-rows."""
    a = _matrix((32, 48), (8, 8), 0.4, jnp.float32, empty_rows=(1,))
    x = jax.random.normal(jax.random.key(8), (48, 3))
    call = functools.partial(bcsr_spmm, shape=a.shape, interpret=True)
    y = call(a.data, a.indptr, a.indices, x)
    identity = jnp.arange(a.nse, dtype=jnp.int32)
    np.testing.assert_array_equal(call(a.data, a.indptr, a.indices, x, perm=identity), y)
    reverse = identity[::-1]  # blocks stored in reverse order, read back through perm
    np.testing.assert_array_equal(call(a.data[reverse], a.indptr, a.indices, x, perm=reverse), y)
    with pytest.raises(ValueError, match="column pointer"):
        call(a.data, a.indptr, a.indices, jnp.ones((32, 3)), transpose=True, perm=identity)
    with pytest.raises(ValueError, match="src must be"):
        call(a.data, a.indptr, a.indices[1:], x)
    assert issubclass(Unsupported, ValueError)


def test_configs():
    assert SpmmConfig.for_shapes((32, 32), 1).tn == 16  # skinny N: one tensor-core tile
    assert SpmmConfig.for_shapes((32, 32), 1000).tn == 128
    assert SpmmConfig.for_shapes((32, 32), 5, backend="tpu").tn == 8
    assert SpmmConfig.for_shapes((32, 32), 300, backend="tpu").tn == 128
    assert SpmmConfig.for_shapes((32, 32), 17).padded_n(17) == 32
    with pytest.raises(ValueError, match="positive"):
        SpmmConfig((32, 32), 0)
    with pytest.raises(ValueError, match="backend"):
        SpmmConfig((32, 32), 16, backend="metal")
    with pytest.raises(Unsupported, match="power-of-two"):
        SpmmConfig((24, 32), 16)
    with pytest.raises(Unsupported, match="power-of-two"):
        SddmmConfig((32, 32), 24)
    a = _matrix((32, 32), (16, 16), 0.5, jnp.float32)
    with pytest.raises(ValueError, match="does not match"):
        bcsr_spmm(a.data, a.indptr, a.indices, jnp.ones((32, 2)), shape=(32, 32),
                  config=SpmmConfig((8, 8), 16))  # fmt: skip
    with pytest.raises(ValueError, match="x must be"):
        bcsr_spmm(a.data, a.indptr, a.indices, jnp.ones((16, 2)), shape=(32, 32))


def test_float64_is_not_implemented():
    with jax.enable_x64(True):
        a = _matrix((32, 32), (16, 16), 0.5, jnp.float64)
        x = jnp.ones((32, 2), jnp.float64)
        with pytest.raises(Unsupported, match="float64"):
            bcsr_spmm(a.data, a.indptr, a.indices, x, shape=a.shape, interpret=True)
        with pytest.raises(ValueError, match="impl='pallas' cannot run matmul.*float64"):
            jsparse.matmul(a, x, impl="pallas")
        # auto never needs Pallas on CPU, and drops it from the accelerator branches
        assert_close(jax.jit(lambda a, x: a @ x)(a, x), a.todense() @ x, jnp.float64, 32)


# ------------------------------------------------------------------ through jsparse
@pytest.mark.parametrize(
    "left,dtype", [(False, jnp.float32), (True, jnp.bfloat16)], ids=["a@x-f32", "x@a-bf16"]
)
def test_grad_pallas_matches_xla(left, dtype):
    a = _matrix((32, 48), (16, 16), 0.5, dtype, empty_rows=(1,))
    x = jax.random.normal(jax.random.key(4), (3, 32) if left else (48, 3), dtype)

    def loss(a, x, impl):
        y = jsparse.matmul(x, a, impl=impl) if left else jsparse.matmul(a, x, impl=impl)
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True), static_argnums=2)
    ga, gx = grad(a, x, "pallas")
    ga_ref, gx_ref = grad(a, x, "xla")
    assert ga.data.dtype == dtype and gx.dtype == dtype
    assert_close(ga.data, ga_ref.data, dtype, 48)
    assert_close(gx, gx_ref, dtype, 48)
    y = jsparse.matmul(x, a, impl="pallas") if left else jsparse.matmul(a, x, impl="pallas")
    assert_close(y, jsparse.matmul(x, a) if left else jsparse.matmul(a, x), dtype, 48)


def test_sddmm_grad_pallas_matches_xla():
    pattern = _matrix((32, 48), (16, 16), 0.5, jnp.float32)
    x = jax.random.normal(jax.random.key(5), (32, 8))
    y = jax.random.normal(jax.random.key(6), (8, 48))

    def loss(x, y, impl):
        out = jsparse.sddmm(x, y, pattern, impl=impl)
        return jnp.sum(jnp.sin(out.data))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    for got, want in zip(grad(x, y, "pallas"), grad(x, y, "xla"), strict=True):
        assert_close(got, want, jnp.float32, 48)


def test_vmap_over_values_pallas():
    a = _matrix((32, 32), (16, 16), 0.5, jnp.float32)
    data = jnp.stack([a.data, -2 * a.data])
    x = jax.random.normal(jax.random.key(7), (32, 2))
    out = jax.vmap(lambda d: jsparse.matmul(a.with_values(d), x, impl="pallas"))(data)
    assert_close(out, jnp.stack([a.todense() @ x, -2 * a.todense() @ x]), jnp.float32, 32)


# ------------------------------------------------------------------ lowering
def _lowered(fn, *args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


TRITON = "__gpu$xla.gpu.triton"
MOSAIC_TPU = "tpu_custom_call"


@pytest.mark.parametrize("transpose", [False, True], ids=["AX", "ATX"])
def test_kernels_lower_for_accelerators(transpose):
    a = _matrix((64, 64), (16, 16), 0.5, jnp.bfloat16)
    x = jnp.ones((64, 8), jnp.bfloat16)
    (ptr, src), perm = _spmm_operands(a, transpose)
    for backend, platform, marker in (("gpu", "cuda", TRITON), ("tpu", "tpu", MOSAIC_TPU)):
        spmm = functools.partial(
            bcsr_spmm, shape=a.shape, transpose=transpose, backend=backend, **perm
        )
        assert marker in _lowered(spmm, a.data, ptr, src, x, platform=platform)
        sddmm = functools.partial(bcsr_sddmm, block_shape=(16, 16), backend=backend)
        assert marker in _lowered(sddmm, x, x, a.row_ids, a.indices, platform=platform)


def test_auto_picks_pallas_at_lowering_time():
    # sparse enough that "xla" leads the CPU order, so "pallas" leads on accelerators
    a = _matrix((64, 64), (16, 16), 0.125, jnp.float32)
    x = jnp.ones((64, 4))

    def loss(a, x):  # forward and backward
        return jnp.sum(jsparse.matmul(a, x) ** 2) + jnp.sum(jsparse.matmul(x.T, a))

    grad = jax.grad(loss, argnums=(0, 1), allow_int=True)
    cuda = _lowered(grad, a, x, platform="cuda")
    assert TRITON in cuda
    # forward and backward kernels: A @ X, A.T @ dY (and x @ A) and the SDDMM for dA
    for kernel in ("bcsr_spmm", "bcsr_spmm_t", "bcsr_sddmm"):
        assert re.search(rf"\b{kernel}\b", cuda), kernel
    assert MOSAIC_TPU in _lowered(grad, a, x, platform="tpu")
    cpu = _lowered(grad, a, x, platform="cpu")
    assert TRITON not in cpu and MOSAIC_TPU not in cpu


def test_auto_prefers_dense_for_dense_patterns_on_accelerators_too():
    a = _matrix((64, 64), (16, 16), 0.5, jnp.float32)
    lowered = _lowered(lambda a, x: a @ x, a, jnp.ones((64, 4)), platform="cuda")
    assert TRITON not in lowered


def test_auto_falls_back_where_a_kernel_cannot(caplog):
    # (4, 8) blocks: the Triton kernel handles them, the TPU kernel does not. Small
    # blocks prefer dense above 2% density, so the pattern is sparser than that.
    a = _matrix((128, 256), (4, 8), 0.01, jnp.float32)
    x = jnp.ones((256, 4))
    f = lambda a, x: a @ x  # noqa: E731
    with caplog.at_level(logging.INFO, logger="jsparse.dispatch"):
        assert TRITON in _lowered(f, a, x, platform="cuda")
    assert MOSAIC_TPU not in _lowered(f, a, x, platform="tpu")  # the XLA branch, and why:
    assert "matmul for BCSR on tpu: 'xla' runs; skipped pallas (tpu): " in caplog.text
    # an explicit impl="pallas" never falls back: lowering for tpu names the limit
    g = lambda a, x: jsparse.matmul(a, x, impl="pallas")  # noqa: E731
    assert TRITON in _lowered(g, a, x, platform="cuda")
    with pytest.raises(ValueError, match="impl='pallas' cannot run matmul for BCSR on tpu: "):
        _lowered(g, a, x, platform="tpu")
    # and so does its gradient, rather than compiling a program without the kernel
    grad = jax.grad(lambda d, x: jnp.sum(g(a.with_values(d), x)), argnums=(0, 1))
    with pytest.raises(ValueError, match="impl='pallas' cannot run matmul for BCSR on tpu: "):
        _lowered(grad, a.data, x, platform="tpu")
    assert TRITON in _lowered(grad, a.data, x, platform="cuda")
