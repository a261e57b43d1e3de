"""Blocks tiled inside the kernel (``tm x tk`` per step) and the target-aware planners,
on CPU: the tiled GPU and TPU kernels in the Pallas interpreter against the
references, and the planners' budgets (``pallas_kernels.targets``). Their compilation
for real chips is ``tests/test_compile_accelerators.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.bcsr import (
    SddmmConfig,
    SpmmConfig,
    bcsr_sddmm,
    bcsr_sddmm_reference,
    bcsr_spmm,
    bcsr_spmm_reference,
    csc_view,
    plan_spmm,
)
from pallas_kernels.common import Unsupported
from pallas_kernels.monarch import (
    MonarchConfig,
    monarch_matmul,
    monarch_matmul_reference,
    plan_monarch,
)
from pallas_kernels.targets import (
    DEFAULT_GPU,
    DEFAULT_TPU,
    KNOWN_TARGETS,
    Target,
    current_target,
    fit_tiles,
    target_for_kind,
)

SHAPE, BLOCK = (128, 256), (32, 128)


def assert_close(got, want, dtype):
    """Within a tolerance per dtype, relative to the largest reference entry (sums of
    a few hundred products in another order differ in the last float32 bits)."""
    want = np.asarray(want, np.float32)
    scale = max(float(np.max(np.abs(want))), 1.0)
    tol = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=tol * scale)


def _pattern(seed=0):
    """A BCSR pattern of SHAPE in BLOCK blocks with an empty block-row."""
    rng = np.random.default_rng(seed)
    nr, nc = SHAPE[0] // BLOCK[0], SHAPE[1] // BLOCK[1]
    mask = rng.random((nr, nc)) < 0.6
    mask[0] = True
    mask[2] = False
    rows, cols = np.nonzero(mask)
    indptr = np.searchsorted(rows, np.arange(nr + 1)).astype(np.int32)
    return jnp.asarray(indptr), jnp.asarray(cols, jnp.int32), jnp.asarray(rows, jnp.int32)


# (backend, tm, tk) for A @ X; transposed cases swap the roles of the block sides.
TILES = [("gpu", 16, 32), ("gpu", 32, 64), ("tpu", 8, 128), ("tpu", 16, 128)]


@pytest.mark.parametrize("transpose", [False, True], ids=["AX", "ATX"])
@pytest.mark.parametrize(("backend", "t_out", "t_in"), TILES)
def test_tiled_spmm_matches_the_reference(backend, t_out, t_in, transpose):
    indptr, indices, rows = _pattern()
    data = jax.random.normal(jax.random.key(0), (indices.shape[0], *BLOCK))
    n = 20
    x = jax.random.normal(jax.random.key(1), (SHAPE[0] if transpose else SHAPE[1], n))
    if transpose:  # A.T @ X: output rows are bn-blocks (lane side on TPU), inputs bm
        tm, tk = t_in, t_out
        ptr, perm, src = csc_view(indptr, indices, SHAPE[1] // BLOCK[1])
        kw = {"perm": perm}
    else:
        tm, tk = t_out, t_in
        ptr, src, kw = indptr, indices, {}
    tn = 32 if backend == "gpu" else 24
    cfg = SpmmConfig(BLOCK, tn, backend, transpose, tm=tm, tk=tk)
    assert (cfg.out_block // cfg.tm) * (cfg.in_block // cfg.tk) > 1  # really tiled
    y = bcsr_spmm(data, ptr, src, x, shape=SHAPE, transpose=transpose, backend=backend,
                  config=cfg, interpret=True, **kw)  # fmt: skip
    want = bcsr_spmm_reference(data, indptr, indices, x, shape=SHAPE, transpose=transpose)
    assert_close(y, want, jnp.float32)


@pytest.mark.parametrize(("backend", "tm", "tn"), [("gpu", 16, 32), ("tpu", 8, 128)])
def test_tiled_sddmm_matches_the_reference(backend, tm, tn):
    _, indices, rows = _pattern()
    u = jax.random.normal(jax.random.key(2), (SHAPE[0], 40))
    v = jax.random.normal(jax.random.key(3), (SHAPE[1], 40))
    tj = 16 if backend == "gpu" else 128
    cfg = SddmmConfig(BLOCK, tj, backend, tm=tm, tn=tn)
    got = bcsr_sddmm(u, v, rows, indices, block_shape=BLOCK, backend=backend, config=cfg,
                     interpret=True)  # fmt: skip
    assert_close(got, bcsr_sddmm_reference(u, v, rows, indices, block_shape=BLOCK), jnp.float32)


def test_float32_operands_for_tpu_v3_bfloat16():
    indptr, indices, _ = _pattern()
    data = jax.random.normal(jax.random.key(0), (indices.shape[0], *BLOCK), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (SHAPE[1], 16), jnp.bfloat16)
    cfg = plan_spmm(BLOCK, 16, jnp.bfloat16, backend="tpu", target=target_for_kind("TPU v3"))
    assert cfg.f32_operands
    y = bcsr_spmm(data, indptr, indices, x, shape=SHAPE, backend="tpu", config=cfg,
                  interpret=True)  # fmt: skip
    assert y.dtype == jnp.bfloat16
    assert_close(y, bcsr_spmm_reference(data, indptr, indices, x, shape=SHAPE), jnp.bfloat16)


def test_tile_configs_are_validated():
    with pytest.raises(ValueError, match="tm=24 must divide the block side 32"):
        SpmmConfig((32, 128), 16, tm=24)
    with pytest.raises(Unsupported, match=r"multiples of \(8, 128\)"):
        SpmmConfig((32, 256), 16, "tpu", tk=64)  # the lane side of a block
    with pytest.raises(ValueError, match="tn=48 must divide the block side 256"):
        SddmmConfig((32, 256), 16, tn=48)
    with pytest.raises(ValueError, match="is a tpu target, not gpu"):
        plan_spmm((32, 32), 8, jnp.float32, backend="gpu", target=DEFAULT_TPU)


def test_target_kinds():
    kinds = {
        "NVIDIA H100 80GB HBM3": "h100",
        "NVIDIA H200": "h100",
        "NVIDIA A100-SXM4-40GB": "a100",
        "NVIDIA L4": "sm86",
        "NVIDIA GeForce RTX 4090": "sm86",
        "Some future GPU": "gpu-default",
        "TPU v3": "v3",
        "TPU v4": "v4",
        "TPU v5 lite": "v5e",
        "TPU v5": "v5p",
        "TPU v6 lite": "v6e",
        "TPU7x": "v7x",
        "TPU v9 hypothetical": "tpu-default",
    }
    for kind, name in kinds.items():
        assert target_for_kind(kind).name == name, kind
    # budgets from the vendors' specifications
    assert target_for_kind("NVIDIA H100 80GB HBM3").smem_bytes == 232448
    assert target_for_kind("NVIDIA A100-SXM4-40GB").smem_bytes == 166912
    assert DEFAULT_GPU.smem_bytes == min(t.smem_bytes for t in KNOWN_TARGETS if t.backend == "gpu")
    assert DEFAULT_TPU.vmem_bytes == min(t.vmem_bytes for t in KNOWN_TARGETS if t.backend == "tpu")
    # on this CPU-only machine the planners budget for the smallest chips
    assert current_target("gpu") is DEFAULT_GPU and current_target("tpu") is DEFAULT_TPU


@settings(max_examples=60, deadline=None)
@given(
    out_side=st.sampled_from([8, 16, 32, 64, 128, 256, 512, 1024, 2048]),
    in_side=st.sampled_from([8, 16, 32, 64, 128, 256, 512, 1024, 2048]),
    budget=st.integers(1 << 12, 1 << 25),
    backend=st.sampled_from(["gpu", "tpu"]),
)
def test_fit_tiles_fits_divides_and_is_largest(out_side, in_side, budget, backend):
    target = Target("t", backend, smem_bytes=budget, vmem_bytes=budget)
    usable = budget if backend == "gpu" else budget * 3 // 4

    def need(tm, tk):
        return 4 * (tm * tk + tk * 64)

    try:
        tm, tk = fit_tiles(out_side, in_side, need, target, kernel="k", request="r", cap=128)
    except Unsupported as e:
        assert "k cannot" in str(e) and "r" in str(e)
        return
    assert out_side % tm == 0 and in_side % tk == 0
    assert need(tm, tk) <= usable
    if backend == "tpu":
        assert tm == out_side or tm % 128 == 0

    # no tiling with more elements per step fits (the allowed tiles, from the spec)
    def allowed(side):
        if backend == "gpu":
            return [t for t in (2**i for i in range(12)) if min(side, 16) <= t <= min(side, 128)]
        return [t for t in range(128, 129) if side % t == 0 and t != side] + (
            [side] if side <= 128 else []
        )

    for a in allowed(out_side):
        for b in allowed(in_side):
            if a * b > tm * tk:
                assert need(a, b) > usable, (a, b)


def test_tiled_monarch_rows_match_the_reference():
    kl, kr, kx = jax.random.split(jax.random.key(4), 3)
    nb, s, g, p = 2, 64, 16, 32
    left = jax.random.normal(kl, (nb, s, nb * g))
    right = jax.random.normal(kr, (nb, nb * g, p))
    x = jax.random.normal(kx, (nb * p, 20))
    cfg = MonarchConfig(s=s, p=p, g=g, tp=16, tn=32, ts=16)  # 4 row tiles per block
    y = monarch_matmul(left, right, x, config=cfg, interpret=True)
    assert_close(y, monarch_matmul_reference(left, right, x), jnp.float32)
    with pytest.raises(ValueError, match="ts=128 must divide s=64"):
        MonarchConfig(s=64, p=32, g=16, tp=16, tn=32, ts=128)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_monarch_planner_tiles_tall_blocks_to_fit(dtype):
    # 4096² with 4 blocks: s = p = 1024 rows, rank 256 (the GPU suite's case): once
    # refused (s > 256), now tiled to fit each GPU's shared memory
    for kind in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA L4"):
        t = target_for_kind(kind)
        cfg = plan_monarch((4, 1024, 1024), (4, 1024, 1024), 1024, dtype, target=t)
        assert cfg.ts < cfg.s and cfg.onchip_bytes(dtype) <= t.smem_bytes
    # blocks that fit whole stay whole (no recomputation of the middle product)
    assert plan_monarch((16, 256, 256), (16, 256, 256), 1024, dtype).ts == 256
