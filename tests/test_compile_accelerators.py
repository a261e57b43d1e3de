"""Every Pallas kernel compiled for real accelerators: H100 and A100 (Triton, ptxas) and
TPU v5e and v6e (Mosaic), on a machine without any (``compile_targets``).

Lowering alone never runs the accelerator compilers, where shared-memory and VMEM
limits, vector layouts and dtype support are checked; these tests do. The grid is a
representative one (each block shape once skinny, once wide; both orientations and
the SDDMM in one compiled function) to stay within a few minutes on two cores. A
case is skipped only when the planner refuses it with a reason; a compiler error
fails. Select them with ``pytest -m accelerators``.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import jsparse
from jsparse.formats.bcsr.pallas import unsupported_reason
from pallas_kernels.bcsr import SpmmConfig, bcsr_sddmm, bcsr_spmm, plan_sddmm, plan_spmm
from pallas_kernels.common import Unsupported
from pallas_kernels.monarch import monarch_matmul
from pallas_kernels.targets import (
    DEFAULT_GPU,
    DEFAULT_TPU,
    current_target,
    target_for_kind,
)

import compile_targets as ct

pytestmark = pytest.mark.accelerators

TARGETS = ct.targets()
F32, BF16 = jnp.float32, jnp.bfloat16
I32 = jnp.int32
# What a compiled module calls for a Pallas kernel on each platform.
KERNEL_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
KINDS = {"h100": "h100", "a100": "a100", "v5e": "v5e", "v6e": "v6e", "v3": "v3"}


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _skip_unless_planned(fn):
    """Run ``fn`` (a planner call); skip the test with the planner's reason if it refuses."""
    try:
        return fn()
    except Unsupported as e:
        pytest.skip(f"planner refuses: {e}")


# ------------------------------------------------------------------ BCSR kernels
# (block shape, N): square and rectangular blocks from 8 to 512 (2048 on TPU), each
# with a skinny and a wide N. GPU blocks are powers of two; TPU blocks multiples of 16.
GPU_GRID = [
    ((8, 8), 3),
    ((16, 16), 1),
    ((16, 16), 512),
    ((32, 32), 16),
    ((64, 64), 1),
    ((64, 64), 256),
    ((128, 128), 8),
    ((128, 128), 512),
    ((256, 256), 1),
    ((256, 256), 512),
    ((16, 64), 512),
    ((128, 32), 5),
]
GPU_BF16_ONLY = [((512, 512), 16), ((512, 512), 512)]
TPU_GRID = [
    ((16, 16), 1),
    ((32, 32), 16),
    ((64, 64), 512),
    ((128, 128), 8),
    ((256, 256), 1),
    ((256, 256), 512),
    ((16, 128), 300),
    ((128, 32), 5),
]
TPU_V5E_ONLY = [((2048, 2048), 512)]
# A100 and v6e run the code paths of H100 and v5e with other on-chip budgets (shared
# memory, VMEM): there, the blocks the budget binds (the largest, skinny and wide) and
# one rectangular block, rather than the whole grid again.
BUDGET_GRID = {
    "a100": [((16, 64), 512), ((256, 256), 1), ((256, 256), 512)],
    "v6e": [((16, 128), 300), ((256, 256), 1), ((256, 256), 512)],
}


def _grid():
    cases = []
    for t in TARGETS:
        for dtype in (F32, BF16):
            if t.backend == "gpu":
                grid = BUDGET_GRID.get(t.name, GPU_GRID) + (GPU_BF16_ONLY if dtype == BF16 else [])
            else:
                grid = BUDGET_GRID.get(t.name, TPU_GRID) + (TPU_V5E_ONLY if t.name == "v5e" else [])
            for block, n in grid:
                big = max(block) >= 512
                marks = [pytest.mark.slow] if big else []
                cases.append(
                    pytest.param(
                        t, block, n, dtype, marks=marks,
                        id=f"{t.name}-{block[0]}x{block[1]}-N{n}-{jnp.dtype(dtype).name}",
                    )
                )  # fmt: skip
    return cases


def _bcsr_kernels(block, n, dtype, backend):
    """One function running the three BCSR kernels of ``A @ X`` and its gradient:
    ``A @ X``, ``A.T @ dY`` (the CSC view) and the SDDMM ``dA``; 2x2 block-rows and
    -columns, 3 stored blocks."""
    bm, bn = block
    m, k, nse = 2 * bm, 2 * bn, 3
    shape = (m, k)

    def fn(data, indptr, indices, colptr, perm, rows, x, dy):
        y = bcsr_spmm(data, indptr, indices, x, shape=shape, backend=backend)
        dx = bcsr_spmm(data, colptr, rows, dy, perm=perm, shape=shape, transpose=True,
                       backend=backend)  # fmt: skip
        da = bcsr_sddmm(dy, x, rows, indices, block_shape=block, backend=backend)
        return y, dx, da

    args = (
        _sds((nse, bm, bn), dtype),
        _sds((m // bm + 1,), I32),
        _sds((nse,), I32),
        _sds((k // bn + 1,), I32),
        _sds((nse,), I32),
        _sds((nse,), I32),
        _sds((k, n), dtype),
        _sds((m, n), dtype),
    )
    return fn, args


@pytest.mark.parametrize(("target", "block", "n", "dtype"), _grid())
def test_bcsr_kernels_compile(target, block, n, dtype):
    tk = target_for_kind(ct.device(target).device_kind)
    for transpose in (False, True):
        cfg = _skip_unless_planned(
            lambda tr=transpose: plan_spmm(
                block, n, dtype, backend=target.backend, transpose=tr, target=tk
            )  # fmt: skip
        )
        assert cfg.onchip_bytes(dtype) <= tk.budget
    _skip_unless_planned(lambda: plan_sddmm(block, n, dtype, backend=target.backend, target=tk))
    fn, args = _bcsr_kernels(block, n, dtype, target.backend)
    result = ct.compile_for(fn, args, target)
    assert result.text().count(KERNEL_CALL[target.platform]) >= 3


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["float32", "bfloat16"])
def test_bcsr_tpu_v3_compiles_bfloat16_with_float32_operands(dtype):
    # Mosaic on v2/v3 has no bfloat16 matmul ("Unsupported matmul RHS type"): the
    # planner multiplies in float32 there (and only there).
    v3 = target_for_kind("TPU v3")
    cfg = plan_spmm((128, 128), 256, dtype, backend="tpu", target=v3)
    assert cfg.f32_operands == (dtype == BF16)
    assert not plan_spmm((128, 128), 256, dtype, backend="tpu", target=DEFAULT_TPU).f32_operands
    assert plan_sddmm((128, 128), 256, dtype, backend="tpu", target=v3).f32_operands == (
        dtype == BF16
    )
    fn, args = _bcsr_kernels((128, 128), 256, dtype, "tpu")
    ct.compile_for(fn, args, ct.target("v3"))


@pytest.mark.parametrize(
    ("target", "config", "limit"),
    [
        # the untiled 256x256 float32 block the planner used to choose: ~512 KB of
        # shared memory against H100's 227 KiB
        ("h100", SpmmConfig((256, 256), 128, "gpu"), "Shared memory size limit exceeded"),
        # a whole 2048x2048 bfloat16 block double-buffered: ~35 MB against 16 MiB
        ("v5e", SpmmConfig((2048, 2048), 256, "tpu"), "vmem"),
    ],
    ids=["h100-smem", "v5e-vmem"],
)
def test_compiler_limits_are_real(target, config, limit):
    # The harness runs the real compilers: an untiled block the planner never picks
    # fails to compile, and the planner's estimate says it would not fit.
    t = ct.target(target)
    dtype = F32 if t.backend == "gpu" else BF16
    assert config.onchip_bytes(dtype) > target_for_kind(ct.device(t).device_kind).budget
    bm, bn = config.block_shape
    shape = (2 * bm, 2 * bn)

    def fn(data, indptr, indices, x):
        return bcsr_spmm(data, indptr, indices, x, shape=shape, backend=t.backend, config=config)

    args = (
        _sds((3, bm, bn), dtype),
        _sds((3,), I32),
        _sds((3,), I32),
        _sds((shape[1], 512), dtype),
    )
    with pytest.raises(Exception, match=re.compile(limit, re.IGNORECASE)):
        ct.compile_for(fn, args, t)


# ------------------------------------------------------------------ planners and targets
@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_the_default_device_selects_the_target(target):
    dev = ct.device(target)
    assert current_target(target.backend) in (DEFAULT_GPU, DEFAULT_TPU)  # CPU default device
    with jax.default_device(dev):
        assert current_target(target.backend).name == KINDS[target.name]
        other = "tpu" if target.backend == "gpu" else "gpu"
        assert current_target(other) in (DEFAULT_GPU, DEFAULT_TPU)


def test_planners_budget_each_target():
    h100, a100 = target_for_kind("NVIDIA H100 80GB HBM3"), target_for_kind("NVIDIA A100-SXM4")
    v5e, v6e = target_for_kind("TPU v5 lite"), target_for_kind("TPU v6 lite")
    assert (h100.smem_bytes, a100.smem_bytes) == (232448, 166912)
    assert (v5e.vmem_bytes, v6e.vmem_bytes) == (16 << 20, 32 << 20)
    for t in (h100, a100, DEFAULT_GPU):
        for dtype in (F32, BF16):
            for tr in (False, True):
                cfg = plan_spmm((256, 256), 4096, dtype, backend="gpu", transpose=tr, target=t)
                assert cfg.onchip_bytes(dtype) <= t.smem_bytes
                assert (cfg.tm, cfg.tk) != (256, 256)
            assert plan_sddmm((512, 512), 512, dtype, backend="gpu", target=t).tm <= 128
    for t in (v5e, v6e):
        cfg = plan_spmm((2048, 2048), 4096, BF16, backend="tpu", target=t)
        assert cfg.onchip_bytes(BF16) <= t.vmem_bytes * 3 // 4
        assert cfg.tm * cfg.tk < 2048 * 2048
    # small blocks are never tiled
    assert plan_spmm((64, 64), 16, F32, backend="gpu", target=h100).tm == 64


def test_a_block_that_cannot_fit_is_refused_with_the_limit_and_the_request():
    v5e = target_for_kind("TPU v5 lite")
    # 1000 is a multiple of 8 but not of 128: the block cannot be tiled on a TPU, and
    # whole (double-buffered) it needs more than v5e's 16 MiB of scoped VMEM.
    with pytest.raises(
        Unsupported, match=r"blocks \(1000, 1000\).*scoped VMEM of v5e \(16777216 bytes"
    ):
        plan_spmm((1000, 1000), 256, F32, backend="tpu", target=v5e)
    with pytest.raises(Unsupported, match="must be a multiple of 128"):
        plan_spmm((2056, 2056), 8, F32, backend="tpu", target=v5e)
    reason = unsupported_reason((1000, 1000), 256, F32, "tpu")
    assert "scoped VMEM" in reason and "16777216" in reason


def test_auto_takes_xla_and_pallas_raises_where_a_block_cannot_fit():
    a = jsparse.BCSR.fromdense(jnp.zeros((2000, 2000)).at[0, 0].set(1.0), block_shape=(1000, 1000))
    x = jnp.ones((2000, 256))
    auto = ct.compile_for(lambda a, x: jsparse.matmul(a, x), (a, x), "v5e")
    assert KERNEL_CALL["tpu"] not in auto.text()
    with pytest.raises(ValueError, match=r"impl='pallas'.*scoped VMEM.*16777216"):
        ct.compile_for(lambda a, x: jsparse.matmul(a, x, impl="pallas"), (a, x), "v5e")
    # the gradient program too
    pallas = functools.partial(jsparse.matmul, impl="pallas")
    with pytest.raises(ValueError, match=r"impl='pallas'.*pallas \(tpu\): .*scoped VMEM.*16777216"):
        ct.compile_for(_loss(pallas), (a, x), "v5e")


# ------------------------------------------------------------------ through jsparse
def _loss(op):
    def loss(a, x):
        return jnp.sum(op(a, x).astype(jnp.float32) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1), allow_int=True)


def _pallas_only(text, platform, at_least):
    assert text.count(KERNEL_CALL[platform]) >= at_least, "the Pallas kernels did not run"


@pytest.mark.parametrize("target", TARGETS, ids=str)
@pytest.mark.parametrize(
    ("orient", "dtype"), [("AX", BF16), ("XA", F32)], ids=["AX-bfloat16", "XA-float32"]
)
def test_bcsr_value_and_grad_compiles(target, orient, dtype):
    a = jsparse.BCSR.random(jax.random.key(0), (256, 512), density=0.3, block_shape=(32, 128),
                            dtype=dtype)  # fmt: skip
    if orient == "AX":
        x, op = jnp.ones((512, 16), dtype), lambda a, x: jsparse.matmul(a, x, impl="pallas")
    else:
        x, op = jnp.ones((24, 256), dtype), lambda a, x: jsparse.matmul(x, a, impl="pallas")
    result = ct.compile_for(_loss(op), (a, x), target)
    _pallas_only(result.text(), target.platform, 3)


def _per_target(common, more, more_on=("h100", "v5e")):
    """``common`` cases on every target, ``more`` on one GPU and one TPU target."""
    out = []
    for t in TARGETS:
        for case in common + (more if t.name in more_on else []):
            *values, name = case
            out.append(pytest.param(t, *values, id=f"{t.name}-{name}"))
    return out


# N:M n:m along either axis (axis=-1: groups along the contraction of A @ X).
NM_COMMON = [((2, 4), -1, 16, BF16, "2:4-axis1-N16-bfloat16")]
NM_MORE = [
    ((1, 4), 0, 1, F32, "1:4-axis0-N1-float32"),
    ((2, 8), -1, 512, BF16, "2:8-axis1-N512-bfloat16"),
    ((4, 8), 0, 64, F32, "4:8-axis0-N64-float32"),
]


@pytest.mark.parametrize(("target", "nm", "axis", "n", "dtype"), _per_target(NM_COMMON, NM_MORE))
def test_nm_value_and_grad_compiles(target, nm, axis, n, dtype):
    a = jsparse.NM.random(jax.random.key(0), (128, 256), n=nm[0], m=nm[1], axis=axis, dtype=dtype)
    x = jnp.ones((256, n), dtype)
    op = lambda a, x: jsparse.matmul(a, x, impl="pallas")  # noqa: E731
    try:
        result = ct.compile_for(_loss(op), (a, x), target)
    except ValueError as e:  # the planner refused on every platform
        if "impl='pallas' cannot" not in str(e):
            raise
        pytest.skip(f"planner refuses: {e}")
    _pallas_only(result.text(), target.platform, 2)


MONARCH_COMMON = [(16, 512, BF16, "nb16-N512-bfloat16")]
MONARCH_MORE = [(4, 16, F32, "nb4-N16-float32"), (64, 1, F32, "nb64-N1-float32")]


@pytest.mark.parametrize(
    ("target", "nblocks", "n", "dtype"), _per_target(MONARCH_COMMON, MONARCH_MORE)
)
def test_monarch_value_and_grad_compiles(target, nblocks, n, dtype):
    a = jsparse.Monarch.init(jax.random.key(0), (256, 256), nblocks=nblocks, dtype=dtype)
    x = jnp.ones((256, n), dtype)
    op = lambda a, x: jsparse.matmul(a, x, impl="pallas")  # noqa: E731
    try:
        result = ct.compile_for(_loss(op), (a, x), target)
    except ValueError as e:
        if "impl='pallas' cannot" not in str(e):
            raise
        pytest.skip(f"planner refuses: {e}")
    _pallas_only(result.text(), target.platform, 2)


@pytest.mark.parametrize("target", [t for t in TARGETS if t.backend == "gpu"], ids=str)
def test_tall_monarch_blocks_compile_on_gpus(target):
    # 4096² with 4 blocks (1024-row blocks of rank 256), the GPU suite's case: the
    # planner tiles the output rows to fit shared memory
    a = jax.ShapeDtypeStruct((4, 1024, 1024), BF16)
    x = jax.ShapeDtypeStruct((4096, 1024), BF16)
    result = ct.compile_for(lambda lf, rf, x: monarch_matmul(lf, rf, x), (a, a, x), target)
    _pallas_only(result.text(), "cuda", 1)
