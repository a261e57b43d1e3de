"""Pallas N:M and Monarch kernels on CPU: interpret mode against XLA, lowering for cuda."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import jsparse
from jsparse.formats.monarch import xla as xla_monarch
from jsparse.formats.nm import xla as xla_nm
from pallas_kernels.common import Unsupported
from pallas_kernels.monarch import monarch_matmul, monarch_matmul_reference, plan_monarch
from pallas_kernels.nm import (
    nm_sampled,
    nm_sampled_reference,
    nm_spmm,
    nm_spmm_reference,
    nm_spmm_t,
    plan_nm,
)
from pallas_kernels.targets import Target

from oracle import assert_close

TRITON = "__gpu$xla.gpu.triton"


def _lowered(fn, *args, platform="cuda"):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


# ------------------------------------------------------------------ N:M
# (n, m, dense shape, N, dtype): aligned tiles, padded shapes, N = 1, bfloat16
NM_CASES = [
    (2, 4, (32, 128), 5, jnp.float32),
    (1, 4, (20, 12), 1, jnp.float32),
    (3, 8, (16, 128), 17, jnp.bfloat16),
]


@pytest.mark.parametrize("case", NM_CASES, ids=lambda c: f"{c[0]}of{c[1]}-{c[2]}-N{c[3]}")
def test_nm_kernels_interpret(case):
    n, m, shape, width, dtype = case
    a = jsparse.NM.random(jax.random.key(0), shape, n=n, m=m, dtype=dtype)
    v, p = a.values, a.unpacked_positions
    x = jax.random.normal(jax.random.key(1), (shape[1], width), dtype)
    xt = jax.random.normal(jax.random.key(2), (shape[0], width), dtype)
    kw = dict(n=n, m=m, axis=1)
    y = nm_spmm(v, p, x, n=n, m=m, interpret=True)
    assert y.dtype == dtype
    assert_close(y, xla_nm.spmm(v, p, x, **kw), dtype, shape[1])
    assert_close(nm_spmm_reference(v, p, x, n=n, m=m), xla_nm.spmm(v, p, x, **kw), dtype, shape[1])
    yt = nm_spmm_t(v, p, xt, n=n, m=m, interpret=True)
    assert_close(yt, xla_nm.spmm(v, p, xt, transpose=True, **kw), dtype, shape[0])
    s = nm_sampled(xt, x, p, n=n, m=m, interpret=True)
    assert s.shape == v.shape and s.dtype == dtype
    assert_close(s, xla_nm.sampled(xt, x, p, **kw), dtype, width)
    assert_close(
        nm_sampled_reference(xt, x, p, n=n, m=m), xla_nm.sampled(xt, x, p, **kw), dtype, width
    )
    for fn, args in ((nm_spmm, (v, p, x)), (nm_spmm_t, (v, p, xt)), (nm_sampled, (xt, x, p))):
        assert TRITON in _lowered(functools.partial(fn, n=n, m=m), *args)


def test_nm_planner():
    with pytest.raises(Unsupported, match="float16"):  # the TPU kernels: tests/test_pallas_tpu_*
        plan_nm((64, 64), 2, 4, 8, jnp.float16, backend="tpu")
    with pytest.raises(Unsupported, match="float64"):
        plan_nm((64, 64), 2, 4, 8, jnp.float64)
    cfg = plan_nm((64, 256), 2, 4, 1, jnp.float32)
    assert (cfg.tm, cfg.tk, cfg.tn) == (64, 128, 16) and cfg.padded(60, 200) == (64, 256)


@pytest.mark.parametrize("axis", [1, 0])
def test_nm_grad_pallas_matches_xla(axis):
    a = jsparse.NM.random(jax.random.key(3), (32, 64), n=2, m=4, axis=axis)
    x = jax.random.normal(jax.random.key(4), (64, 3))

    def loss(a, x, impl):
        return jnp.sum(jnp.sin(jsparse.matmul(a, x, impl=impl)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True), static_argnums=2)
    (ga, gx), (ga_ref, gx_ref) = grad(a, x, "pallas"), grad(a, x, "xla")
    assert_close(ga.values, ga_ref.values, jnp.float32, 64)
    assert_close(gx, gx_ref, jnp.float32, 64)
    assert _lowered(functools.partial(grad, impl="pallas"), a, x).count(f"@{TRITON}(") == 3
    tpu = _lowered(functools.partial(grad, impl="pallas"), a, x, platform="tpu")
    assert TRITON not in tpu and "tpu_custom_call" in tpu  # the Mosaic kernels


# ------------------------------------------------------------------ Monarch
# (shape, nblocks, block_rank, N, dtype): tiny blocks (broadcast path, padding),
# 16-aligned blocks (tensor-core dot path), bfloat16
MONARCH_CASES = [
    ((12, 20), 2, None, 3, jnp.float32),
    ((64, 128), 8, 1, 1, jnp.float32),
    ((256, 128), 4, 16, 20, jnp.bfloat16),
]


@pytest.mark.parametrize("case", MONARCH_CASES, ids=lambda c: f"{c[0]}-b{c[1]}-N{c[3]}")
def test_monarch_kernel_interpret(case):
    shape, nb, rank, width, dtype = case
    a = jsparse.Monarch.init(jax.random.key(5), shape, nblocks=nb, block_rank=rank, dtype=dtype)
    x = jax.random.normal(jax.random.key(6), (shape[1], width), dtype)
    y = monarch_matmul(a.left, a.right, x, interpret=True)
    expected = xla_monarch.matmul(a.left, a.right, x)
    assert y.shape == expected.shape and y.dtype == dtype
    assert_close(y, expected, dtype, shape[1])
    assert_close(monarch_matmul_reference(a.left, a.right, x), expected, dtype, shape[1])
    assert_close(y, a.todense().astype(jnp.float32) @ x.astype(jnp.float32), dtype, shape[1])
    assert TRITON in _lowered(monarch_matmul, a.left, a.right, x)


def test_monarch_planner():
    assert plan_monarch((4, 64, 64), (4, 64, 64), 8, jnp.bfloat16).use_dot
    assert not plan_monarch((4, 6, 8), (4, 8, 10), 8, jnp.float32).use_dot
    # blocks taller than 256 rows are tiled (ts rows per program), not refused
    tall = plan_monarch((2, 512, 8), (2, 8, 8), 8, jnp.float32)
    assert (tall.s, tall.ts) == (512, 256)
    with pytest.raises(Unsupported, match="shared memory of tiny"):
        plan_monarch((2, 512, 8), (2, 8, 8), 8, jnp.float32, target=Target("tiny", "gpu", 1024))
    with pytest.raises(Unsupported, match="float16"):  # the TPU kernel: tests/test_pallas_tpu_*
        plan_monarch((4, 64, 64), (4, 64, 64), 8, jnp.float16, backend="tpu")


@pytest.mark.parametrize("left", [False, True], ids=["a@x", "x@a"])
def test_monarch_grad_pallas_matches_xla(left):
    a = jsparse.Monarch.init(jax.random.key(7), (64, 32), nblocks=4)
    x = jax.random.normal(jax.random.key(8), (3, 64) if left else (32, 3))

    def loss(a, x, impl):
        y = jsparse.matmul(x, a, impl=impl) if left else jsparse.matmul(a, x, impl=impl)
        return jnp.sum(jnp.sin(y))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    for got, want in zip(
        jax.tree_util.tree_leaves(grad(a, x, "pallas")),
        jax.tree_util.tree_leaves(grad(a, x, "xla")),
        strict=True,
    ):
        assert_close(got, want, jnp.float32, 64)
    # forward and dx run the fused kernel
    assert _lowered(functools.partial(grad, impl="pallas"), a, x).count(f"@{TRITON}(") == 2


# ------------------------------------------------------------------ auto
def test_auto_picks_the_kernels_only_when_lowered_for_cuda():
    """impl="auto" (the default) runs the Pallas kernels on GPU and XLA on CPU, for
    both structured formats, chosen at lowering time."""
    nm = jsparse.NM.random(jax.random.key(5), (32, 128), n=2, m=4)
    mon = jsparse.Monarch.init(jax.random.key(6), (64, 64), nblocks=4)
    for a, x in ((nm, jnp.ones((128, 8))), (mon, jnp.ones((64, 8)))):

        def loss(a, x):
            return jnp.sum(a @ x)

        assert TRITON in _lowered(loss, a, x, platform="cuda"), type(a).__name__
        assert TRITON not in _lowered(loss, a, x, platform="cpu"), type(a).__name__
        assert TRITON in _lowered(jax.grad(loss, argnums=1), a, x, platform="cuda")
