"""Tensor-parallel NNX layers (jsparse.parallel.ParallelLinear) on 8 host CPU devices.

The layers are born sharded under ``nnx.jit`` in ``jax.set_mesh``, compute
``x @ W + b`` against the dense kernel, a Megatron MLP issues one all-reduce and trains
like the same model off the mesh (one device), and dynamic sparse training moves the
pattern shard by shard with the optimizer state following the values.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jsparse
from jsparse import parallel
from jsparse.parallel import ParallelLinear

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)"
)

FORMATS = {"bcsr": {"sparsity": 0.5, "block_shape": (4, 4)}, "nm": {"n": 2, "m": 4}}


def _mesh():
    return jax.make_mesh((2, 4), ("data", "model"))


def _collectives(hlo: str):
    ops = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
    return [op for _, op in re.findall(rf"= (\S+|\([^)]*\)) ({ops})(?:-start)?\(", hlo)]


def _x(shape, mesh=None):
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    if mesh is None:
        return x
    return jax.device_put(x, NamedSharding(mesh, P("data")))


# The Megatron test below covers the other two pairs.
@pytest.mark.parametrize(("fmt", "par"), [("bcsr", "row"), ("nm", "column")])
def test_layer_born_sharded_and_equals_dense(fmt, par):
    mesh = _mesh()
    with jax.set_mesh(mesh):
        layer = nnx.jit(
            lambda: ParallelLinear(
                32, 16, format=fmt, parallel=par, rngs=nnx.Rngs(0), **FORMATS[fmt]
            )
        )()
        specs = nnx.get_partition_spec(nnx.state(layer))
        for name, var in nnx.state(layer).items():
            spec = var[...].sharding.spec
            assert tuple(specs[name].get_value()) == tuple(spec), name
            if name == "bias":
                assert tuple(spec) == (("model",) if par == "column" else (None,))
            else:  # every stacked leaf, values and index arrays: one shard per device
                assert spec[0] == "model", name
                assert var[...].addressable_shards[0].data.shape[0] == 1, name
        opt = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
        mu = opt.opt_state[0].mu
        key = "kernel_data" if fmt == "bcsr" else "kernel_values"
        assert mu[key][...].sharding.spec[0] == "model"

        x = _x((4, 3, 32), mesh)  # batch over "data", extra leading axis
        y = nnx.jit(lambda m, x: m(x))(layer, x)
        assert y.shape == (4, 3, 16)
        assert tuple(y.sharding.spec) == (
            ("data", None, "model") if par == "column" else ("data", None, None)
        )
        w, b = nnx.jit(lambda m: (m.dense_kernel(), m.bias[...]))(layer)
        if par == "row":  # psum_scatter: the output split on its features, bias likewise
            scattered = nnx.jit(
                lambda: ParallelLinear(
                    32,
                    16,
                    format=fmt,
                    parallel=par,
                    scatter=True,
                    rngs=nnx.Rngs(0),
                    **FORMATS[fmt],
                )
            )()
            assert scattered.bias[...].sharding.spec == P("model")
            forward = nnx.jit(lambda m, x: m(x))
            ys = forward(scattered, x)
            assert tuple(ys.sharding.spec) == ("data", None, "model")
            ops = _collectives(forward.lower(scattered, x).compile().as_text())
            assert len(ops) == 1 and ops[0] in ("reduce-scatter", "all-reduce"), ops
            np.testing.assert_allclose(np.asarray(ys), np.asarray(y), atol=1e-5)
            ops = _collectives(forward.lower(layer, x).compile().as_text())
            assert ops == ["all-reduce"], ops
    want = np.asarray(x) @ np.asarray(w) + np.asarray(b)
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
    assert (np.asarray(w) == 0).mean() >= 0.5  # sparse
    # Off the mesh, the same seed builds the same layer and computes the same outputs.
    ref = ParallelLinear(
        32, 16, format=fmt, parallel=par, parts=4, rngs=nnx.Rngs(0), **FORMATS[fmt]
    )
    for (name, a), (_, r) in zip(nnx.state(layer).items(), nnx.state(ref).items(), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(r[...]), err_msg=name)
    np.testing.assert_allclose(np.asarray(ref(np.asarray(x))), want, atol=1e-5)
    if fmt == "nm":  # automatic mesh axes: manual over "model" only, the same values
        auto = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
        with jax.set_mesh(auto):
            layer = nnx.jit(
                lambda: ParallelLinear(
                    32, 16, format=fmt, parallel=par, rngs=nnx.Rngs(0), **FORMATS[fmt]
                )
            )()
            y = nnx.jit(lambda m, x: m(x))(layer, np.asarray(x))
        np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)


class _MLP(nnx.Module):
    def __init__(self, fmt, *, parts=None, rngs):
        kw = FORMATS[fmt]
        self.fc1 = ParallelLinear(
            16, 32, format=fmt, parallel="column", parts=parts, rngs=rngs, **kw
        )
        self.fc2 = ParallelLinear(32, 8, format=fmt, parallel="row", parts=parts, rngs=rngs, **kw)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_megatron_mlp_one_all_reduce_and_training_equals_one_device(fmt):
    mesh = _mesh()
    xs = _x((3, 8, 16))
    ys = jnp.asarray(np.random.default_rng(2).standard_normal((3, 8, 8)), jnp.float32)

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def step(model, opt, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        opt.update(model, grads)
        return loss

    def train(model, place):
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        return [float(step(model, opt, *place(x, y))) for x, y in zip(xs, ys, strict=True)]

    with jax.set_mesh(mesh):
        model = nnx.jit(lambda: _MLP(fmt, rngs=nnx.Rngs(0)))()
        x0 = _x((8, 16), mesh)
        forward = nnx.jit(lambda m, x: m(x))
        ops = _collectives(forward.lower(model, x0).compile().as_text())
        assert ops == ["all-reduce"], ops

        def place(x, y):
            return (
                jax.device_put(x, NamedSharding(mesh, P("data"))),
                jax.device_put(y, NamedSharding(mesh, P("data"))),
            )

        sharded = train(model, place)
        trained = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    single_model = _MLP(fmt, parts=4, rngs=nnx.Rngs(0))  # off the mesh: one device
    single = train(single_model, lambda x, y: (x, y))
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert single[-1] < single[0]
    for a, b in zip(
        jax.tree.leaves(trained), jax.tree.leaves(nnx.state(single_model, nnx.Param)), strict=True
    ):
        np.testing.assert_allclose(a, np.asarray(b), atol=2e-5)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dtypes_off_the_mesh(fmt):
    x = _x((2, 3, 16))
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
    layer = ParallelLinear(
        16, 8, format=fmt, parts=2, param_dtype=jnp.bfloat16, kernel_init=init,
        rngs=nnx.Rngs(1), **FORMATS[fmt],
    )  # fmt: skip
    values = layer.kernel_data if fmt == "bcsr" else layer.kernel_values
    assert values.dtype == jnp.bfloat16
    w = np.asarray(layer.dense_kernel(), np.float32)
    b = np.asarray(layer.bias[...], np.float32)
    y = layer(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    want = np.asarray(x.astype(jnp.bfloat16), np.float32) @ w + b
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=3e-2 * np.abs(want).max())
    layer.dtype = jnp.float32  # compute in float32 from bfloat16 values
    y = layer(x)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(x) @ w + b, atol=1e-5)
    if fmt == "bcsr":  # (the Megatron test differentiates BCSR layers on the mesh)
        return
    # grad and jvp with respect to the input, against the dense kernel
    g = jax.grad(lambda x: jnp.sum(jnp.sin(layer(x))))(x)
    gw = jax.grad(lambda x: jnp.sum(jnp.sin(x @ w + b)))(x)
    np.testing.assert_allclose(np.asarray(g), np.asarray(gw), atol=1e-4)
    _, t = jax.jvp(layer, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(np.asarray(t), np.ones(x.shape, np.float32) @ w, atol=1e-4)


def test_grow_and_drop_per_shard_moves_optimizer_state():
    dense = np.random.default_rng(3).standard_normal((16, 16)).astype(np.float32)
    dense[4:8] = 0  # block-row 1 empty: the row shards store different counts
    w = jsparse.BCSR.fromdense(jnp.asarray(dense), block_shape=(4, 4), nse=10)

    class Model(nnx.Module):
        def __init__(self):
            self.fc = ParallelLinear.from_kernel(w, parallel="row", parts=2)

    mesh = jax.make_mesh((4, 2), ("data", "model"))
    x = _x((8, 16), mesh)
    scores = jnp.asarray(np.random.default_rng(4).uniform(size=(16, 16)))

    @nnx.jit
    def train_step(model, opt, x):
        opt.update(model, nnx.grad(lambda m: jnp.sum(m.fc(x) ** 2))(model))
        return model.fc.block_scores(scores)

    with jax.set_mesh(mesh):
        model = Model()  # born sharded: each device holds its shard
        assert model.fc.kernel_data[...].sharding.spec[0] == "model"
        assert model.fc.split.npadding > 0
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
        scores = train_step(model, opt, x)
        assert scores.shape == (2, 8)
        before = jax.device_get(model.fc.split)
        mu = np.asarray(opt.opt_state[0].mu["fc"]["kernel_data"][...])
        assert np.abs(mu).sum() > 0
        with pytest.raises(ValueError, match="no optimizer state leaf mirrors"):
            model.fc.grow_and_drop(k=1, k_max=2, grow_scores=scores, optimizer=opt, path=("no",))
        assert model.fc.split.npadding == before.npadding  # the failed call changed nothing

        @nnx.jit
        def dst(model, opt):
            return model.fc.grow_and_drop(
                k=2, k_max=2, grow_scores=scores, optimizer=opt, path=("fc",)
            )

        # Each device prunes and grows within its own shard: no communication.
        assert _collectives(dst.lower(model, opt).compile().as_text()) == []
        remap = jax.device_get(dst(model, opt)["kernel_data"])
        after = jax.device_get(model.fc.split)
        new_mu = np.asarray(opt.opt_state[0].mu["fc"]["kernel_data"][...])
    want = parallel.grow_and_drop(before, k=2, k_max=2, grow_scores=scores)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert after.npadding < before.npadding  # padding dropped first, grown into real blocks
    source, reset = np.asarray(remap.source), np.asarray(remap.reset)
    assert reset.sum(axis=1).tolist() == [2, 2]
    for d in range(2):
        kept = ~reset[d]
        np.testing.assert_array_equal(new_mu[d][kept], mu[d][source[d][kept]])
        assert not new_mu[d][reset[d]].any()
        # kept blocks keep their values; grown ones start at zero
        np.testing.assert_array_equal(
            np.asarray(after.local.data[d])[kept], np.asarray(before.local.data[d])[source[d][kept]]
        )
        assert not np.asarray(after.local.data[d])[reset[d]].any()
    with pytest.raises(TypeError, match="needs a BCSR layer"):
        ParallelLinear(8, 8, format="nm", parts=2, rngs=nnx.Rngs(0)).grow_and_drop(
            k=1, k_max=1, grow_scores=jnp.ones((2, 4))
        )
    with pytest.raises(ValueError, match=r"grow_scores must be \(parts, blocks per shard\)"):
        model.fc.grow_and_drop(k=1, k_max=1, grow_scores=jnp.ones((2, 3)))


def test_bad_input_is_reported():
    kw = FORMATS["bcsr"]
    with jax.set_mesh(_mesh()):
        with pytest.raises(ValueError, match="parts=2 but mesh axis 'model' has 4 devices"):
            ParallelLinear(16, 16, parts=2, rngs=nnx.Rngs(0), **kw)
        with pytest.raises(ValueError, match="splits out_features=6 over 4 parts"):
            ParallelLinear(16, 6, rngs=nnx.Rngs(0), sparsity=0.5, block_shape=(2, 2))
        layer = ParallelLinear(16, 16, axis="data", parallel="row", rngs=nnx.Rngs(0), **kw)
        assert layer.parts == 2
    with pytest.raises(ValueError, match="splits in_features=10 over 4 parts"):
        ParallelLinear(10, 16, parallel="row", parts=4, rngs=nnx.Rngs(0), **kw)
    with pytest.raises(ValueError, match="parallel must be 'column' or 'row'"):
        ParallelLinear(16, 16, parallel="diagonal", rngs=nnx.Rngs(0), **kw)
    with pytest.raises(ValueError, match="supports the formats 'bcsr', 'nm', got format='monarch'"):
        ParallelLinear(16, 16, format="monarch", rngs=nnx.Rngs(0), nblocks=4)
    with pytest.raises(ValueError, match="scatter=True needs parallel='row'"):
        ParallelLinear(16, 16, scatter=True, rngs=nnx.Rngs(0), **kw)
    with pytest.raises(ValueError, match="inputs must be"):
        ParallelLinear(16, 16, parts=2, rngs=nnx.Rngs(0), **kw)(jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="m=4 does not divide in_features=2"):  # N:M per shard
        ParallelLinear(8, 8, format="nm", parallel="row", parts=4, rngs=nnx.Rngs(0))
    layer = ParallelLinear(16, 16, parts=2, rngs=nnx.Rngs(0), **kw)
    with jax.set_mesh(_mesh()), pytest.raises(ValueError, match="has 2 parts but mesh axis"):
        layer(jnp.ones((2, 16)))
    with pytest.raises(ValueError, match="takes a BCSR or NM"):
        ParallelLinear.from_kernel(jsparse.Monarch.init(jax.random.key(0), (16, 16), nblocks=4))
