"""TPU (Mosaic) Pallas kernels for N:M and Monarch, on CPU.

Every kernel runs in the Pallas interpreter (``interpret=True``) against the XLA
implementations and dense products: both orientations, float32 and bfloat16,
several ``n:m`` and block counts, tiles that split every grid axis, non-finite
values, and gradients through the jsparse adapters. The registry's TPU branch is
lowered for ``tpu`` from this machine (Mosaic custom calls in forward and backward),
and the accelerator tests compile the kernels for v5e and v6e with libtpu.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

import jsparse
from jsparse.core import product as core_product
from jsparse.formats.monarch import pallas as monarch_pallas
from jsparse.formats.monarch import xla as xla_monarch
from jsparse.formats.nm import pallas as nm_pallas
from jsparse.formats.nm import xla as xla_nm
from pallas_kernels.common import Unsupported
from pallas_kernels.monarch import (
    MonarchTpuConfig,
    monarch_matmul,
    monarch_matmul_reference,
    monarch_matmul_tpu,
    plan_monarch,
    plan_monarch_tpu,
)
from pallas_kernels.nm import (
    NMTpuConfig,
    nm_sampled_reference,
    nm_sampled_tpu,
    nm_spmm,
    nm_spmm_reference,
    nm_spmm_tpu,
    plan_nm,
    plan_nm_tpu,
)
from pallas_kernels.targets import target_for_kind

from oracle import assert_close

MOSAIC_TPU = "tpu_custom_call"
V5E, V6E = target_for_kind("TPU v5 lite", "tpu"), target_for_kind("TPU v6 lite", "tpu")


def _lowered(fn, *args, platform="tpu"):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _f32(x):
    return x.astype(jnp.float32)


# ------------------------------------------------------------------ N:M kernels
# (n, m, dense shape, N, dtype, config): default tiles with padding (1:4 with N = 1,
# bfloat16 3:8); small explicit tiles that split rows, columns and N (two tiles each).
NM_CASES = [
    (1, 4, (20, 12), 1, jnp.float32, None),
    (3, 8, (16, 128), 17, jnp.bfloat16, None),
    (2, 4, (64, 512), 200, jnp.float32, NMTpuConfig(2, 4, tm=32, groups=64, tn=128)),
    (4, 8, (40, 512), 130, jnp.bfloat16, NMTpuConfig(4, 8, tm=32, groups=32, tn=128)),
]


@pytest.mark.parametrize(
    "case", NM_CASES, ids=lambda c: f"{c[0]}of{c[1]}-{c[2]}-N{c[3]}-{jnp.dtype(c[4]).name}"
)
def test_nm_tpu_kernels_interpret(case):
    n, m, shape, width, dtype, cfg = case
    a = jsparse.NM.random(jax.random.key(0), shape, n=n, m=m, dtype=dtype)
    v, p = a.values, a.unpacked_positions
    x = jax.random.normal(jax.random.key(1), (shape[1], width), dtype)
    xt = jax.random.normal(jax.random.key(2), (shape[0], width), dtype)
    kw = dict(n=n, m=m, config=cfg, interpret=True)
    ref = dict(n=n, m=m, axis=1)
    y = nm_spmm_tpu(v, p, x, **kw)
    assert y.shape == (shape[0], width) and y.dtype == dtype
    assert_close(y, xla_nm.spmm(v, p, x, **ref), dtype, shape[1])
    assert_close(y, _f32(a.todense()) @ _f32(x), dtype, shape[1])
    yt = nm_spmm_tpu(v, p, xt, transpose=True, **kw)
    assert yt.shape == (shape[1], width) and yt.dtype == dtype
    assert_close(yt, xla_nm.spmm(v, p, xt, transpose=True, **ref), dtype, shape[0])
    assert_close(yt, _f32(a.todense()).T @ _f32(xt), dtype, shape[0])
    s = nm_sampled_tpu(xt, x, p, **kw)
    assert s.shape == v.shape and s.dtype == dtype
    assert_close(s, xla_nm.sampled(xt, x, p, **ref), dtype, width)
    assert_close(s, nm_sampled_reference(xt, x, p, n=n, m=m), dtype, width)


def test_nm_tpu_expansion_is_exact():
    """The one-hot expansion (row tiles over 128, and the sampled product) moves
    values bit for bit (float32 in the MXU's full-precision mode): ``A @ I`` is
    ``A``, ``A.T @ I`` is ``A.T`` and sampling ``I @ A.T`` gives back the values."""
    a = jsparse.NM.random(jax.random.key(3), (32, 64), n=2, m=4)
    v, p = a.values * 1e-3 + 1.0, a.unpacked_positions  # values with full mantissas
    dense = nm_spmm_reference(v, p, jnp.eye(64), n=2, m=4)
    eye = jnp.eye(32)
    onehot = dict(n=2, m=4, config=NMTpuConfig(2, 4, tm=256, groups=64, tn=128), interpret=True)
    assert jnp.array_equal(nm_spmm_tpu(v, p, jnp.eye(64), **onehot), dense)
    assert jnp.array_equal(nm_spmm_tpu(v, p, eye, transpose=True, **onehot), dense.T)
    assert jnp.array_equal(nm_sampled_tpu(eye, dense.T, p, n=2, m=4, interpret=True), v)


def test_nm_tpu_nonfinite_values_stay_where_stored():
    """A stored NaN or infinity reaches only the outputs it multiplies (selected on
    the VPU by the strided kernel; carried as a code, never as ``inf * 0``, by the
    sampled product's one-hot compression)."""
    n, m = 2, 4
    a = jsparse.NM.random(jax.random.key(4), (32, 64), n=n, m=m)
    v, p = a.values, a.unpacked_positions
    v = v.at[3, 5].set(jnp.nan).at[7, 9].set(jnp.inf).at[8, 1].set(-jnp.inf)
    x = jnp.abs(jax.random.normal(jax.random.key(5), (64, 3))) + 0.5
    xt = jnp.abs(jax.random.normal(jax.random.key(6), (32, 3))) + 0.5
    for transpose, operand in ((False, x), (True, xt)):
        got = nm_spmm_tpu(v, p, operand, n=n, m=m, transpose=transpose, interpret=True)
        want = nm_spmm_reference(v, p, operand, n=n, m=m, transpose=transpose)
        assert jnp.array_equal(jnp.isnan(got), jnp.isnan(want)), transpose
        assert jnp.array_equal(jnp.isposinf(got), jnp.isposinf(want)), transpose
        assert bool(jnp.allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True))
    u = xt.at[2, 1].set(jnp.inf)
    w = x.at[5, 0].set(jnp.nan)
    got = nm_sampled_tpu(u, w, p, n=n, m=m, interpret=True)
    want = nm_sampled_reference(u, w, p, n=n, m=m)
    assert jnp.array_equal(jnp.isnan(got), jnp.isnan(want))
    assert bool(jnp.allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True))


def test_nm_tpu_planner():
    cfg = plan_nm_tpu((1024, 1024), 2, 4, 64, jnp.bfloat16)
    assert (cfg.tm, cfg.tkc, cfg.tk) == (128, 256, 512)
    assert cfg.width_tile(64) == (64, 64) and cfg.width_tile(2000) == (512, 2048)
    assert cfg.width_tile(200) == (256, 256)  # whole lanes above 128 columns
    assert plan_nm((64, 64), 2, 4, 8, jnp.float32, backend="tpu") == plan_nm_tpu(
        (64, 64), 2, 4, 8, jnp.float32
    )
    for n, m in ((1, 4), (2, 8), (3, 8), (4, 8), (1, 2)):  # whole lanes of stored columns
        c = plan_nm_tpu((512, 4096), n, m, 4096, jnp.float32)
        assert c.tkc % 128 == 0 and c.tm % 32 == 0 and c.vmem_bytes(4096, 4) <= 12 * 2**20
    with pytest.raises(Unsupported, match="float16"):
        plan_nm_tpu((64, 64), 2, 4, 8, jnp.float16)
    with pytest.raises(Unsupported, match="m <= 64"):
        plan_nm_tpu((64, 1024), 1, 128, 8, jnp.float32)
    with pytest.raises(Unsupported, match="VMEM"):  # 4096 dense columns per tile
        plan_nm_tpu((64, 8192), 1, 32, 8, jnp.float32, target=V5E)
    assert plan_nm_tpu((64, 8192), 1, 32, 8, jnp.float32, target=V6E).tk == 4096  # 32 MiB
    with pytest.raises(Unsupported, match="budget on v6e"):
        plan_nm_tpu((64, 8192), 1, 64, 8, jnp.float32, target=V6E)
    with pytest.raises(Unsupported, match="v3"):  # no bfloat16 matmul for the expansion
        plan_nm_tpu((64, 64), 2, 4, 8, jnp.float32, target=target_for_kind("TPU v3", "tpu"))
    with pytest.raises(ValueError, match="1 <= n < m"):
        plan_nm_tpu((64, 64), 4, 4, 8, jnp.float32)
    with pytest.raises(Unsupported, match="multiple of 128"):
        NMTpuConfig(2, 4, tm=32, groups=32, tn=128)
    with pytest.raises(Unsupported, match="multiple of 32"):
        NMTpuConfig(2, 4, tm=16, groups=64, tn=128)
    v, p = jnp.ones((8, 16)), jnp.zeros((8, 16), jnp.uint8)
    with pytest.raises(ValueError, match="x must be"):
        nm_spmm_tpu(v, p, jnp.ones((31, 2)), n=2, m=4, interpret=True)
    with pytest.raises(ValueError, match="not for 2:4"):
        nm_spmm_tpu(
            v, p, jnp.ones((32, 2)), n=2, m=4, config=plan_nm_tpu((8, 64), 2, 8, 2, "float32")
        )


def test_nm_generic_entry_points_dispatch_to_tpu():
    a = jsparse.NM.random(jax.random.key(7), (32, 64), n=2, m=4)
    x = jnp.ones((64, 2))
    y = nm_spmm(a.values, a.unpacked_positions, x, n=2, m=4, backend="tpu", interpret=True)
    assert_close(y, a.todense() @ x, jnp.float32, 64)
    lowered = _lowered(
        functools.partial(nm_spmm, n=2, m=4, backend="tpu"), a.values, a.unpacked_positions, x
    )
    assert MOSAIC_TPU in lowered and "nm_spmm_tpu" in lowered


# ------------------------------------------------------------------ N:M adapter
@pytest.mark.parametrize(
    ("axis", "dtype"),
    [(1, jnp.float32), pytest.param(0, jnp.bfloat16, marks=pytest.mark.slow)],
    ids=["axis1-f32", "axis0-bf16"],
)
def test_nm_tpu_grads_through_the_adapter(axis, dtype):
    """Forward, ``dX`` and ``dvalues`` run the TPU kernels (interpreted) through the
    adapter's bundle and match the XLA implementation's gradients."""
    a = jsparse.NM.random(jax.random.key(8), (32, 64), n=2, m=4, axis=axis, dtype=dtype)
    x = jax.random.normal(jax.random.key(9), (64, 3), dtype)
    cfg = a.kernel_config

    def loss(values, x, kernels):
        y = core_product.spmm(kernels, cfg, False, values, a.positions, x)
        return jnp.sum(jnp.sin(_f32(y)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    gv, gx = grad(a.values, x, nm_pallas.kernels(True, backend="tpu"))
    gv_ref, gx_ref = grad(a.values, x, xla_nm.XLA_KERNELS)
    assert gv.dtype == dtype and gx.dtype == dtype
    assert_close(gv, gv_ref, dtype, 64)
    assert_close(gx, gx_ref, dtype, 64)
    # the transposed product (x @ A's backward) and a JVP
    xt = jax.random.normal(jax.random.key(10), (32, 2), dtype)
    bundle = nm_pallas.kernels(True, backend="tpu")
    f = lambda v, x: core_product.spmm(bundle, cfg, True, v, a.positions, x)  # noqa: E731
    _, tangent = jax.jvp(f, (a.values, xt), (a.values, xt))
    assert_close(tangent, 2 * f(a.values, xt), dtype, 32)
    assert_close(f(a.values, xt), _f32(a.todense()).T @ _f32(xt), dtype, 32)


def test_nm_registry_lowers_the_tpu_kernels():
    """impl="pallas" on TPU runs the Mosaic kernels forward and backward (A @ X, the
    transposed product for dX and the sampled product for dA)."""
    a = jsparse.NM.random(jax.random.key(11), (32, 64), n=2, m=4)
    x = jnp.ones((64, 3))

    def loss(a, x):
        return jnp.sum(jnp.sin(jsparse.matmul(a, x, impl="pallas")))

    lowered = _lowered(jax.grad(loss, argnums=(0, 1), allow_int=True), a, x)
    for kernel in ("nm_spmm_tpu", "nm_spmm_t_tpu", "nm_sampled_tpu"):
        assert kernel in lowered, kernel
    assert "triton" not in lowered


# ------------------------------------------------------------------ Monarch
# (shape, nblocks, block_rank, N, dtype, config): rank 1 with N = 1, bfloat16 with
# 16-row blocks, 16 tiny blocks (rows padded 6 -> 16 and 3 -> 16), two input blocks
# per step with N split in tiles
MONARCH_CASES = [
    ((64, 128), 8, 1, 1, jnp.float32, None),
    ((256, 128), 4, 16, 20, jnp.bfloat16, None),
    pytest.param(((96, 48), 16, 2, 5, jnp.bfloat16, None), marks=pytest.mark.slow),
    ((64, 64), 4, 4, 200, jnp.float32, MonarchTpuConfig(s=16, p=16, g=4, kb=2, tn=128)),
]


@pytest.mark.parametrize(
    "case",
    MONARCH_CASES,
    ids=["rank1-N1-float32", "b4-N20-bfloat16", "b16-padded-bfloat16", "kb2-tiled-float32"],
)
def test_monarch_tpu_kernel_interpret(case):
    shape, nb, rank, width, dtype, cfg = case
    a = jsparse.Monarch.init(jax.random.key(12), shape, nblocks=nb, block_rank=rank, dtype=dtype)
    x = jax.random.normal(jax.random.key(13), (shape[1], width), dtype)
    y = monarch_matmul_tpu(a.left, a.right, x, config=cfg, interpret=True)
    expected = xla_monarch.matmul(a.left, a.right, x)
    assert y.shape == expected.shape and y.dtype == dtype
    assert_close(y, expected, dtype, shape[1])
    assert_close(y, _f32(a.todense()) @ _f32(x), dtype, shape[1])
    # the transpose M.T = Monarch(right^T, left^T), the product dX needs
    xt = jax.random.normal(jax.random.key(14), (shape[0], 2), dtype)
    lt, rt = jnp.swapaxes(a.right, 1, 2), jnp.swapaxes(a.left, 1, 2)
    yt = monarch_matmul_tpu(lt, rt, xt, interpret=True)
    assert_close(yt, monarch_matmul_reference(lt, rt, xt), dtype, shape[0])
    assert_close(yt, _f32(a.todense()).T @ _f32(xt), dtype, shape[0])


def test_monarch_tpu_planner():
    cfg = plan_monarch_tpu((4, 12, 8), (4, 8, 20), 3, jnp.float32)
    assert (cfg.s, cfg.p, cfg.g, cfg.kb) == (16, 24, 2, 4)
    assert plan_monarch_tpu((4, 12, 8), (4, 8, 20), 3, jnp.bfloat16).s == 16
    assert plan_monarch((64, 64, 64), (64, 64, 64), 1024, jnp.bfloat16, backend="tpu").kb == 8
    assert plan_monarch_tpu((6, 8, 6), (6, 6, 8), 8, jnp.float32).kb == 6
    big = plan_monarch_tpu((4, 1024, 4), (4, 4, 1024), 4096, jnp.float32)  # shrinks to fit
    assert big.vmem_bytes(4096, 4) <= 12 * 2**20
    with pytest.raises(Unsupported, match="float16"):
        plan_monarch_tpu((4, 8, 8), (4, 8, 8), 8, jnp.float16)
    with pytest.raises(Unsupported, match="VMEM"):
        plan_monarch_tpu((1, 4096, 4096), (1, 4096, 4096), 8, jnp.float32, target=V6E)
    v3 = target_for_kind("TPU v3", "tpu")
    assert plan_monarch_tpu((4, 8, 8), (4, 8, 8), 8, jnp.float32, target=v3).kb == 4
    with pytest.raises(Unsupported, match="bfloat16 matmul on v3"):
        plan_monarch_tpu((4, 8, 8), (4, 8, 8), 8, jnp.bfloat16, target=v3)
    with pytest.raises(ValueError, match="do not match"):
        plan_monarch_tpu((4, 8, 8), (4, 4, 8), 8, jnp.float32)
    with pytest.raises(Unsupported, match="multiple of 128"):
        MonarchTpuConfig(s=8, p=8, g=1, kb=1, tn=64)
    left, right = jnp.ones((2, 8, 4)), jnp.ones((2, 4, 8))
    with pytest.raises(ValueError, match="x must be"):
        monarch_matmul_tpu(left, right, jnp.ones((15, 2)), interpret=True)
    with pytest.raises(ValueError, match="does not match"):
        monarch_matmul_tpu(left, right, jnp.ones((16, 2)), config=MonarchTpuConfig(8, 8, 3, 1, 128))
    # the generic entry point hands over to the TPU kernel
    y = monarch_matmul(left, right, jnp.ones((16, 2)), backend="tpu", interpret=True)
    assert_close(y, monarch_matmul_reference(left, right, jnp.ones((16, 2))), jnp.float32, 16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_monarch_tpu_grads_through_the_adapter(dtype):
    """The adapter's primitive on the TPU kernel (interpreted): gradients in all three
    operands and a JVP match the XLA product's."""
    a = jsparse.Monarch.init(jax.random.key(15), (64, 32), nblocks=4, dtype=dtype)
    x = jax.random.normal(jax.random.key(16), (32, 3), dtype)

    def loss(left, right, x, fn):
        return jnp.sum(jnp.sin(_f32(fn(left, right, x))))

    tpu = functools.partial(monarch_pallas.product, backend="tpu")
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    for got, want in zip(
        grad(a.left, a.right, x, tpu), grad(a.left, a.right, x, xla_monarch.matmul), strict=True
    ):
        assert got.dtype == want.dtype == dtype
        assert_close(got, want, dtype, 64)
    _, tangent = jax.jvp(lambda x: tpu(a.left, a.right, x), (x,), (x,))
    assert_close(tangent, xla_monarch.matmul(a.left, a.right, x), dtype, 32)
    ys = jax.vmap(lambda x: tpu(a.left, a.right, x), in_axes=1, out_axes=1)(x[:, None, :])
    assert_close(ys[:, 0], xla_monarch.matmul(a.left, a.right, x), dtype, 32)


@pytest.mark.parametrize("left", [False, True], ids=["a@x", "x@a"])
def test_monarch_registry_lowers_the_tpu_kernel(left):
    a = jsparse.Monarch.init(jax.random.key(17), (64, 32), nblocks=4)
    x = jnp.ones((3, 64) if left else (32, 3))

    def loss(a, x):
        y = jsparse.matmul(x, a, impl="pallas") if left else jsparse.matmul(a, x, impl="pallas")
        return jnp.sum(jnp.sin(y))

    lowered = _lowered(jax.grad(loss, argnums=(0, 1)), a, x)
    # forward and dx run the Mosaic kernel (the factor gradients are XLA einsums)
    assert lowered.count("monarch_matmul_tpu") >= 2 and MOSAIC_TPU in lowered
    assert "triton" not in lowered
