"""Tensor parallelism (jsparse.parallel) on 8 host CPU devices (tests/conftest.py).

Every format split along each of its axes gives the single-device product and
gradients (w.r.t. the stored values and the dense operand) on 1x8, 2x4 and 8x1 meshes
whose "model" axis carries the split; the compiled HLO holds exactly the collectives
docs/scale.md promises (one reduction for a Megatron pair, one all-to-all for
Monarch, none for an output-parallel product).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jsparse
from jsparse import parallel

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)"
)

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
MESHES = ((1, 8), (2, 4), (8, 1))


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _dense(dtype=jnp.float32):
    # Every 8th block-row of 8x4 blocks is empty, so BCSR shards differ in block counts.
    x = _normal(0, (64, 32))
    return (x * (jnp.arange(64)[:, None] // 8 % 3 != 1)).astype(dtype)


@functools.cache
def _make(name, dtype=jnp.float32):
    x = _dense(dtype)
    if name == "bcsr":
        return jsparse.BCSR.fromdense(x, block_shape=(8, 4), nse=14)
    if name == "nm":
        return jsparse.NM.fromdense(x, n=2, m=4)
    if name == "nm0":
        return jsparse.NM.fromdense(x, n=2, m=4, axis=0)
    if name == "monarch":
        return jsparse.Monarch.fromdense(x, nblocks=8)
    return jsparse.LowRankSparse.fromdense(x, rank=2, density=0.2, block_shape=(8, 4))


CASES = [
    ("bcsr", "rows"),
    ("bcsr", "cols"),
    ("nm", "rows"),
    ("nm", "cols"),
    ("monarch", "blocks"),
    ("lowrank", "rows"),
    ("lowrank", "cols"),
]
IDS = [f"{n}-{a}" for n, a in CASES]


def _close(got, want, dtype, what=""):
    tol = TOL[dtype] * max(1.0, float(jnp.max(jnp.abs(want.astype(jnp.float32)))))
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=0, err_msg=what
    )


def _loss(values, x, a, product):
    return jnp.sum(jnp.sin(product(a.with_values(*values), x).astype(jnp.float32)))


def _single(left):  # the one-device product
    return (lambda a, x: jsparse.matmul(a, x)) if left else (lambda a, x: jsparse.matmul(x, a))


def _sharded(mesh, along, parts, left):  # the same, split over the "model" axis
    def product(a, x):
        s = parallel.split(a, parts, along=along)
        op = (s, x) if left else (x, s)
        return parallel.sharded_matmul(*op, mesh=mesh, axis="model")

    return product


def _values(a):
    return tuple(getattr(a, f) for f in a._value_fields)


@pytest.mark.parametrize(("name", "along"), CASES, ids=IDS)
def test_matmul_and_grads_equal_one_device(name, along):
    a = _make(name)
    values = _values(a)
    grad = jax.value_and_grad(_loss, argnums=(0, 1))
    xr, xl = _normal(1, (6, 64)), _normal(1, (32, 6))  # for x @ A and A @ x

    def both(product):  # x @ A and A @ x in one program (one compile per mesh)
        return lambda v, xr, xl: (grad(v, xr, a, product(False)), grad(v, xl, a, product(True)))

    def right(product):  # x @ A only (the layers' product)
        return lambda v, xr, xl: (grad(v, xr, a, product(False)),)

    want = jax.jit(both(_single))(values, xr, xl)
    for shape in MESHES:
        mesh = jax.make_mesh(shape, ("data", "model"))
        program = both if shape == (2, 4) else right
        got = jax.jit(program(functools.partial(_sharded, mesh, along, shape[1])))(values, xr, xl)
        for side, g, w in zip(("x @ A", "A @ x"), got, want, strict=False):
            what = f"{name} along {along} on {shape}, {side}"
            for gl, wl in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
                _close(gl, wl, jnp.float32, what)


@pytest.mark.parametrize(("name", "along"), CASES, ids=IDS)
def test_bfloat16_product_on_2x4_automatic_axes(name, along):
    a = _make(name, jnp.bfloat16)
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    x = _normal(2, (6, 64), jnp.bfloat16)
    s = parallel.split(a, 4, along=along)  # sharded_matmul lays it out
    got = jax.jit(lambda s, x: parallel.sharded_matmul(x, s, mesh=mesh, axis="model"))(s, x)
    assert got.dtype == jnp.bfloat16
    want = x.astype(jnp.float32) @ a.todense().astype(jnp.float32)
    _close(got, want, jnp.bfloat16)


@pytest.mark.parametrize(("name", "along"), CASES, ids=IDS)
def test_split_todense_and_counts(name, along):
    a = _make(name)
    s = parallel.split(a, 4, along=along)
    assert s.parts == 4 and s.local.batch_shape == (4,) and s.shape == a.shape
    if name in ("bcsr", "nm"):  # the stored values moved, nothing computed
        np.testing.assert_array_equal(np.asarray(s.todense()), np.asarray(a.todense()))
    else:  # U @ V and Monarch's factors are multiplied: rounding
        np.testing.assert_allclose(np.asarray(s.todense()), np.asarray(a.todense()), atol=1e-6)
    assert s.nstored == a.nstored
    if name == "bcsr":
        assert s.npadding > 0  # the shards store different numbers of blocks
        ranges = [(4 * d // 2, 4 * (d + 1) // 2) for d in range(4)] if along == "rows" else []
        if ranges:  # the padding is not counted: the bytes of the unpadded shards
            assert s.nbytes == sum(a.block_rows(lo, hi).nbytes for lo, hi in ranges)
        for d in range(4):  # each shard is a valid BCSR (sorted, unique positions)
            s.shard(d).validate()


def test_bcsr_padding_is_inert_under_training():
    a = _make("bcsr")
    s = parallel.split(a, 8, along="rows")
    pad = np.asarray(s.padding)
    assert pad.any()
    mesh = jax.make_mesh((8,), ("model",))
    x = _normal(3, (6, 64))

    def loss(s):
        return jnp.sum(parallel.sharded_matmul(x, s, mesh=mesh, axis="model") ** 2)

    g = jax.jit(jax.grad(loss, allow_int=True))(s.on_mesh(mesh, "model"))
    # Padding gets a zero gradient; the real blocks get the one-device gradient.
    assert not np.asarray(g.local.data)[pad].any()
    ga = jax.grad(lambda v: jnp.sum((x @ a.with_values(v)) ** 2))(a.data)
    want = parallel.split(a.with_values(ga), 8, along="rows").local.data
    np.testing.assert_allclose(np.asarray(g.local.data), np.asarray(want), atol=1e-4)
    # A value written into a padding block is ignored by the product and todense.
    poked = s.local.with_values(jnp.where(pad[..., None, None], 7.0, s.local.data))
    poked = parallel.Split(poked, s.padding, s.along, s.shape)
    np.testing.assert_array_equal(np.asarray(poked.todense()), np.asarray(a.todense()))
    np.testing.assert_allclose(
        np.asarray(jax.jit(loss)(poked.on_mesh(mesh, "model"))),
        np.asarray(jax.jit(loss)(s.on_mesh(mesh, "model"))),
        rtol=1e-6,
    )


def test_grow_and_drop_per_shard_tracks_padding():
    a = _make("bcsr")
    s = parallel.split(a, 4, along="cols")
    counts = (~np.asarray(s.padding)).sum(axis=1)
    nblocks = (64 // 8) * (32 // 4 // 4)
    scores = jnp.asarray(np.random.default_rng(4).uniform(size=(4, nblocks)), jnp.float32)
    new = jax.jit(lambda s: parallel.grow_and_drop(s, k=2, k_max=2, grow_scores=scores))(s)
    new_counts = (~np.asarray(new.padding)).sum(axis=1)
    assert (new_counts >= counts).all() and (new_counts > counts).any()
    for d in range(4):
        shard = new.shard(d).validate()  # sorted, each position stored once
        # Each shard equals the one-device step on that shard.
        want, _ = jsparse.train.grow_and_drop(s.shard(d), k=2, k_max=2, grow_scores=scores[d])
        np.testing.assert_array_equal(np.asarray(shard.todense()), np.asarray(want.todense()))
        # The blocks still marked padding hold zeros; the kept real blocks are unchanged.
        assert not np.asarray(new.local.data[d])[np.asarray(new.padding[d])].any()


def test_vmap_over_a_batch_of_inputs():
    a = _make("bcsr")
    mesh = jax.make_mesh((8,), ("model",))
    s = parallel.split(a, 8, along="cols").on_mesh(mesh, "model")
    xs = _normal(5, (3, 32, 4))

    def local(s, xs):
        return jax.vmap(lambda x: parallel.matmul(s, x, axis_name="model"))(xs)

    run = jax.shard_map(
        local, mesh=mesh, in_specs=(P("model"), P(None, "model", None)), out_specs=P()
    )
    xs = jax.device_put(xs, NamedSharding(mesh, P(None, "model", None)))
    want = jnp.einsum("mk,bkn->bmn", a.todense(), xs)
    np.testing.assert_allclose(np.asarray(jax.jit(run)(s, xs)), np.asarray(want), atol=1e-4)


# ---------------------------------------------------------------- collectives
def _collectives(hlo: str):
    ops = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
    return [op for _, op in re.findall(rf"= (\S+|\([^)]*\)) ({ops})(?:-start)?\(", hlo)]


def _megatron(name, scatter):
    """A column-parallel layer (x @ W1, W1 split by columns) then a row-parallel one
    (h @ W2, W2 split by rows), on a 2x4 mesh with the batch over "data"."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    dense1 = _normal(6, (32, 64))
    dense2 = _dense()
    if name == "bcsr":
        w1 = jsparse.BCSR.fromdense(dense1, block_shape=(4, 8), nse=20)
        w2 = jsparse.BCSR.fromdense(dense2, block_shape=(8, 4), nse=14)
    else:
        w1 = jsparse.NM.fromdense(dense1, n=2, m=4, axis=0)
        w2 = jsparse.NM.fromdense(dense2, n=2, m=4, axis=0)
    s1 = parallel.split(w1, 4, along="cols").on_mesh(mesh, "model")
    s2 = parallel.split(w2, 4, along="rows").on_mesh(mesh, "model")
    x = _normal(7, (8, 32))
    x = jax.device_put(x, NamedSharding(mesh, P("data", None)))

    def local(s1, s2, x):
        h = jax.nn.relu(parallel.matmul(x, s1, axis_name="model"))
        return parallel.matmul(h, s2, axis_name="model", scatter=scatter)

    out = P("data", "model") if scatter else P("data", None)
    f = jax.jit(
        jax.shard_map(
            local, mesh=mesh, in_specs=(P("model"), P("model"), P("data", None)), out_specs=out
        )
    )
    want = jax.nn.relu(x @ w1.todense()) @ w2.todense()
    return f, (s1, s2, x), want


@pytest.mark.parametrize("name", ["bcsr", "nm"])
@pytest.mark.parametrize("scatter", [False, True], ids=["psum", "psum_scatter"])
def test_megatron_pair_issues_one_reduction(name, scatter):
    f, args, want = _megatron(name, scatter)
    np.testing.assert_allclose(np.asarray(f(*args)), np.asarray(want), atol=1e-4)
    ops = _collectives(f.lower(*args).compile().as_text())
    # XLA may lower a reduce-scatter as an all-reduce and a slice: either counts once.
    assert len(ops) == 1, ops
    assert ops[0] in (("reduce-scatter", "all-reduce") if scatter else ("all-reduce",)), ops


def test_output_parallel_issues_no_collective_and_monarch_one_all_to_all():
    mesh = jax.make_mesh((8,), ("model",))
    x = _normal(8, (4, 64))
    for a, along, want in (
        (_make("bcsr"), "cols", []),
        (_make("nm"), "cols", []),
        (_make("monarch"), "blocks", ["all-to-all"]),
    ):
        s = parallel.split(a, 8, along=along)
        f = jax.jit(lambda s, x: parallel.sharded_matmul(x, s, mesh=mesh, axis="model"))
        assert _collectives(f.lower(s, x).compile().as_text()) == want, along


# ---------------------------------------------------------------- bad input
def test_bad_input_is_reported():
    bcsr = _make("bcsr")  # 8 block-rows, 8 block-columns
    with pytest.raises(ValueError, match="3 does not divide its 8 block-rows"):
        parallel.split(bcsr, 3, along="rows")
    with pytest.raises(ValueError, match="does not divide its 8 groups of 4 along axis 1"):
        parallel.split(_make("nm"), 16, along="cols")
    with pytest.raises(ValueError, match="does not divide its 8 diagonal blocks"):
        parallel.split(_make("monarch"), 3, along="blocks")
    with pytest.raises(ValueError, match="splits along 'blocks'"):
        parallel.split(_make("monarch"), 2, along="rows")
    with pytest.raises(ValueError, match="positive int"):
        parallel.split(bcsr, 0, along="rows")
    with pytest.raises(TypeError, match="takes a BCSR, NM, Monarch or LowRankSparse"):
        parallel.split(jnp.ones((4, 4)), 2, along="rows")
    with pytest.raises(ValueError, match="concrete BCSR pattern"):
        jax.jit(lambda a: parallel.split(a, 2, along="rows").local.data)(bcsr)

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    s = parallel.split(bcsr, 8, along="rows")
    with pytest.raises(ValueError, match="has 8 parts but mesh axis 'model' has 4 devices"):
        parallel.sharded_matmul(s, jnp.ones((32, 2)), mesh=mesh, axis="model")
    with pytest.raises(ValueError, match="has 8 parts but mesh axis 'model' has 4 devices"):
        s.on_mesh(mesh, "model")
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        s.on_mesh(mesh, "tensor")

    # A Split of 8 parts inside a shard_map over a 4-device axis: 2 shards per device
    # (a mesh of automatic axes: shard_map lays the operands out itself).
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

    def local(s, x):
        return parallel.matmul(s, x, axis_name="model")

    run = jax.shard_map(local, mesh=mesh, in_specs=(P("model"), P()), out_specs=P("model"))
    with pytest.raises(ValueError, match=r"has 2 shards on this device"):
        run(s, jnp.ones((32, 2)))

    # in_specs sharding the values but replicating the index arrays.
    s4 = parallel.split(bcsr, 4, along="rows")
    leaves, treedef = jax.tree.flatten(s4)  # local.data comes first
    specs = treedef.unflatten([P("model")] + [P()] * (len(leaves) - 1))
    run = jax.shard_map(local, mesh=mesh, in_specs=(specs, P()), out_specs=P("model"))
    with pytest.raises(ValueError, match=r"leaf \.local\.indices .* every leaf must hold"):
        run(s4, jnp.ones((32, 2)))

    with pytest.raises(ValueError, match="scatter=True needs a contracted split"):
        parallel.sharded_matmul(s4, jnp.ones((32, 2)), mesh=mesh, axis="model", scatter=True)
    with pytest.raises(TypeError, match="one Split"):
        parallel.matmul(jnp.ones(2), jnp.ones(2), axis_name="model")


@pytest.mark.parametrize("check_vma", [True, False])
def test_megatron_pair_gradients_with_batch_over_data(check_vma):
    """The pair inside a user's shard_map on 2x4, batch over "data": the gradients of
    both weights' stored values and of x equal the one-device ones."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    w1 = jsparse.BCSR.fromdense(_normal(6, (32, 64)), block_shape=(4, 8), nse=20)
    w2 = _make("bcsr")
    x = _normal(7, (8, 32))

    def ref(v1, v2, x):
        return jnp.sum(jnp.sin(jax.nn.relu(x @ w1.with_values(v1)) @ w2.with_values(v2)))

    def local(s1, s2, x):
        h = jax.nn.relu(parallel.matmul(x, s1, axis_name="model"))
        y = parallel.matmul(h, s2, axis_name="model")
        return jax.lax.psum(jnp.sum(jnp.sin(y)), "data")

    f = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P("model"), P("model"), P("data", None)),
        out_specs=P(),
        check_vma=check_vma,
    )

    def loss(v1, v2, x):
        s1 = parallel.split(w1.with_values(v1), 4, along="cols")
        s2 = parallel.split(w2.with_values(v2), 4, along="rows")
        place = jax.sharding.reshard
        return f(
            place(s1, NamedSharding(mesh, P("model"))),
            place(s2, NamedSharding(mesh, P("model"))),
            place(x, NamedSharding(mesh, P("data", None))),
        )

    args = (w1.data, w2.data, x)
    want = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2)))(*args)
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        _close(g, w, jnp.float32)
