"""Pallas block-sparse attention on CPU: the kernels in interpret mode against their
dense reference and the XLA implementation, the ``impl="pallas"`` path of
``block_sparse_attention`` (forward, log-sum-exp, gradients), the planner, lowering
for ``cuda``/``tpu``, and (``-m accelerators``) compilation for H100, A100, v5e, v6e.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse.attention as ja
import jsparse.attention.pallas  # noqa: F401  (registers impl="pallas")
from pallas_kernels.attention import (
    AttentionConfig,
    attention_mask_reference,
    block_sparse_attention_bwd,
    block_sparse_attention_bwd_reference,
    block_sparse_attention_fwd,
    block_sparse_attention_reference,
    plan_attention,
)
from pallas_kernels.common import Unsupported

TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 2e-2}


def _close(a, b, dtype=jnp.float32):
    tol = TOL[jnp.dtype(dtype)]
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _lists(m: ja.BlockMask):
    return (m.full_kv, m.full_count, m.partial_kv, m.partial_count, m.partial_mask,
            m.mask_blocks)  # fmt: skip


def _cols(m: ja.BlockMask):
    return (m.full_q, m.full_q_count, m.partial_q, m.partial_q_count, m.partial_q_mask)


def _random_mask(heads, length, block, seed):
    """A per-head random pattern with full, partial and empty blocks (and an empty
    query block)."""
    rng = np.random.default_rng(seed)
    bq, bk = block
    blocks = rng.random((heads, length // bq, length // bk)) < 0.6
    blocks[:, 1] = False  # query block 1 attends to nothing
    whole = rng.random(blocks.shape) < 0.5
    up = lambda b: np.repeat(np.repeat(b, bq, 1), bk, 2)  # noqa: E731
    dense = up(blocks) & (up(whole) | (rng.random((heads, length, length)) < 0.5))
    return dense, ja.BlockMask.from_dense(dense, block_size=block)


def _qkv(b, h, hkv, length, d, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, h, length, d), dtype)
    k = jax.random.normal(keys[1], (b, hkv, length, d), dtype)
    v = jax.random.normal(keys[2], (b, hkv, length, d), dtype)
    return q, k, v


# (backend, block, length, heads / kv heads, dtype, per-head mask, segments + cap)
KERNEL_CASES = [
    ("gpu", (16, 16), 64, (2, 1), jnp.float32, False, False),
    ("gpu", (16, 32), 64, (4, 2), jnp.float32, True, True),
    ("gpu", (16, 16), 48, (2, 2), jnp.bfloat16, True, False),
    ("tpu", (8, 128), 256, (2, 1), jnp.float32, True, True),
    ("tpu", (16, 128), 256, (2, 2), jnp.bfloat16, False, False),
]


@pytest.mark.parametrize(
    "case", KERNEL_CASES, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}-{jnp.dtype(c[4]).name}"
                               for c in KERNEL_CASES],
)  # fmt: skip
def test_kernel_interpret_matches_reference(case):
    backend, block, length, (h, hkv), dtype, per_head, seg_cap = case
    dense, m = _random_mask(h if per_head else 1, length, block, seed=len(block) + length)
    q, k, v = _qkv(2, h, hkv, length, 16, dtype)
    kw = {}
    if seg_cap:
        seg = jnp.asarray(np.random.default_rng(1).integers(0, 2, (2, length)), jnp.int32)
        kw = dict(q_segment_ids=seg, kv_segment_ids=seg[:, ::-1], logits_soft_cap=2.0)
    out, lse = block_sparse_attention_fwd(
        q, k, v, *_lists(m), block_size=block, backend=backend, interpret=True, **kw
    )
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == jnp.float32
    ref_out, ref_lse = block_sparse_attention_reference(q, k, v, *_lists(m), **kw)
    _close(out, ref_out, dtype)
    empty = ~np.asarray(ref_lse > -np.inf)
    assert empty[:, :, block[0] : 2 * block[0]].all()  # the empty query block
    np.testing.assert_array_equal(np.asarray(lse) == -np.inf, empty)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)
    _close(np.where(empty, 0, lse), np.where(empty, 0, ref_lse), dtype)
    # the reference's mask is the dense one the block mask came from
    dm = attention_mask_reference(*_lists(m), kv_blocks=length // block[1])
    np.testing.assert_array_equal(dm, dense)
    if backend == "tpu":  # the other layout, transposed around the Mosaic kernel
        swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        out_t, lse_t = block_sparse_attention_fwd(
            swap(q), swap(k), swap(v), *_lists(m), block_size=block, backend=backend,
            layout="BLHD", interpret=True, **kw,
        )  # fmt: skip
        np.testing.assert_array_equal(swap(out_t), out)
        np.testing.assert_array_equal(lse_t, lse)
    # backward: dq over the rows, dk/dv over the transposed view
    keys = jax.random.split(jax.random.key(7), 2)
    d_out = jax.random.normal(keys[0], q.shape, dtype)
    d_lse = jax.random.normal(keys[1], lse.shape)
    grads = block_sparse_attention_bwd(
        q, k, v, out, lse, d_out, d_lse, _lists(m)[:5], _cols(m), m.mask_blocks,
        block_size=block, backend=backend, interpret=True, **kw,
    )  # fmt: skip
    ref = block_sparse_attention_bwd_reference(q, k, v, d_out, d_lse, _lists(m)[:5],
                                               m.mask_blocks, **kw)  # fmt: skip
    for g, r, x in zip(grads, ref, (q, k, v), strict=True):
        assert g.shape == x.shape and g.dtype == dtype
        _close(g, r, dtype)


def test_pallas_impl_matches_xla_with_gradients():
    length, block = 40, (16, 16)  # 40: padded to 48
    fn = (ja.causal() & ja.local(12)) | ja.global_tokens(3)
    m = ja.BlockMask.from_fn([fn, ja.causal(), ja.strided(3), ja.local(5, 5)], length, length,
                             block_size=block)  # fmt: skip
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (2, length, 4, 24))  # D = 24: padded to 32 in the kernels
    k = jax.random.normal(keys[1], (2, length, 2, 24))
    v = jax.random.normal(keys[2], (2, length, 2, 24))
    seg = jnp.asarray(np.repeat([[0, 1]], 20, axis=1).repeat(2, 0))
    kw = dict(segment_ids=seg, logits_soft_cap=4.0)

    def loss(impl, q, k, v):
        out, lse = ja.block_sparse_attention(q, k, v, m, impl=impl, return_lse=True, **kw)
        return jnp.sum(out**2) + jnp.sum(jnp.where(lse > -jnp.inf, lse, 0.0)), (out, lse)

    grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
    (gp, (out_p, lse_p)), (gx, (out_x, lse_x)) = grad("pallas", q, k, v), grad("xla", q, k, v)
    _close(out_p, out_x)
    np.testing.assert_allclose(lse_p, lse_x, rtol=2e-5, atol=2e-5)
    for a, b in zip(gp, gx, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    dense = jax.nn.dot_product_attention(
        q, k, v, mask=m.to_dense()[None] & (seg[:, None, :, None] == seg[:, None, None, :])
    )
    capped = ja.block_sparse_attention(q, k, v, m, impl="pallas", segment_ids=seg)
    _close(capped, dense, jnp.float32)


def test_planner_and_config():
    assert plan_attention((64, 64), 80, jnp.bfloat16, backend="gpu").head_dim == 128
    assert plan_attention((128, 128), 64, jnp.float32, backend="tpu").block_size == (128, 128)
    with pytest.raises(Unsupported, match="support only"):
        plan_attention((64, 64), 64, jnp.float64, backend="gpu")
    with pytest.raises(Unsupported, match="multiple of 128"):
        plan_attention((64, 64), 64, jnp.float32, backend="tpu")
    with pytest.raises(Unsupported, match="multiples of 16 rows"):
        plan_attention((8, 128), 64, jnp.bfloat16, backend="tpu")
    with pytest.raises(Unsupported, match="power-of-two"):
        AttentionConfig((48, 64), 64)
    with pytest.raises(Unsupported, match=">= 16"):
        AttentionConfig((8, 8), 16)
    with pytest.raises(ValueError, match="backend"):
        AttentionConfig((16, 16), 16, backend="cuda")
    # on-chip budgets of the target chip
    from pallas_kernels.targets import target_for_kind

    h100, a100 = target_for_kind("NVIDIA H100 80GB HBM3"), target_for_kind("NVIDIA A100")
    assert plan_attention((128, 128), 128, jnp.bfloat16, backend="gpu", target=a100)
    with pytest.raises(Unsupported, match="shared memory .* a100 has 166912"):
        plan_attention((128, 128), 256, jnp.bfloat16, backend="gpu", target=a100)
    with pytest.raises(Unsupported, match="h100 has 232448"):
        plan_attention((64, 64), 256, jnp.float32, backend="gpu", target=h100)
    with pytest.raises(Unsupported, match="no 16-bit matmuls"):
        plan_attention((128, 128), 64, jnp.bfloat16, backend="tpu",
                       target=target_for_kind("TPU v3"))  # fmt: skip


def test_bad_operands():
    _, m = _random_mask(1, 32, (16, 16), seed=0)
    q, k, v = _qkv(1, 2, 2, 32, 16, jnp.float32)
    call = functools.partial(block_sparse_attention_fwd, block_size=(16, 16), interpret=True)
    with pytest.raises(ValueError, match="must divide the padded lengths"):
        call(q[:, :, :24], k, v, *_lists(m))
    with pytest.raises(ValueError, match="key heads 3 must divide"):
        call(q, *_qkv(1, 3, 3, 32, 16, jnp.float32)[1:], *_lists(m))
    with pytest.raises(ValueError, match="full_kv must be"):
        call(q, k, v, m.full_kv[:, :1], *_lists(m)[1:])
    with pytest.raises(ValueError, match="mask_blocks must be"):
        call(q, k, v, *_lists(m)[:5], m.mask_blocks[:, :8])
    with pytest.raises(ValueError, match="both q_segment_ids"):
        call(q, k, v, *_lists(m), q_segment_ids=jnp.zeros((1, 32), int))
    # the registry turns an Unsupported configuration into a clear error
    m64 = ja.BlockMask.from_fn(ja.causal(), 32, 32, block_size=(8, 8))
    x = jnp.ones((1, 32, 2, 16))
    with pytest.raises(ValueError, match=">= 16"):
        ja.block_sparse_attention(x, x, x, m64, impl="pallas")


# ------------------------------------------------------------------ lowering
def _lowered(fn, *args, platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


TRITON = "__gpu$xla.gpu.triton"
MOSAIC_TPU = "tpu_custom_call"


def test_auto_picks_the_kernels_when_lowered_for_accelerators():
    m = ja.BlockMask.from_fn(ja.causal() & ja.local(128), 512, 512, block_size=(128, 128))
    x = jnp.ones((1, 512, 2, 64), jnp.bfloat16)

    def loss(q, k, v):
        return ja.block_sparse_attention(q, k, v, m).astype(jnp.float32).sum()

    grad = jax.grad(loss, argnums=(0, 1, 2))
    cuda = _lowered(grad, x, x, x, platform="cuda")
    tpu = _lowered(grad, x, x, x, platform="tpu")
    assert TRITON in cuda and MOSAIC_TPU in tpu
    for kernel in ("block_sparse_attention_fwd", "block_sparse_attention_dq",
                   "block_sparse_attention_dkv"):  # fmt: skip
        assert kernel in cuda and kernel in tpu, kernel
    cpu = _lowered(grad, x, x, x, platform="cpu")
    assert TRITON not in cpu and MOSAIC_TPU not in cpu
    # a pattern the TPU kernel cannot tile (bk = 64) falls back to XLA there
    m64 = ja.BlockMask.from_fn(ja.causal() & ja.local(64), 512, 512, block_size=(64, 64))
    f = lambda q: ja.block_sparse_attention(q, q, q, m64)  # noqa: E731
    assert MOSAIC_TPU not in _lowered(f, x, platform="tpu")
    assert TRITON in _lowered(f, x, platform="cuda")


def test_the_nnx_layer_runs_the_kernels_on_accelerators():
    from flax import nnx

    from jsparse.nn import SparseMultiHeadAttention

    layer = SparseMultiHeadAttention(
        2, 128, mask=ja.local(127) | ja.global_tokens(8), block_size=(128, 128),
        dtype=jnp.bfloat16, decode=False, rngs=nnx.Rngs(0),
    )  # fmt: skip
    x = jnp.ones((1, 512, 128))
    f = lambda x: layer(x, is_causal=True)  # noqa: E731
    assert TRITON in _lowered(f, x, platform="cuda")
    assert MOSAIC_TPU in _lowered(f, x, platform="tpu")
    assert TRITON not in _lowered(f, x, platform="cpu")


# ------------------------------------------------------------------ compiled
@pytest.mark.accelerators
def test_kernels_compile_for_accelerators():
    from compile_targets import compile_for, targets

    for target in targets():
        block = (64, 64) if target.backend == "gpu" else (128, 128)
        m = ja.BlockMask.from_fn(ja.causal() & ja.local(256) | ja.global_tokens(16), 1024, 1024,
                                 block_size=block)  # fmt: skip
        x = jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.bfloat16)
        kv = jax.ShapeDtypeStruct((1, 1024, 2, 64), jnp.bfloat16)
        seg = jax.ShapeDtypeStruct((1, 1024), jnp.int32)

        def fwd(q, k, v, m, seg):
            return ja.block_sparse_attention(q, k, v, m, impl="pallas", segment_ids=seg,
                                             logits_soft_cap=30.0)  # fmt: skip

        def grad(q, k, v, m):
            def loss(q, k, v):
                return ja.block_sparse_attention(q, k, v, m, impl="pallas").sum()

            return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        marker = TRITON if target.backend == "gpu" else MOSAIC_TPU
        for fn, args in ((fwd, (x, kv, kv, m, seg)), (grad, (x, kv, kv, m))):
            text = compile_for(fn, args, target).text()
            assert marker in text and "block_sparse_attention_fwd" in text, target.name
        assert "block_sparse_attention_dq" in text and "block_sparse_attention_dkv" in text
