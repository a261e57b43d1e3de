"""Block-sparse attention against a dense masked-softmax reference (float64 oracle)."""

from __future__ import annotations

import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jsparse
import jsparse.attention as ja
from jsparse.attention.kernels import register_attention_impl
from jsparse.attention.xla import XLA_KERNELS

# Per-dtype tolerances (absolute, on outputs and gradients of unit-scale inputs).
TOL = {jnp.float64: 1e-10, jnp.float32: 2e-5, jnp.bfloat16: 5e-2}


def reference(q, k, v, dense_mask, scale, cap=None, q_ids=None, kv_ids=None):
    """Dense masked softmax, written independently of jsparse: (out, lse)."""
    h, hkv = q.shape[2], k.shape[2]
    k = jnp.repeat(k, h // hkv, axis=2)
    v = jnp.repeat(v, h // hkv, axis=2)
    s = jnp.einsum("blhd,bshd->bhls", q, k) * scale
    if cap is not None:
        s = cap * jnp.tanh(s / cap)
    ok = jnp.asarray(dense_mask)
    ok = ok[None, None] if ok.ndim == 2 else ok[None]
    if q_ids is not None:
        ok = ok & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    s = jnp.where(ok, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(ok, jnp.exp(s - m), 0.0)
    total = p.sum(-1, keepdims=True)
    out = jnp.einsum("bhls,bshd->blhd", p / jnp.where(total > 0, total, 1.0), v)
    lse = jnp.where(total[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(total > 0, total, 1)[..., 0]),
                    -jnp.inf)  # fmt: skip
    return out, lse


def dense_of(fn, L, S):
    """The element mask of ``fn`` evaluated on the whole grid (small sizes only)."""
    return np.asarray(fn(np.arange(L)[:, None], np.arange(S)[None, :]), bool)


def blocks_to_dense(m: ja.BlockMask) -> np.ndarray:
    """The element mask from the canonical lists, in NumPy (independent of to_dense)."""
    (bq, bk), (nq, nk) = m.block_size, m.num_blocks
    out = np.zeros((m.num_heads, nq * bq, nk * bk), bool)
    tiles = np.asarray(m.mask_blocks)
    for h in range(m.num_heads):
        for i in range(nq):
            rows = slice(i * bq, (i + 1) * bq)
            for s in range(int(m.full_count[h, i])):
                j = int(m.full_kv[h, i, s])
                out[h, rows, j * bk : (j + 1) * bk] = True
            for s in range(int(m.partial_count[h, i])):
                j = int(m.partial_kv[h, i, s])
                out[h, rows, j * bk : (j + 1) * bk] = tiles[int(m.partial_mask[h, i, s])]
    return out[:, : m.q_len, : m.kv_len]


def assert_same_mask(a: ja.BlockMask, b: ja.BlockMask):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def batched_ref(q, k, v, m):
    return reference(q, k, v, blocks_to_dense(m)[0], q.shape[-1] ** -0.5)[0]


def inputs(key, b, L, S, h, hkv, d, dtype):
    kq, kk, kv = jax.random.split(jax.random.key(key), 3)
    return (
        jax.random.normal(kq, (b, L, h, d), dtype),
        jax.random.normal(kk, (b, S, hkv, d), dtype),
        jax.random.normal(kv, (b, S, hkv, d), dtype),
    )


IDS = np.array([0] * 5 + [1] * 8 + [2] * 2 + [3] * 4)  # 19 positions, 4 documents

MASKS = {
    "causal": ja.causal(),
    "local": ja.local(5, 2),
    "strided": ja.strided(4, 2),
    "global": ja.global_tokens(3),
    "segments": ja.segments(IDS),
    "prefix_lm": ja.prefix_lm(5),
    "causal_local": ja.causal() & ja.local(7),
    "local_or_global": ja.local(3) | ja.global_tokens(2),
    "causal_local_or_strided": ja.causal() & (ja.local(4) | ja.strided(6)),
    "segments_causal": ja.segments(IDS) & ja.causal(),
    "not_causal": ~ja.causal(),
    "python_fn": lambda q, k: (q + 2 * k) % 5 != 0,
    "python_and_builtin": ja.causal() & (lambda q, k: (q - k) % 3 == 0),
}


# ------------------------------------------------------------------ mask building
@pytest.mark.parametrize("name", sorted(MASKS))
def test_from_fn_matches_dense_evaluation(name):
    fn = MASKS[name]
    L = S = 19
    want = dense_of(fn, L, S)
    for block in [(4, 4), (8, 4), (3, 5)]:
        m = ja.BlockMask.from_fn(fn, L, S, block_size=block)
        np.testing.assert_array_equal(blocks_to_dense(m)[0], want)
        assert_same_mask(m, ja.BlockMask.from_dense(want, block_size=block))


def test_block_kinds_and_padding_convention():
    m = ja.BlockMask.from_fn(ja.causal(), 10, 10, block_size=(4, 4))
    kinds = np.asarray(m.block_kinds()[0])
    # last key block is cut by the end (10 % 4): never full
    assert kinds.tolist() == [[1, 0, 0], [2, 1, 0], [2, 2, 1]]
    assert m.full_count[0].tolist() == [0, 1, 2]
    # padded slots repeat the last valid entry (0 for an empty row)
    assert m.full_kv[0].tolist() == [[0, 0], [0, 0], [0, 1]]
    assert m.full_q[0].tolist() == [[1, 2], [2, 2], [0, 0]]
    assert m.full_q_count[0].tolist() == [2, 1, 0]
    # padded keys (>= 10) never attend; padded query rows neither
    tile = np.asarray(m.mask_blocks[m.partial_mask[0, 2, 0]])
    assert not tile[:, 2:].any() and not tile[2:].any()
    assert m.mask_blocks.dtype == jnp.bool_ and m.full_kv.dtype == jnp.int32


def test_mask_blocks_are_deduplicated():
    m = ja.BlockMask.from_fn(ja.causal(), 64, 64, block_size=(8, 8))
    assert m.mask_blocks.shape == (1, 8, 8)  # every diagonal block is the same tile
    assert m.nblocks() == (28, 8)


def test_per_head_masks():
    fns = [ja.causal(), ja.local(2, 2), ja.global_tokens(3)]
    m = ja.BlockMask.from_fn(fns, 12, 12, block_size=(4, 4))
    assert m.num_heads == 3
    want = np.stack([dense_of(f, 12, 12) for f in fns])
    np.testing.assert_array_equal(m.to_dense(), want)  # the jnp view, once
    np.testing.assert_array_equal(blocks_to_dense(m), want)
    assert_same_mask(m, ja.BlockMask.from_dense(want, block_size=(4, 4)))


def test_long_mask_builds_without_l_by_l():
    L = 65536
    tracemalloc.start()
    try:
        m = ja.BlockMask.from_fn(ja.causal() & ja.local(1023), L, L, block_size=(128, 128))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 2**20, f"peak {peak / 2**20:.0f} MiB (L x L bool would be 4 GiB)"
    assert m.nblocks() == (512 * 7 - 28 + 0, 1016)  # 7 full blocks behind the diagonal
    assert m.scheduled_fraction() < 0.03
    assert max(x.size for x in jax.tree.leaves(m)) < 2**22


@settings(max_examples=30, deadline=None)
@given(
    L=st.integers(1, 23),
    S=st.integers(1, 23),
    bq=st.integers(1, 9),
    bk=st.integers(1, 9),
    left=st.integers(0, 6),
    stride=st.integers(1, 5),
    n_global=st.integers(0, 3),
    combine=st.sampled_from(["and", "or"]),
)
def test_hypothesis_mask_building(L, S, bq, bk, left, stride, n_global, combine):
    a = ja.causal() & ja.local(left)
    b = ja.strided(stride) | ja.global_tokens(n_global)
    fn = a & b if combine == "and" else a | b
    m = ja.BlockMask.from_fn(fn, L, S, block_size=(bq, bk))
    want = dense_of(fn, L, S)
    np.testing.assert_array_equal(blocks_to_dense(m)[0], want)
    assert_same_mask(m, ja.BlockMask.from_dense(want, block_size=(bq, bk)))


# ------------------------------------------------------------------ attention
def _check(fn, L, S, h, hkv, block, *, cap=None, seg=False, per_head=False):
    """Forward (+ lse), grad and jvp against the float64 reference, all jitted.

    ``fn`` is a mask function, or a list of ``h`` of them (one per query head)."""
    fns = fn if isinstance(fn, list) else [fn] * (h if per_head else 1)
    with jax.enable_x64(True):
        q, k, v = inputs(0, 2, L, S, h, hkv, 4, jnp.float64)
        m = ja.BlockMask.from_fn(fns if len(fns) > 1 or per_head else fns[0], L, S,
                                 block_size=block)  # fmt: skip
        dm = np.stack([dense_of(f, L, S) for f in fns])
        np.testing.assert_array_equal(blocks_to_dense(m), dm)
        q_ids = kv_ids = segment_ids = None
        if seg:
            rng = np.random.RandomState(1)
            q_ids = jnp.asarray(np.sort(rng.randint(0, 3, (2, L))))
            kv_ids = jnp.asarray(np.sort(rng.randint(0, 3, (2, S))))
            segment_ids = (q_ids, kv_ids)

        def f(q, k, v):
            return ja.block_sparse_attention(
                q, k, v, m, scale=0.4, logits_soft_cap=cap, segment_ids=segment_ids,
                return_lse=True, impl="xla",
            )  # fmt: skip

        def r(q, k, v):
            return reference(q, k, v, dm if len(fns) > 1 else dm[0], 0.4, cap, q_ids, kv_ids)

        tangents = inputs(1, 2, L, S, h, hkv, 4, jnp.float64)
        weights = jnp.cos(jnp.arange(q.size, dtype=q.dtype)).reshape(q.shape)

        @jax.jit
        def everything(fun, q, k, v):
            # value, gradient (through out and lse) and jvp in one compilation
            def value(*a):
                o, lse = fun(*a)
                return (o * weights).sum() + jnp.where(jnp.isfinite(lse), lse, 0.0).sum()

            grads = jax.grad(value, argnums=(0, 1, 2))(q, k, v)
            tangent = jax.jvp(lambda *a: fun(*a)[0], (q, k, v), tangents)[1]
            return fun(q, k, v), grads, tangent

        got = everything(jax.tree_util.Partial(f), q, k, v)
        want = everything(jax.tree_util.Partial(r), q, k, v)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-9)


def test_every_mask_function_at_once():
    # One head per mask function (per-head masks, 13 query heads on one key head):
    # every function and combination, in one compilation.
    _check([MASKS[name] for name in sorted(MASKS)], 19, 19, len(MASKS), 1, (8, 4))


def test_gqa_softcap_segments_unequal_lengths():
    _check(ja.local(6, 3) | ja.global_tokens(2), 13, 22, 4, 2, (4, 8), cap=1.5, seg=True)


def test_shared_causal_with_gqa():
    _check(ja.causal() & ja.local(9), 19, 19, 4, 2, (4, 4))


def test_per_head_masks_with_gqa():
    _check(ja.prefix_lm(6), 11, 11, 4, 2, (4, 4), per_head=True)


def test_mqa_and_lengths_below_one_block():
    _check(ja.causal(), 5, 5, 3, 1, (8, 8))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes(dtype):
    m = ja.BlockMask.from_fn(ja.causal() & ja.local(9), 24, 24, block_size=(8, 8))
    q, k, v = inputs(0, 1, 24, 24, 2, 2, 8, dtype)
    out = jax.jit(lambda q, k, v: ja.block_sparse_attention(q, k, v, m))(q, k, v)
    assert out.dtype == dtype
    with jax.enable_x64(True):
        q64, k64, v64 = (x.astype(jnp.float64) for x in (q, k, v))
        want, _ = reference(q64, k64, v64, np.asarray(m.to_dense())[0], 8**-0.5)
        gw = jax.grad(lambda q: reference(q, k64, v64, np.asarray(m.to_dense())[0],
                                          8**-0.5)[0].sum())(q64)  # fmt: skip
    np.testing.assert_allclose(out.astype(jnp.float64), want, atol=TOL[dtype])
    g = jax.jit(
        jax.grad(lambda q: ja.block_sparse_attention(q, k, v, m).astype(jnp.float32).sum())
    )(q)
    assert g.dtype == dtype
    np.testing.assert_allclose(g.astype(jnp.float64), gw, atol=4 * TOL[dtype])


def test_empty_rows_give_zeros_and_finite_gradients():
    fn = ja.local(2) & ~ja.global_tokens(4)  # queries 0..3 attend to nothing
    m = ja.BlockMask.from_fn(fn, 12, 12, block_size=(4, 4))
    q, k, v = inputs(0, 1, 12, 12, 1, 1, 4, jnp.float32)
    for impl in ("xla", "dense"):
        out, lse = jax.jit(
            lambda q, k, v, impl=impl: ja.block_sparse_attention(
                q, k, v, m, return_lse=True, impl=impl
            )
        )(q, k, v)
        assert np.all(np.asarray(out[:, :4]) == 0)
        assert np.all(np.isneginf(np.asarray(lse[:, :, :4])))
        assert np.all(np.isfinite(np.asarray(out)))
        grads = jax.jit(
            jax.grad(
                lambda q, k, v, impl=impl: ja.block_sparse_attention(q, k, v, m, impl=impl).sum(),
                argnums=(0, 1, 2),
            )
        )(q, k, v)
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    empty = ja.BlockMask.from_fn(ja.causal() & ~ja.causal(), 8, 8, block_size=(4, 4))
    assert empty.nblocks() == (0, 0)
    out = jax.jit(ja.block_sparse_attention)(q[:, :8], k[:, :8], v[:, :8], empty)
    assert float(jnp.abs(out).max()) == 0


def test_vmap_over_batch_with_segment_ids():
    m = ja.BlockMask.from_fn(ja.causal(), 16, 16, block_size=(4, 4))
    q, k, v = inputs(0, 3, 16, 16, 2, 1, 4, jnp.float32)
    ids = jnp.asarray(np.sort(np.random.RandomState(0).randint(0, 3, (3, 16))))
    batched = jax.jit(lambda q, k, v, ids: ja.block_sparse_attention(q, k, v, m, segment_ids=ids))(
        q, k, v, ids
    )

    def one(q, k, v, ids):
        return ja.block_sparse_attention(q[None], k[None], v[None], m, segment_ids=ids[None])[0]

    np.testing.assert_allclose(jax.jit(jax.vmap(one))(q, k, v, ids), batched, atol=1e-6)
    # vmap over a stack of masks (a lax.map inside)
    m2 = ja.BlockMask.from_fn(ja.causal() & ja.local(3), 16, 16, block_size=(4, 4))
    a, b = ja.BlockMask.unify(m, m2)
    stacked = jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
    outs = jax.jit(jax.vmap(lambda mm: ja.block_sparse_attention(q, k, v, mm)))(stacked)
    np.testing.assert_allclose(outs[1], batched_ref(q, k, v, m2), atol=1e-5)


def test_new_mask_of_same_shapes_does_not_recompile():
    a = ja.BlockMask.from_fn(ja.causal() & ja.local(5), 32, 32, block_size=(4, 4))
    b = ja.BlockMask.from_fn(ja.local(2, 2) | ja.global_tokens(1), 32, 32, block_size=(4, 4))
    a, b = ja.BlockMask.unify(a, b)
    traces = []

    @jax.jit
    def f(q, m):
        traces.append(1)
        return ja.block_sparse_attention(q, q, q, m)

    q = inputs(0, 1, 32, 32, 1, 1, 4, jnp.float32)[0]
    out_a, out_b = f(q, a), f(q, b)
    assert len(traces) == 1
    for out, m in ((out_a, a), (out_b, b)):
        np.testing.assert_allclose(
            out, reference(q, q, q, np.asarray(m.to_dense())[0], 0.5)[0], atol=2e-5
        )


def test_impls_agree_and_auto_prefers_dense_when_nearly_full():
    q, k, v = inputs(0, 1, 16, 16, 2, 2, 4, jnp.float32)
    sparse = ja.BlockMask.from_fn(ja.causal() & ja.local(3), 16, 16, block_size=(4, 4))
    full = ja.BlockMask.from_fn(ja.full(), 16, 16, block_size=(4, 4))
    assert ja.auto_order(sparse)["cpu"] == ["xla"]
    assert ja.auto_order(full)["cpu"][0] == "dense"

    @jax.jit
    def all_impls(q, k, v, sparse, full):
        return [
            [ja.block_sparse_attention(q, k, v, m, impl=i) for i in ("auto", "xla", "dense")]
            for m in (sparse, full)
        ] + [jax.nn.dot_product_attention(q, k, v)]

    (s_auto, s_xla, s_dense), (f_auto, f_xla, f_dense), plain = all_impls(q, k, v, sparse, full)
    for o in (s_xla, s_dense):
        np.testing.assert_allclose(o, s_auto, atol=2e-6)
    for o in (f_xla, f_dense, plain):
        np.testing.assert_allclose(o, f_auto, atol=2e-6)


def test_second_order():
    with jax.enable_x64(True):
        q = inputs(0, 1, 6, 6, 1, 1, 3, jnp.float64)[0]
        m = ja.BlockMask.from_fn(ja.causal(), 6, 6, block_size=(2, 2))
        dm = dense_of(ja.causal(), 6, 6)

        def f(q):
            return (ja.block_sparse_attention(q, q, q, m, impl="xla") ** 2).sum()

        def r(q):
            return (reference(q, q, q, dm, 3**-0.5)[0] ** 2).sum()

        @jax.jit
        def second(fun, q):
            fwd_rev = jax.jvp(jax.grad(fun), (q,), (q,))[1]
            rev_rev = jax.grad(lambda q: jax.grad(fun)(q).sum())(q)
            return fwd_rev, rev_rev

        got = second(jax.tree_util.Partial(f), q)
        want = second(jax.tree_util.Partial(r), q)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-9)


def test_registered_kernels_get_autodiff_and_supports_reasons():
    register_attention_impl(
        "test_only",
        XLA_KERNELS,
        supports=lambda q, *a, config: None if q.shape[-1] == 4 else "head dim must be 4",
    )
    assert "test_only" in jsparse.implementations("block_sparse_attention", ja.BlockMask)
    m = ja.BlockMask.from_fn(ja.causal(), 8, 8, block_size=(4, 4))
    q = inputs(0, 1, 8, 8, 1, 1, 4, jnp.float32)[0]
    g1 = jax.jit(jax.grad(lambda q: ja.block_sparse_attention(q, q, q, m, impl="test_only").sum()))(
        q
    )
    g2 = jax.grad(lambda q: reference(q, q, q, dense_of(ja.causal(), 8, 8), 0.5)[0].sum())(q)
    np.testing.assert_allclose(g1, g2, atol=1e-5)
    with pytest.raises(ValueError, match="head dim must be 4"):
        ja.block_sparse_attention(q[..., :2], q[..., :2], q[..., :2], m, impl="test_only")


@settings(max_examples=4, deadline=None)
@given(
    L=st.integers(1, 20),
    bq=st.sampled_from([2, 4, 8]),
    bk=st.sampled_from([2, 4, 8]),
    left=st.integers(0, 8),
    hkv=st.sampled_from([1, 2]),
)
def test_hypothesis_attention(L, bq, bk, left, hkv):
    fn = ja.causal() & (ja.local(left) | ja.global_tokens(1))
    m = ja.BlockMask.from_fn(fn, L, L, block_size=(bq, bk))
    q, k, v = inputs(L, 1, L, L, 2, hkv, 4, jnp.float32)
    out = jax.jit(ja.block_sparse_attention)(q, k, v, m)
    np.testing.assert_allclose(out, reference(q, k, v, dense_of(fn, L, L), 0.5)[0], atol=2e-5)


# ------------------------------------------------------------------ errors
def test_bad_inputs():
    m = ja.BlockMask.from_fn(ja.causal(), 8, 8, block_size=(4, 4))
    q, k, v = inputs(0, 1, 8, 8, 3, 3, 4, jnp.float32)
    with pytest.raises(ValueError, match="must divide the number of query heads"):
        ja.block_sparse_attention(q, k[:, :, :2], v[:, :, :2], m)
    with pytest.raises(ValueError, match="built for q_len=8, kv_len=8"):
        ja.block_sparse_attention(q[:, :6], k, v, m)
    heads2 = ja.BlockMask.from_fn([ja.causal()] * 2, 8, 8, block_size=(4, 4))
    with pytest.raises(ValueError, match="mask has 2 heads"):
        ja.block_sparse_attention(q, k, v, heads2)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ja.block_sparse_attention(q, k, v[..., :2], m)
    with pytest.raises(ValueError, match="4 dimensions"):
        ja.block_sparse_attention(q[0], k, v, m)
    with pytest.raises(TypeError, match="floating-point"):
        ja.block_sparse_attention(q.astype(jnp.int32), k, v, m)
    with pytest.raises(TypeError, match="share a dtype"):
        ja.block_sparse_attention(q, k.astype(jnp.bfloat16), v, m)
    with pytest.raises(TypeError, match="must be a BlockMask"):
        ja.block_sparse_attention(q, k, v, np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="segment ids must have shape"):
        ja.block_sparse_attention(q, k, v, m, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="logits_soft_cap"):
        ja.block_sparse_attention(q, k, v, m, logits_soft_cap=0.0)
    with pytest.raises(ValueError, match="no 'nope' implementation"):
        ja.block_sparse_attention(q, k, v, m, impl="nope")
    with pytest.raises(TypeError, match="impl must be a string"):
        ja.block_sparse_attention(q, k, v, m, impl=None)


def test_bad_masks():
    for bad in [(0, 4), (4,), (4, -1), (2.5, 4), "44"]:
        with pytest.raises(ValueError, match="block_size"):
            ja.BlockMask.from_fn(ja.causal(), 8, 8, block_size=bad)
    with pytest.raises(ValueError, match="q_len must be a positive int"):
        ja.BlockMask.from_fn(ja.causal(), 0, 8, block_size=(4, 4))
    with pytest.raises(ValueError, match=r"\(L, S\) or \(H, L, S\)"):
        ja.BlockMask.from_dense(np.ones(8, bool), block_size=(4, 4))
    with pytest.raises(TypeError, match="callable"):
        ja.BlockMask.from_fn(3, 8, 8, block_size=(4, 4))
    with pytest.raises(ValueError, match="width must be <= stride"):
        ja.strided(2, 3)
    with pytest.raises(ValueError, match=">= 0"):
        ja.local(-1)
    with pytest.raises(TypeError, match="must be an int"):
        ja.global_tokens(1.5)
    with pytest.raises(ValueError, match="1-D integer"):
        ja.segments(np.ones((2, 2), int))
    a = ja.BlockMask.from_fn(ja.causal(), 8, 8, block_size=(4, 4))
    b = ja.BlockMask.from_fn(ja.causal(), 12, 12, block_size=(4, 4))
    with pytest.raises(ValueError, match="unify needs masks of equal"):
        ja.BlockMask.unify(a, b)


def test_block_mask_is_a_pytree():
    m = ja.BlockMask.from_fn(ja.causal(), 8, 8, block_size=(4, 4))
    leaves, tree = jax.tree.flatten(m)
    assert all(x.dtype in (jnp.int32, jnp.bool_) for x in leaves)
    again = jax.tree.unflatten(tree, leaves)
    assert again.block_size == (4, 4) and again.nblocks() == m.nblocks()
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(m)[0]]
    assert ".full_kv" in paths and ".plan.rf_ids" in paths
