"""jsparse.nn.SparseMultiHeadAttention against flax.nnx.MultiHeadAttention.

Both layers are built with the same arguments and seed, so they hold the same
parameters; the sparse layer with a pattern must equal the dense layer with that
pattern as a dense boolean mask.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jsparse.attention as ja
from jsparse.nn import (
    AttentionMask,
    FormatLinearGeneral,
    SparseMultiHeadAttention,
    densify,
    sparsify,
)

TOL = {jnp.dtype(jnp.float32): 2e-5, jnp.dtype(jnp.bfloat16): 3e-2}


def _pair(mask=None, *, heads=4, kv_heads=None, features=16, block=(8, 8), sparse_kw=(),
          **kw):  # fmt: skip
    """A sparse layer and an nnx layer with the same parameters."""
    common = dict(num_heads=heads, in_features=features, num_kv_heads=kv_heads, decode=False)
    common.update(kw)
    sparse = SparseMultiHeadAttention(
        mask=mask, block_size=block, rngs=nnx.Rngs(0), **dict(sparse_kw), **common
    )
    dense = nnx.MultiHeadAttention(rngs=nnx.Rngs(0), **common)
    return sparse, dense


def _apply(layer, *args, **kwargs):
    """``layer(*args, **kwargs)`` under ``nnx.jit`` (one compilation instead of many
    eager ops; masks and flags are closed over, so they are static)."""
    return nnx.jit(lambda m, *a: m(*a, **kwargs))(layer, *args)


def _x(shape, seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _dense(fn, q_len, kv_len):
    return jnp.asarray(fn(np.arange(q_len)[:, None], np.arange(kv_len)[None, :]), bool)


def _close(a, b, dtype=jnp.float32):
    tol = TOL[jnp.dtype(dtype)]
    np.testing.assert_allclose(
        np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
    )


# ------------------------------------------------------------------ equivalence
def test_same_parameters_as_nnx():
    sparse, dense = _pair(ja.causal())
    assert isinstance(sparse, nnx.MultiHeadAttention)
    ps, pd = nnx.state(sparse, nnx.Param), nnx.state(dense, nnx.Param)
    assert jax.tree.structure(ps) == jax.tree.structure(pd)
    for a, b in zip(jax.tree.leaves(ps), jax.tree.leaves(pd), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kv_heads", [None, 1], ids=["MHA", "MQA"])
def test_full_mask_matches_nnx(kv_heads):
    sparse, dense = _pair(kv_heads=kv_heads)
    x = _x((2, 24, 16))
    expected = _apply(dense, x)
    _close(_apply(sparse, x), expected)  # no mask: every key
    full = ja.BlockMask.from_dense(np.ones((24, 24), bool), block_size=(8, 8))
    _close(_apply(sparse, x, mask=full), expected)


def test_causal_gqa_padded_length_matches_nnx():
    sparse, dense = _pair(ja.causal(), kv_heads=2)
    x = _x((2, 29, 16))  # 29: not a multiple of the block
    expected = _apply(dense, x, mask=_dense(ja.causal(), 29, 29)[None, None])
    _close(_apply(sparse, x), expected)
    _close(_apply(sparse, x, mask=None, is_causal=True), _apply(dense, x, is_causal=True))


def test_per_head_masks_cross_attention_and_call_time_masks():
    fns = [ja.local(3, 3) | ja.global_tokens(2), ja.causal(), ja.strided(4), ja.local(5)]
    sparse, dense = _pair(fns, in_kv_features=12)
    xq, xkv = _x((2, 24, 16)), _x((2, 40, 12), seed=2)
    dense_mask = jnp.stack([_dense(f, 24, 40) for f in fns])[None]
    _close(_apply(sparse, xq, xkv), _apply(dense, xq, xkv, mask=dense_mask))
    # a block mask given at call time replaces the layer's mask functions
    other = ja.BlockMask.from_fn(ja.local(2), 24, 40, block_size=(8, 8))
    expected = _apply(dense, xq, xkv, mask=_dense(ja.local(2), 24, 40))
    _close(_apply(sparse, xq, xkv, mask=other), expected)


def test_dense_mask_array_is_combined_with_the_pattern():
    bm = ja.BlockMask.from_fn(ja.local(4, 4), 16, 16, block_size=(8, 8))
    sparse, dense = _pair(bm)
    x = _x((2, 16, 16))
    padding = jnp.arange(16) < jnp.array([[12], [16]])  # per-example key padding
    call_mask = padding[:, None, None, :]
    expected = _apply(dense, x, mask=call_mask & _dense(ja.local(4, 4), 16, 16))
    _close(_apply(sparse, x, mask=call_mask), expected)


def test_batch_axes_segments_and_soft_cap():
    sparse, dense = _pair(ja.causal())
    x = _x((2, 3, 16, 16))
    _close(_apply(sparse, x), _apply(dense, x, is_causal=True))
    _close(_apply(sparse, x[0, 0]), _apply(dense, x[0, 0], is_causal=True))  # no batch axis
    seg = jnp.array([[0] * 6 + [1] * 10, [0] * 16])
    same = (seg[:, :, None] == seg[:, None, :]) & _dense(ja.causal(), 16, 16)
    _close(_apply(sparse, x[:, 0], segment_ids=seg), _apply(dense, x[:, 0], mask=same[:, None]))
    capped, _ = _pair(ja.causal(), sparse_kw={"logits_soft_cap": 0.5})
    q, k, v = capped.query(x[0, 0]), capped.key(x[0, 0]), capped.value(x[0, 0])
    s = jnp.einsum("lhd,shd->hls", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(_dense(ja.causal(), 16, 16), 0.5 * jnp.tanh(s / 0.5), -jnp.inf)
    expected = capped.out(jnp.einsum("hls,shd->lhd", jax.nn.softmax(s, -1), v))
    _close(_apply(capped, x[0, 0]), expected)
    assert float(jnp.max(jnp.abs(expected - _apply(dense, x[0, 0], is_causal=True)))) > 1e-3


def test_bfloat16():
    sparse, dense = _pair(ja.causal(), dtype=jnp.bfloat16)
    x = _x((2, 16, 16), dtype=jnp.bfloat16)
    out = _apply(sparse, x)
    assert out.dtype == jnp.bfloat16
    _close(out, _apply(dense, x, is_causal=True), jnp.bfloat16)


# ------------------------------------------------------------------ transformations
def test_jit_and_grad_match_nnx():
    fn = ja.local(5) & ja.causal()
    sparse, dense = _pair(fn, kv_heads=2)
    x = _x((2, 24, 16))
    dm = _dense(fn, 24, 24)[None, None]

    def loss(layer, x):
        sparse_layer = isinstance(layer, SparseMultiHeadAttention)
        return jnp.sum(layer(x, mask=None if sparse_layer else dm) ** 2)

    grad = nnx.jit(nnx.grad(loss, argnums=(0, 1)))
    (gs, gxs), (gd, gxd) = grad(sparse, x), grad(dense, x)
    assert jax.tree.structure(gs) == jax.tree.structure(gd)
    for a, b in zip(jax.tree.leaves(gs), jax.tree.leaves(gd), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gxs, gxd, rtol=1e-4, atol=1e-5)


def test_optimizer_skips_the_mask_and_new_masks_do_not_recompile():
    a = ja.BlockMask.from_fn(ja.local(3), 32, 32, block_size=(8, 8))
    b = ja.BlockMask.from_fn(ja.local(3, 3), 32, 32, block_size=(8, 8))
    a, b = ja.BlockMask.unify(a, b)
    layer, dense = _pair(a)
    opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
    assert list(nnx.state(layer, AttentionMask)) == ["block_mask"]
    assert not jax.tree.leaves(nnx.state(opt.opt_state, AttentionMask))
    traces = []

    @nnx.jit
    def step(layer, opt, x):
        traces.append(1)
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(layer)
        opt.update(layer, grads)
        return layer(x)

    x = _x((2, 32, 16))
    step(layer, opt, x)
    layer.block_mask.set_value(b)
    out = step(layer, opt, x)
    assert len(traces) == 1
    nnx.update(dense, nnx.state(layer, nnx.Param))
    _close(out, _apply(dense, x, mask=_dense(ja.local(3, 3), 32, 32)))


def test_projections_can_be_jsparse_layers():
    layer, _ = _pair(ja.causal(), features=32)
    x = _x((2, 16, 32))
    sparse = sparsify(copy.deepcopy(layer), format="bcsr", sparsity=0.5, block_shape=(8, 8))
    assert all(
        isinstance(getattr(sparse, p), FormatLinearGeneral)
        for p in ("query", "key", "value", "out")
    )
    back = densify(copy.deepcopy(sparse))
    assert isinstance(back, SparseMultiHeadAttention) and isinstance(back.query, nnx.LinearGeneral)
    out = _apply(sparse, x)
    _close(out, _apply(back, x))
    assert float(jnp.max(jnp.abs(out - _apply(layer, x)))) > 1e-3  # pruned


def test_decode_matches_the_full_sequence():
    length = 16
    fn = ja.local(5) | ja.global_tokens(2)
    x = _x((2, length, 16))
    bm = ja.BlockMask.from_fn(fn & ja.causal(), length, length, block_size=(8, 8))
    for mask, causal in ((fn, True), (bm, False)):
        layer, _ = _pair(mask, kv_heads=2, decode=True)
        layer.init_cache(x.shape)
        step = nnx.jit(lambda m, x, causal=causal: m(x, is_causal=causal))
        steps = [step(layer, x[:, t : t + 1]) for t in range(length)]
        whole = _apply(layer, x, mask=fn & ja.causal(), decode=False)
        _close(jnp.concatenate(steps, axis=1), whole)


# ------------------------------------------------------------------ bad input
def test_bad_input():
    layer, _ = _pair(ja.causal())
    x = _x((2, 16, 16))
    with pytest.raises(ValueError, match="in_features=16"):
        layer(_x((2, 16, 8)))
    with pytest.raises(TypeError, match="BlockMask, a mask function"):
        layer(x, mask="causal")
    with pytest.raises(TypeError, match="BlockMask, a mask function"):
        _pair(mask=3)
    with pytest.raises(ValueError, match="built for q_len=8"):
        layer(x, mask=ja.BlockMask.from_fn(ja.causal(), 8, 8, block_size=(8, 8)))
    with pytest.raises(ValueError, match="is_causal=True cannot be combined"):
        layer(x, mask=ja.BlockMask.from_fn(ja.causal(), 16, 16, block_size=(8, 8)),
              is_causal=True)  # fmt: skip
    with pytest.raises(ValueError, match="3 heads"):
        layer(x, mask=ja.BlockMask.from_fn([ja.causal()] * 3, 16, 16, block_size=(8, 8)))
    with pytest.raises(ValueError, match="sow_weights"):
        layer(x, sow_weights=True)
    with pytest.raises(TypeError, match="attention_fn"):
        _pair(attention_fn=nnx.dot_product_attention)
    with pytest.raises(ValueError, match="block_size"):
        _pair(block=(8, 0))
    with pytest.raises(ValueError, match="num_heads"):
        _pair(heads=4, kv_heads=3)
    drop, _ = _pair(ja.causal(), dropout_rate=0.1)
    drop(x, deterministic=True)  # dropout off: fine
    with pytest.raises(ValueError, match="no attention dropout"):
        drop(x, deterministic=False)
    dec, _ = _pair(ja.causal(), decode=True)
    with pytest.raises(ValueError, match="init_cache"):
        dec(x[:, :1])
