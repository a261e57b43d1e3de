"""NM (N:M structured sparsity): pruning, masks, kernels, 2:4 export and bad input.

The generic oracle suite (tests/test_oracle.py) covers eager/jit/vmap/grad of the
matmul through the NM factories in tests/factories.py; this file checks what is
specific to N:M against NumPy references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jsparse
from jsparse.formats.nm import xla as xla_nm

from oracle import assert_close

SETTINGS = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
# Every example of these compiles for a new shape: fewer examples.
FEW = settings(SETTINGS, max_examples=5)


# ------------------------------------------------------------ NumPy references
def np_groups(x: np.ndarray, m: int, axis: int) -> np.ndarray:
    """(..., groups, m) view with the grouped axis last."""
    xt = np.moveaxis(x, axis, -1)
    return xt.reshape(*xt.shape[:-1], -1, m)


def np_topn_mask(x: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep the n largest |x| per group, ties to the lower position (stable sort)."""
    g = np_groups(x, m, axis)
    order = np.argsort(-np.abs(g), axis=-1, kind="stable")[..., :n]
    mask = np.zeros(g.shape, bool)
    np.put_along_axis(mask, order, True, axis=-1)
    xt_shape = np.moveaxis(x, axis, -1).shape
    return np.moveaxis(mask.reshape(xt_shape), -1, axis)


def np_greedy_transposable(x: np.ndarray, n: int, m: int) -> np.ndarray:
    """NVIDIA ASP's 2-D greedy, block by block, in plain loops."""
    mask = np.zeros(x.shape, bool)
    for bi in range(0, x.shape[0], m):
        for bj in range(0, x.shape[1], m):
            block = np.abs(x[bi : bi + m, bj : bj + m]).ravel()
            rows, cols = np.zeros(m, int), np.zeros(m, int)
            for flat in np.argsort(-block, kind="stable"):
                r, c = divmod(int(flat), m)
                if rows[r] < n and cols[c] < n:
                    rows[r] += 1
                    cols[c] += 1
                    mask[bi + r, bj + c] = True
    return mask


def np_pack(positions: np.ndarray, m: int) -> np.ndarray:
    """The documented packed layout, position by position."""
    bits = 2 if m <= 4 else 4 if m <= 16 else 8
    per = 8 // bits
    rows, length = positions.shape
    out = np.zeros((rows, -(-length // per)), np.uint8)
    for r in range(rows):
        for j in range(length):
            out[r, j // per] |= np.uint8(int(positions[r, j]) << (bits * (j % per)))
    return out


def np_pack_2to4(positions: np.ndarray) -> np.ndarray:
    """The documented metadata layout, bit by bit."""
    rows, half = positions.shape
    meta = np.zeros((rows, half // 8), np.uint16)
    for r in range(rows):
        for group in range(half // 2):
            i0, i1 = int(positions[r, 2 * group]), int(positions[r, 2 * group + 1])
            word, j = divmod(group, 4)
            meta[r, word] |= np.uint16((i0 | (i1 << 2)) << (4 * j))
    return meta


# ------------------------------------------------------------ strategies
@st.composite
def nm_configs(draw, max_groups=4, max_other=6):
    m = draw(st.sampled_from([2, 3, 4, 5, 8, 16, 32]))  # 2-, 4- and 8-bit positions
    n = draw(st.integers(1, m - 1))
    axis = draw(st.sampled_from([0, 1, -1, -2]))
    grouped = m * draw(st.integers(1, max_groups))
    other = draw(st.integers(1, max_other))
    shape = (grouped, other) if axis % 2 == 0 else (other, grouped)
    seed = draw(st.integers(0, 2**31 - 1))
    return n, m, axis, shape, seed


def _rand(seed, shape, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ------------------------------------------------------------ fromdense
@SETTINGS
@given(nm_configs())
def test_fromdense_keeps_numpy_top_n(cfg):
    n, m, axis, shape, seed = cfg
    x = _rand(seed, shape)
    a = jsparse.NM.fromdense(x, n=n, m=m, axis=axis)
    assert (a.n, a.m, a.axis, a.shape) == (n, m, axis % 2, shape)
    assert a.positions.dtype == jnp.uint8 and a.positions.shape == a.packed_shape
    a.validate()
    mask = np_topn_mask(x, n, m, axis)
    np.testing.assert_array_equal(np.asarray(a.todense()), np.where(mask, x, 0))
    np.testing.assert_array_equal(np.asarray(a.mask()), mask)
    # The stored pattern: NumPy's top-n positions, in increasing order, packed.
    expected = np.argwhere(np_groups(mask, m, axis))[:, -1].reshape(-1)
    unpacked = np.asarray(a.unpacked_positions)
    assert unpacked.dtype == np.uint8 and unpacked.shape == a.values_shape
    np.testing.assert_array_equal(np.moveaxis(unpacked, axis, -1).reshape(-1), expected)
    np.testing.assert_array_equal(np.asarray(a.positions), np_pack(unpacked, m))
    assert bool(jsparse.is_nm(a.todense(), n, m, axis=axis))
    assert bool(jsparse.is_nm(a, n, m, axis=axis))
    # Kept magnitude per group equals NumPy's top-n sum.
    kept = np_groups(np.abs(np.asarray(a.todense())), m, axis).sum(-1)
    top = -np.sort(-np.abs(np_groups(x, m, axis)), axis=-1)[..., :n].sum(-1)
    np.testing.assert_allclose(kept, top, rtol=1e-6)
    # Under jit: same result.
    b = jax.jit(lambda x: jsparse.NM.fromdense(x, n=n, m=m, axis=axis))(x)
    np.testing.assert_array_equal(np.asarray(b.values), np.asarray(a.values))
    np.testing.assert_array_equal(np.asarray(b.positions), np.asarray(a.positions))


def test_fromdense_ties_go_to_lower_positions():
    x = np.array([[1.0, -1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    a = jsparse.NM.fromdense(x, n=2, m=4)
    assert a.unpacked_positions.tolist() == [[0, 1, 0, 1]]
    assert a.positions.tolist() == [[0b01000100]]  # 0, 1, 0, 1 at bits 0, 2, 4, 6
    assert a.values.tolist() == [[1.0, -1.0, 0.0, 0.0]]
    b = jsparse.NM.fromdense(x.T, n=1, m=4, axis=0)
    assert b.unpacked_positions.tolist() == [[0], [0]]


def test_is_nm_detects_too_many_nonzeros():
    x = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], np.float32)
    assert not bool(jsparse.is_nm(x, 2, 4))
    assert bool(jsparse.is_nm(x, 3, 4))
    assert not bool(jsparse.is_nm(x.T, 2, 4, axis=0))
    assert bool(jsparse.is_nm(x.T, 3, 4, axis=-2))
    assert bool(jax.jit(lambda x: jsparse.is_nm(x, 3, 4))(x))


# ------------------------------------------------------------ masks
@SETTINGS
@given(nm_configs())
def test_nm_mask_matches_numpy(cfg):
    n, m, axis, shape, seed = cfg
    x = _rand(seed, shape)
    mask = np.asarray(jsparse.nm_mask(x, n, m, axis=axis))
    assert mask.dtype == np.bool_ and mask.shape == x.shape
    np.testing.assert_array_equal(mask, np_topn_mask(x, n, m, axis))
    assert (np_groups(mask, m, axis).sum(-1) == n).all()
    assert bool(jsparse.is_nm(np.where(mask, x, 0), n, m, axis=axis))
    jitted = jax.jit(lambda x: jsparse.nm_mask(x, n, m, axis=axis))(x)
    np.testing.assert_array_equal(np.asarray(jitted), mask)


def test_nm_mask_and_is_nm_signatures():
    import inspect

    for fn in (jsparse.nm_mask, jsparse.is_nm):
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["x", "n", "m"]
        assert params["axis"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["axis"].default == -1
    params = inspect.signature(jsparse.nm_mask).parameters
    assert params["transposable"].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["transposable"].default is False


@FEW
@given(
    st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 2**31 - 1),
)
def test_transposable_mask_is_nm_along_both_axes(nm, br, bc, seed):
    n, m = nm
    x = _rand(seed, (br * m, bc * m))
    mask = np.asarray(jsparse.nm_mask(x, n, m, transposable=True))
    np.testing.assert_array_equal(mask, np_greedy_transposable(x, n, m))
    pruned = np.where(mask, x, 0)
    assert bool(jsparse.is_nm(pruned, n, m, axis=1))
    assert bool(jsparse.is_nm(pruned, n, m, axis=0))
    # The greedy starts from the largest entry of every block.
    blocks = np.abs(x).reshape(br, m, bc, m).transpose(0, 2, 1, 3).reshape(br, bc, -1)
    kept = mask.reshape(br, m, bc, m).transpose(0, 2, 1, 3).reshape(br, bc, -1)
    assert np.take_along_axis(kept, blocks.argmax(-1)[..., None], -1).all()
    # Both orientations of the weight are storable as NM.
    w = jsparse.NM.fromdense(pruned, n=n, m=m, axis=1)
    np.testing.assert_array_equal(np.asarray(w.todense()), pruned)
    np.testing.assert_array_equal(
        np.asarray(jsparse.NM.fromdense(pruned, n=n, m=m, axis=0).todense()), pruned
    )


def test_transposable_mask_under_jit():
    x = _rand(0, (8, 12))
    eager = jsparse.nm_mask(x, 2, 4, transposable=True)
    jitted = jax.jit(lambda x: jsparse.nm_mask(x, 2, 4, transposable=True))(x)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


# ------------------------------------------------------------ kernels
@pytest.fixture(params=[0, 64], ids=["whole", "chunked"])
def chunk(request, monkeypatch):
    """Run the kernels whole and with a small scan chunk (the large-matrix path)."""
    if request.param:
        monkeypatch.setattr(xla_nm, "_CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("ncols", [1, 3])
@pytest.mark.parametrize("left", [False, True], ids=["a@x", "x@a"])
def test_matmul_and_grad_against_dense(chunk, axis, ncols, left):
    a = jsparse.NM.random(jax.random.key(0), (16, 24), n=2, m=4, axis=axis)
    w = a.todense()
    shape = (ncols, 16) if left else (24, ncols)
    x = jax.random.normal(jax.random.key(1), shape)

    def f(values, x):
        b = a.with_values(values)
        return jnp.sum(jnp.sin(x @ b if left else b @ x))

    def f_dense(w, x):
        return jnp.sum(jnp.sin(x @ w if left else w @ x))

    for impl in ("xla", "dense", "auto"):
        y = jsparse.matmul(x, a, impl=impl) if left else jsparse.matmul(a, x, impl=impl)
        assert_close(y, x @ w if left else w @ x, jnp.float32, 24)
    gv, gx = jax.jit(jax.grad(f, argnums=(0, 1)))(a.values, x)
    gw_ref, gx_ref = jax.grad(f_dense, argnums=(0, 1))(w, x)
    # dvalues is the dense gradient gathered at the kept positions.
    assert_close(a.with_values(gv).todense(), gw_ref * a.mask(), jnp.float32, 24)
    assert_close(gx, gx_ref, jnp.float32, 24)


@pytest.mark.parametrize("axis", [0, 1])
def test_vector_operands(chunk, axis):
    a = jsparse.NM.random(jax.random.key(2), (8, 16), n=1, m=4, axis=axis)
    v16, v8 = jnp.arange(16.0) - 7, jnp.arange(8.0) - 3
    assert_close(a @ v16, a.todense() @ v16, jnp.float32, 16)
    assert_close(v8 @ a, v8 @ a.todense(), jnp.float32, 8)


@pytest.mark.parametrize("axis", [0, 1])
def test_sddmm(chunk, axis):
    a = jsparse.NM.random(jax.random.key(3), (8, 12), n=2, m=4, axis=axis)
    x = jax.random.normal(jax.random.key(4), (8, 5))
    y = jax.random.normal(jax.random.key(5), (5, 12))
    out = jsparse.sddmm(x, y, a)
    assert isinstance(out, jsparse.NM)
    np.testing.assert_array_equal(np.asarray(out.positions), np.asarray(a.positions))
    assert_close(out.todense(), (x @ y) * a.mask(), jnp.float32, 5)
    g = jax.grad(lambda x: jnp.sum(jsparse.sddmm(x, y, a).values))(x)
    assert_close(g, (a.mask() * 1.0) @ y.T, jnp.float32, 12)


def test_elementwise_ops():
    a = jsparse.NM.random(jax.random.key(6), (4, 8))
    d = a.todense()
    assert_close((2.0 * a).todense(), 2 * d, jnp.float32)
    assert_close((-a).todense(), -d, jnp.float32)
    assert_close((a + a).todense(), 2 * d, jnp.float32)
    assert_close(jsparse.map_values(jnp.abs, a).todense(), jnp.abs(d), jnp.float32)
    assert_close(a.T.todense(), d.T, jnp.float32)
    assert a.T.axis == 0 and a.T.T.axis == 1
    assert a.density == 0.5 and a.nstored == 16


# ------------------------------------------------------------ sizes
def test_nbytes_size_targets():
    """The issue's targets: a 2:4 NM is <= 0.63x the dense bytes in float32 and
    <= 0.57x in bfloat16 (2-bit packed positions)."""
    shape = (256, 256)
    for dtype, target in ((jnp.float32, 0.63), (jnp.bfloat16, 0.57)):
        a = jsparse.NM.fromdense(jax.random.normal(jax.random.key(0), shape, dtype), n=2, m=4)
        dense_bytes = a.todense().nbytes
        assert dense_bytes == 256 * 256 * jnp.dtype(dtype).itemsize
        ratio = a.nbytes / dense_bytes
        assert ratio <= target, (jnp.dtype(dtype).name, ratio)
        assert a.T.nbytes / dense_bytes <= target  # grouped along axis 0


@pytest.mark.parametrize(
    "n,m,f32,bf16",
    # values n/m of the dense bytes, plus bits/8 bytes per kept value
    [(2, 4, 0.53125, 0.5625), (1, 4, 0.265625, 0.28125), (2, 8, 0.28125, 0.3125)],
)
def test_nbytes_exact(n, m, f32, bf16):
    shape = (64, 256)
    for dtype, expected in ((jnp.float32, f32), (jnp.bfloat16, bf16)):
        a = jsparse.NM.random(jax.random.key(0), shape, n=n, m=m, dtype=dtype)
        ratio = a.nbytes / (shape[0] * shape[1] * jnp.dtype(dtype).itemsize)
        assert ratio == expected, (n, m, jnp.dtype(dtype).name, ratio)
        # The 2:4 export is the same bytes.
        if (n, m) == (2, 4):
            values, meta = a.to_2to4_compressed()
            assert values.nbytes + meta.nbytes == a.nbytes


# ------------------------------------------------------------ packed positions
@FEW
@given(nm_configs())
def test_packed_layout_and_round_trips(cfg):
    n, m, axis, shape, seed = cfg
    a = jsparse.NM.random(jax.random.key(seed), shape, n=n, m=m, axis=axis)
    bits = 2 if m <= 4 else 4 if m <= 16 else 8
    rows, length = a.values_shape
    assert a.position_bits == bits
    assert a.positions.shape == (rows, -(-length * bits // 8)) == a.packed_shape
    unpacked = np.asarray(a.unpacked_positions)
    np.testing.assert_array_equal(np.asarray(a.positions), np_pack(unpacked, m))
    # The natural constructor packs; packed=True takes the leaf as is.
    kw = dict(shape=shape, n=n, m=m, axis=axis)
    b = jsparse.NM(a.values, unpacked, **kw)
    np.testing.assert_array_equal(np.asarray(b.positions), np.asarray(a.positions))
    c = jsparse.NM(a.values, a.positions, packed=True, **kw)
    np.testing.assert_array_equal(np.asarray(c.todense()), np.asarray(a.todense()))
    # Transpose: unpack, transpose, repack along the new last axis.
    t = a.T
    assert t.positions.shape == t.packed_shape
    np.testing.assert_array_equal(np.asarray(t.unpacked_positions), unpacked.T)
    np.testing.assert_array_equal(np.asarray(t.todense()), np.asarray(a.todense()).T)
    np.testing.assert_array_equal(np.asarray(t.T.positions), np.asarray(a.positions))
    # unpacked_positions under jit.
    unpack = jax.jit(lambda a: a.unpacked_positions)
    np.testing.assert_array_equal(np.asarray(unpack(a)), unpacked)


def test_constructor_under_jit_packs_traced_positions():
    v = np.arange(10, dtype=np.float32).reshape(2, 5)
    p = np.array([[0, 2, 1, 3, 3], [3, 0, 0, 1, 2]], np.uint8)  # 1:4, 5 groups a row

    @jax.jit
    def build(v, p):
        a = jsparse.NM(v, p, shape=(2, 20), n=1, m=4)
        return a.positions, a.todense()

    packed, dense = build(v, p)
    np.testing.assert_array_equal(np.asarray(packed), np_pack(p, 4))
    assert packed.shape == (2, 2)  # 5 positions, padded to 8 slots
    expected = np.zeros((2, 20), np.float32)
    for r in range(2):
        for g in range(5):
            expected[r, 4 * g + p[r, g]] = v[r, g]
    np.testing.assert_array_equal(np.asarray(dense), expected)


# ------------------------------------------------------------ 2:4 export
@FEW
@given(st.integers(1, 6), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_2to4_round_trip_is_bit_exact(rows, words, seed):
    shape = (rows, 16 * words)
    a = jsparse.NM.random(jax.random.key(seed), shape, n=2, m=4, axis=1)
    values, meta = a.to_2to4_compressed()
    assert meta.dtype == jnp.uint16 and meta.shape == (rows, words)
    assert values.shape == (rows, 8 * words)
    np.testing.assert_array_equal(np.asarray(meta), np_pack_2to4(np.asarray(a.unpacked_positions)))
    b = jsparse.NM.from_2to4_compressed(values, meta)
    assert (b.shape, b.n, b.m, b.axis) == (shape, 2, 4, 1)
    np.testing.assert_array_equal(np.asarray(b.positions), np.asarray(a.positions))
    np.testing.assert_array_equal(
        np.asarray(b.values).view(np.uint32), np.asarray(a.values).view(np.uint32)
    )
    # Export of the import: the same bits.
    values2, meta2 = b.to_2to4_compressed()
    np.testing.assert_array_equal(np.asarray(meta2), np.asarray(meta))
    np.testing.assert_array_equal(
        np.asarray(values2).view(np.uint32), np.asarray(values).view(np.uint32)
    )
    # Metadata -> NM -> metadata is the identity on every valid word.
    rng = np.random.default_rng(seed)
    pairs = np.array([(i, j) for i in range(4) for j in range(i + 1, 4)])
    pos = pairs[rng.integers(0, 6, (rows, 4 * words))].reshape(rows, 8 * words)
    meta2 = np_pack_2to4(pos)
    c = jsparse.NM.from_2to4_compressed(values, jnp.asarray(meta2))
    np.testing.assert_array_equal(np.asarray(c.unpacked_positions), pos)
    np.testing.assert_array_equal(np.asarray(c.to_2to4_compressed()[1]), meta2)
    # bfloat16 values survive bit for bit too.
    vb = jnp.asarray(values).astype(jnp.bfloat16)
    vb2, meta3 = jsparse.NM.from_2to4_compressed(vb, meta).to_2to4_compressed()
    np.testing.assert_array_equal(np.asarray(vb2).view(np.uint16), np.asarray(vb).view(np.uint16))
    np.testing.assert_array_equal(np.asarray(meta3), np.asarray(meta))


def test_2to4_known_word():
    # Groups (0,1), (1,3), (0,2), (2,3) -> nibbles 0x4, 0xD, 0x8, 0xE.
    pos = np.array([[0, 1, 1, 3, 0, 2, 2, 3]], np.uint8)
    a = jsparse.NM(np.ones((1, 8), np.float32), pos, shape=(1, 16), n=2, m=4)
    assert int(a.to_2to4_compressed()[1][0, 0]) == 0xE8D4
    assert a.positions.tolist() == [[0xD4, 0xE8]]  # the same bits, byte by byte


def test_2to4_export_under_jit():
    a = jsparse.NM.random(jax.random.key(1), (4, 32), n=2, m=4)
    values, meta = jax.jit(lambda a: a.to_2to4_compressed())(a)
    b = jax.jit(jsparse.NM.from_2to4_compressed)(values, meta)
    np.testing.assert_array_equal(np.asarray(b.todense()), np.asarray(a.todense()))


def test_2to4_export_via_transpose():
    a = jsparse.NM.random(jax.random.key(0), (32, 8), n=2, m=4, axis=0)
    values, meta = a.T.to_2to4_compressed()
    assert_close(
        jsparse.NM.from_2to4_compressed(values, meta).todense(), a.todense().T, jnp.float32
    )


# ------------------------------------------------------------ bad input
def _pos(shape, fill=(0, 1)):
    return np.tile(np.array(fill, np.uint8), (shape[0], shape[1] // len(fill)))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(n=4, m=4), r"1 <= n < m, got n=4, m=4"),
        (dict(n=5, m=4), r"1 <= n < m"),
        (dict(n=0, m=4), r"1 <= n < m"),
        (dict(n=2, m=300), r"m must be at most 256"),
        (dict(n=2, m=3), r"m=3 does not divide the length 8 of axis 1"),
        (dict(n=2, m=4, axis=2), r"axis 2 is out of range"),
        (dict(n=2, m=4, axis=-3), r"axis -3 is out of range"),
    ],
)
def test_fromdense_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jsparse.NM.fromdense(np.ones((4, 8), np.float32), **kwargs)


def test_fromdense_bad_input():
    with pytest.raises(ValueError, match=r"expects a 2-D array, got shape \(8,\)"):
        jsparse.NM.fromdense(np.ones(8, np.float32))
    with pytest.raises(TypeError, match=r"must have a floating-point dtype, got int32"):
        jsparse.NM.fromdense(np.ones((4, 8), np.int32))
    with pytest.raises(TypeError, match=r"n and m must be ints"):
        jsparse.NM.fromdense(np.ones((4, 8), np.float32), n="two", m=4)
    with pytest.raises(TypeError, match=r"axis must be an int"):
        jsparse.NM.fromdense(np.ones((4, 8), np.float32), axis=None)


def test_constructor_bad_positions():
    v = np.ones((2, 4), np.float32)
    with pytest.raises(
        ValueError, match=r"positions must be in \[0, m\) = \[0, 4\); positions\[1, 3\] = 4"
    ):
        jsparse.NM(v, np.array([[0, 1, 0, 1], [0, 1, 2, 4]]), shape=(2, 8), n=2, m=4)
    with pytest.raises(ValueError, match=r"strictly increasing within each group.*\[2, 2\]"):
        jsparse.NM(v, np.array([[0, 1, 2, 2], [0, 1, 0, 1]]), shape=(2, 8), n=2, m=4)
    with pytest.raises(ValueError, match=r"strictly increasing within each group.*\[3, 1\]"):
        jsparse.NM(v, np.array([[0, 1, 0, 1], [3, 1, 0, 1]]), shape=(2, 8), n=2, m=4)
    with pytest.raises(ValueError, match=r"got values in \[-1, 1\]"):
        jsparse.NM(v, np.array([[0, 1, 0, 1], [-1, 1, 0, 1]]), shape=(2, 8), n=2, m=4)
    with pytest.raises(TypeError, match=r"NM positions must have an integer dtype, got float32"):
        jsparse.NM(v, v, shape=(2, 8), n=2, m=4)
    # m=3 stores 2 bits: 3 would fit the bits but is out of range.
    with pytest.raises(ValueError, match=r"\[0, 3\); positions\[0, 1\] = 3"):
        jsparse.NM(v, np.array([[0, 3, 0, 1], [0, 1, 0, 1]]), shape=(2, 6), n=2, m=3)
    # m=4 stores 2 bits: 5 must not be silently truncated to 1.
    with pytest.raises(ValueError, match=r"positions\[0, 1\] = 5"):
        jsparse.NM(v, np.array([[0, 5, 0, 1], [0, 1, 0, 1]]), shape=(2, 8), n=2, m=4)
    # axis 0: groups run down the columns
    with pytest.raises(ValueError, match=r"strictly increasing.*\[1, 0\]"):
        jsparse.NM(v.T, np.array([[0, 0], [1, 1], [1, 2], [0, 3]]), shape=(8, 2), n=2, m=4, axis=0)


def test_constructor_bad_shapes():
    v, p = np.ones((2, 4), np.float32), _pos((2, 4))
    with pytest.raises(ValueError, match=r"values must have shape \(2, 4\).*got \(2, 3\)"):
        jsparse.NM(v[:, :3], p, shape=(2, 8), n=2, m=4)
    with pytest.raises(ValueError, match=r"positions must have shape \(2, 4\).*got \(2, 2\)"):
        jsparse.NM(v, p[:, :2], shape=(2, 8), n=2, m=4)
    with pytest.raises(ValueError, match=r"NM shape must be 2-D"):
        jsparse.NM(v, p, shape=(2, 8, 1), n=2, m=4, axis=1)
    with pytest.raises(ValueError, match=r"m=4 does not divide the length 6 of axis 1"):
        jsparse.NM(v, p, shape=(2, 6), n=2, m=4)
    with pytest.raises(TypeError, match=r"NM values must have a floating-point dtype, got int32"):
        jsparse.NM(v.astype(np.int32), p, shape=(2, 8), n=2, m=4)
    a = jsparse.NM(v, p, shape=(2, 8), n=2, m=4)
    with pytest.raises(
        ValueError, match=r"new values have shape \(4,\), the pattern needs \(2, 4\)"
    ):
        a.with_values(np.ones(4, np.float32))


def test_packed_positions_bad_input():
    v = np.ones((2, 5), np.float32)  # 1:4 over 20 columns: 5 positions, 2 bytes a row
    good = np_pack(np.zeros((2, 5), np.uint8), 4)
    kw = dict(shape=(2, 20), n=1, m=4, packed=True)
    jsparse.NM(v, good, **kw)
    with pytest.raises(
        ValueError,
        match=r"packed positions must have shape \(2, 2\).*4 to a byte.*ceil\(5 / 4\) = 2; "
        r"got \(2, 5\)",
    ):
        jsparse.NM(v, np.zeros((2, 5), np.uint8), **kw)  # unpacked passed as packed
    with pytest.raises(ValueError, match=r"packed positions must have shape \(2, 2\).*got \(2,\)"):
        jsparse.NM(v, good[0], **kw)
    with pytest.raises(TypeError, match=r"packed positions must be uint8, got int32"):
        jsparse.NM(v, good.astype(np.int32), **kw)
    with pytest.raises(ValueError, match=r"padding slots .*must be 0; row 1 has \[0, 2, 0\]"):
        bad = good.copy()
        bad[1, 1] = 2 << 4  # slot 6: padding
        jsparse.NM(v, bad, **kw)
    # m=3 (2 bits): a packed 3 is out of range.
    v3 = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match=r"\[0, 3\); positions\[0, 2\] = 3"):
        jsparse.NM(v3, np_pack(np.array([[0, 1, 3, 1]]), 3), shape=(1, 6), n=2, m=3, packed=True)
    # Repeats inside a group, in a packed 2:8 (4 bits).
    v8 = np.ones((1, 2), np.float32)
    with pytest.raises(ValueError, match=r"strictly increasing within each group.*\[5, 5\]"):
        jsparse.NM(v8, np.array([[0x55]], np.uint8), shape=(1, 8), n=2, m=8, packed=True)
    # A wrong packed shape under jit is caught statically.
    with pytest.raises(ValueError, match=r"packed positions must have shape \(2, 2\)"):
        jax.jit(lambda v, p: jsparse.NM(v, p, **kw).todense())(v, np.zeros((2, 3), np.uint8))


def test_validate_under_jit_checks_static_only():
    v, p = np.ones((2, 4), np.float32), _pos((2, 4))

    @jax.jit
    def build(v, p):
        return jsparse.NM(v, p, shape=(2, 8), n=2, m=4).todense()

    assert build(v, p).shape == (2, 8)
    with pytest.raises(ValueError, match=r"values must have shape"):
        build(v[:, :2], p)


def test_mask_and_is_nm_bad_input():
    x = np.ones((4, 6), np.float32)
    with pytest.raises(ValueError, match=r"1 <= n < m"):
        jsparse.is_nm(x, 3, 3)
    with pytest.raises(ValueError, match=r"m=4 does not divide the length 6 of axis 1"):
        jsparse.is_nm(x, 2, 4)
    with pytest.raises(ValueError, match=r"is_nm expects a 2-D array"):
        jsparse.is_nm(np.ones(4), 2, 4)
    with pytest.raises(ValueError, match=r"m=4 does not divide the length 6 of axis 1"):
        jsparse.nm_mask(x, 2, 4, transposable=True)
    with pytest.raises(ValueError, match=r"1 <= n < m"):
        jsparse.nm_mask(x, 2, 2, axis=0)
    with pytest.raises(ValueError, match=r"nm_mask expects a 2-D array"):
        jsparse.nm_mask(np.ones(4), 1, 2)


def test_2to4_bad_input():
    a14 = jsparse.NM.random(jax.random.key(0), (4, 16), n=1, m=4)
    with pytest.raises(ValueError, match=r"needs n=2, m=4 grouped along axis 1, got n=1"):
        a14.to_2to4_compressed()
    a0 = jsparse.NM.random(jax.random.key(0), (16, 4), axis=0)
    with pytest.raises(ValueError, match=r"axis=0 \(use .T"):
        a0.to_2to4_compressed()
    with pytest.raises(ValueError, match=r"multiple of 16; got shape \(4, 8\)"):
        jsparse.NM.random(jax.random.key(0), (4, 8)).to_2to4_compressed()
    values = np.ones((2, 8), np.float32)
    with pytest.raises(TypeError, match=r"metadata must be uint16, got int32"):
        jsparse.NM.from_2to4_compressed(values, np.zeros((2, 1), np.int32))
    with pytest.raises(ValueError, match=r"need metadata of shape \(R, C // 16\) = \(2, 1\)"):
        jsparse.NM.from_2to4_compressed(values, np.zeros((2, 2), np.uint16))
    with pytest.raises(ValueError, match=r"must be 2-D"):
        jsparse.NM.from_2to4_compressed(values.ravel(), np.zeros((2, 1), np.uint16))
    # nibble 0x0: both indices 0 (a repeat); 0x1: (1, 0), decreasing
    for word in (0x0000, 0x4441):
        with pytest.raises(ValueError, match=r"strictly increasing within each group"):
            jsparse.NM.from_2to4_compressed(values, np.full((2, 1), word, np.uint16))


def test_ops_bad_input():
    a = jsparse.NM.random(jax.random.key(0), (4, 8))
    b = jsparse.NM.random(jax.random.key(1), (4, 8))
    with pytest.raises(ValueError, match=r"must share the same pattern"):
        a + b
    with pytest.raises(ValueError, match=r"must have the matrix's shape \(4, 8\).*got \(2,\)"):
        a * jnp.ones(2)
    with pytest.raises(ValueError, match=r"shapes \(4, 8\) and \(4, 3\) are not aligned"):
        a @ jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"not aligned"):
        jnp.ones((3, 8)) @ a
    with pytest.raises(ValueError, match=r"not aligned"):
        a @ jnp.ones(4)
    with pytest.raises(ValueError, match=r"not aligned"):
        jsparse.matmul(jnp.ones(8), a)
    with pytest.raises(ValueError, match=r"impl must be one of .*got 'bogus'"):
        jsparse.matmul(a, jnp.ones((8, 2)), impl="bogus")


def test_cotangent_has_float0_positions_and_transposes():
    a = jsparse.NM.random(jax.random.key(7), (8, 20), n=1, m=4)
    ga = jax.grad(lambda a: jnp.sum(a @ jnp.arange(20.0)), allow_int=True)(a)
    assert ga.positions.dtype == jax.dtypes.float0 and ga.positions.shape == a.packed_shape
    gt = ga.T.validate()
    assert gt.positions.dtype == jax.dtypes.float0 and gt.positions.shape == a.T.packed_shape
    # dvalues = x gathered at the kept columns.
    expected = np.take_along_axis(
        np.arange(20.0).reshape(5, 4)[None].repeat(8, 0),
        np.asarray(a.unpacked_positions)[..., None].astype(int),
        axis=2,
    )[..., 0]
    np.testing.assert_allclose(np.asarray(ga.values), expected)


@pytest.mark.parametrize("n,m,axis", [(2, 4, 0), (3, 8, 1), (1, 2, 1), (5, 16, 0)])
def test_pairwise_mask_equals_sorting_mask_with_ties(n, m, axis):
    """nm_mask's pairwise ranking (m <= 16) keeps what compress's top_k keeps."""
    from jsparse.formats.nm import packing as xla

    x = np.array(jax.random.normal(jax.random.key(3), (32, 48)))
    x[:8] = 1.0  # whole groups of ties
    x[8:12, :3] = -2.0  # ties across signs
    x = jnp.asarray(x)
    _, positions = xla.compress(x, n=n, m=m, axis=axis)
    expected = xla.decompress(jnp.ones(positions.shape, bool), positions, n=n, m=m, axis=axis)
    np.testing.assert_array_equal(jsparse.nm_mask(x, n, m, axis=axis), expected)
