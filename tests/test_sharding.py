"""Formats and layers on device meshes (8 host CPU devices, tests/conftest.py).

Every format and layer must give the single-device result (values and gradients)
on meshes with explicit axes (``jax.make_mesh``'s default; with and without
``jax.set_mesh``) and automatic axes, and inside ``jax.shard_map`` with
``check_vma`` on and off; a data-parallel gradient reduces the stored values only.
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
from jsparse.nn import FORMATS

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py sets XLA_FLAGS)"
)

BATCH = ("a", "b")  # the batch is sharded over both axes of a 2-D mesh
KEY = jax.random.key(0)


def _formats():
    dense = jax.random.normal(KEY, (64, 32))
    return {
        "bcsr": jsparse.BCSR.fromdense(dense, block_shape=(8, 8), nse=16),
        "nm": jsparse.NM.fromdense(dense, n=2, m=4),
        "monarch": jsparse.Monarch.fromdense(dense, nblocks=4),
        "lowrank": jsparse.LowRankSparse.fromdense(dense, rank=2, density=0.25, block_shape=(8, 8)),
    }


FORMAT_NAMES = ("bcsr", "nm", "monarch", "lowrank")
X = jax.random.normal(jax.random.key(1), (16, 64))


def _loss_and_grads(impl):
    def loss(a, x):
        return jnp.sum(jsparse.matmul(x, a, impl=impl) ** 2)

    def run(a, x):
        value, (ga, gx) = jax.value_and_grad(loss, argnums=(0, 1), allow_int=True)(a, x)
        return value, _float_leaves(ga), gx

    return loss, run


def _float_leaves(tree):
    return [g for g in jax.tree.leaves(tree) if jnp.issubdtype(g.dtype, jnp.floating)]


def _assert_same(got, want, what=""):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-4, atol=2e-4, err_msg=what)


def _mesh(shape, kind):
    return jax.make_mesh(shape, ("a", "b"), axis_types=(kind, kind))


def _run_on(mode, mesh, fn, a, x):
    """``fn(a, x)`` with the batch of ``x`` sharded over ``mesh`` in ``mode``."""
    xs = jax.device_put(x, NamedSharding(mesh, P(BATCH, None)))
    ar = jax.device_put(a, NamedSharding(mesh, P()))
    if mode == "jit":
        return jax.jit(fn)(ar, xs)
    if mode == "set_mesh":
        with jax.set_mesh(mesh):
            return jax.jit(fn)(ar, xs)
    check_vma = mode == "shard_map"

    def local(a, x):  # the loss of each device's rows, summed over the devices
        value, ga, gx = fn(a, x)
        if not check_vma:  # with check_vma, a replicated operand's gradient is summed
            ga = [jax.lax.psum(g, BATCH) for g in ga]
        return jax.lax.psum(value, BATCH), ga, gx

    out_specs = (P(), P(), P(BATCH, None))
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(BATCH, None)), out_specs=out_specs,
        check_vma=check_vma,
    )  # fmt: skip
    return jax.jit(sharded)(ar, xs)


MODES = ("jit", "set_mesh", "shard_map", "shard_map_no_vma")


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_matmul_and_grad_on_meshes(name, kind):
    a = _formats()[name]
    _, run = _loss_and_grads("auto")
    want = run(a, X)
    for shape in ((1, 8), (2, 4), (8, 1)):
        mesh = _mesh(shape, kind)
        if shape == (2, 4):
            modes = MODES if kind == AxisType.Explicit else ("jit", "shard_map")
        else:
            modes = ("set_mesh",) if kind == AxisType.Explicit else ("shard_map",)
        for mode in modes:
            _assert_same(_run_on(mode, mesh, run, a, X), want, f"{mode} on {shape}")


def _impl_cases():
    cases = []
    for name, a in _formats().items():
        for impl in jsparse.implementations("matmul", type(a)):
            marks = [pytest.mark.slow] if impl == "pallas" else []
            cases.append(pytest.param(name, impl, marks=marks, id=f"{name}-{impl}"))
    return cases


@pytest.mark.parametrize(("name", "impl"), _impl_cases())
def test_every_implementation_on_explicit_mesh_and_shard_map(name, impl):
    a = _formats()[name]
    _, run = _loss_and_grads(impl)
    want = run(a, X)
    mesh = _mesh((2, 4), AxisType.Explicit)
    for mode in ("jit", "shard_map"):
        _assert_same(_run_on(mode, mesh, run, a, X), want, mode)


def _collectives(hlo: str):
    """``(result shape text, op)`` of each collective of a compiled module (a tuple
    shape when XLA combined several into one)."""
    ops = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
    return re.findall(rf"= (\S+|\([^)]*\)) ({ops})(?:-start)?\(", hlo)


def _elements(shape_text: str) -> int:
    return sum(
        int(np.prod([int(d) for d in dims.split(",") if d]))
        for dims in re.findall(r"\[([\d,]*)\]", shape_text)
    )


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("kind", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_data_parallel_gradient_reduces_stored_values_only(name, kind):
    a = _formats()[name]
    impl = {"bcsr": "xla", "nm": "xla", "monarch": "xla", "lowrank": "xla"}[name]
    mesh = _mesh((1, 8), kind)
    values = _float_leaves(a)

    def grads(vals, x):
        leaves, tree = jax.tree.flatten(a)
        it = iter(vals)
        b = jax.tree.unflatten(
            tree, [next(it) if jnp.issubdtype(v.dtype, jnp.floating) else v for v in leaves]
        )
        g = jax.grad(lambda b: jnp.sum(jsparse.matmul(x, b, impl=impl) ** 2), allow_int=True)(b)
        return _float_leaves(g)

    xs = jax.device_put(jnp.ones((64, 64)), NamedSharding(mesh, P(BATCH, None)))
    vs = jax.device_put(values, NamedSharding(mesh, P()))
    hlo = jax.jit(grads).lower(vs, xs).compile().as_text()
    found = _collectives(hlo)
    assert {op for _, op in found} == {"all-reduce"}, found  # no gather of the batch
    reduced = sum(_elements(t) for t, _ in found)
    if kind == AxisType.Explicit:  # the products are batch-parallel by construction
        assert reduced == sum(v.size for v in values), (found, [v.shape for v in values])
        assert reduced < a.shape[0] * a.shape[1] or name == "lowrank"
    else:  # automatic axes: XLA's partitioner chooses (values or dense partial sums)
        assert reduced <= a.shape[0] * a.shape[1] + sum(v.size for v in values) + 1, found


def _layer(name, rngs, **kwargs):
    params = {
        "bcsr": dict(sparsity=0.5, block_shape=(8, 8)),
        "nm": dict(n=2, m=4),
        "monarch": dict(nblocks=4),
        "lowrank": dict(rank=2, sparsity=0.75, block_shape=(8, 8)),
    }[name]
    return FORMATS[name](64, 32, rngs=rngs, **params, **kwargs)


def _train(model, x, y, steps=2):
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)
    return [_step(model, optimizer, x, y) for _ in range(steps)]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_layer_trains_data_parallel_on_explicit_mesh(name):
    """The scenario of the report: nnx.jit + value_and_grad + adamw, x sharded."""
    x = jax.random.normal(jax.random.key(2), (16, 64))
    y = jax.random.normal(jax.random.key(3), (16, 32))
    want_model = _layer(name, nnx.Rngs(0))
    want = _train(want_model, x, y)
    mesh = jax.make_mesh((8,), ("d",))
    model = _layer(name, nnx.Rngs(0))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, P("d", None))
        ys = jax.device_put(y, P("d", None))
        got = _train(model, xs, ys)
    _assert_same(got, want)
    _assert_same(nnx.state(model, nnx.Param), nnx.state(want_model, nnx.Param))


def test_auto_does_not_trace_pallas_on_cpu(monkeypatch):
    from jsparse.formats.bcsr import pallas as bcsr_pallas
    from jsparse.formats.nm import pallas as nm_pallas

    def traced(*args, **kwargs):
        raise AssertionError("a Pallas kernel was traced")

    monkeypatch.setattr(bcsr_pallas, "bcsr_spmm", traced)
    monkeypatch.setattr(bcsr_pallas, "bcsr_sddmm", traced)
    monkeypatch.setattr(nm_pallas, "nm_spmm", traced)
    monkeypatch.setattr(nm_pallas, "nm_spmm_t", traced)
    formats = _formats()
    for name in ("bcsr", "nm"):
        a = formats[name]
        f = jax.jit(jax.grad(lambda x, a=a: jnp.sum(jsparse.matmul(x, a, impl="auto") ** 2)))
        assert f(X).shape == X.shape
        with pytest.raises(AssertionError, match="Pallas kernel was traced"):
            jax.jit(lambda x, a=a: jsparse.matmul(x, a, impl="pallas"))(X)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_layer_created_sharded_trains_on_data_and_model_axes(name):
    """A layer created directly sharded (``nnx.jit`` under ``jax.set_mesh``), its
    stored values split over "model", the batch over "data": the partition specs name
    the values' axes, index arrays are replicated, and training equals one device."""
    x = jax.random.normal(jax.random.key(2), (16, 64))
    y = jax.random.normal(jax.random.key(3), (16, 32))
    want = _train(_layer(name, nnx.Rngs(0)), x, y)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    metadata = {"out_sharding": (None, "model")}
    with jax.set_mesh(mesh):
        model = nnx.jit(lambda: _layer(name, nnx.Rngs(0), kernel_metadata=metadata))()
        specs = nnx.get_partition_spec(nnx.state(model))
        flat = nnx.to_flat_state(nnx.state(model))
        value_specs = [
            tuple(jax.typeof(v[...]).sharding.spec)
            for path, v in flat
            if isinstance(v, nnx.Param) and path[-1] != "bias"
        ]
        assert any("model" in spec for spec in value_specs), value_specs
        for path, variable in flat:  # index arrays: replicated, or split like the values
            spec = tuple(jax.typeof(variable[...]).sharding.spec)
            if not isinstance(variable, nnx.Param):
                assert all(e is None for e in spec) or spec in value_specs, (path, spec)
        assert jax.tree.leaves(specs)  # specs for the values and the index arrays
        got = _train(model, jax.device_put(x, P("data", None)), jax.device_put(y, P("data", None)))
    _assert_same(got, want)


class _SparseNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = FORMATS["bcsr"](32, 64, sparsity=0.75, block_shape=(8, 8), rngs=rngs)
        self.out = nnx.Linear(64, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def _net_loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def _step(model, optimizer, x, y):
    loss, g = nnx.value_and_grad(_net_loss)(model, x, y)
    optimizer.update(model, g)
    return loss


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["rigl", "set"])
def test_dynamic_sparse_training_data_parallel_equals_one_device(algorithm):
    """50 steps of RigL / SET (an update every 10): the batch over 8 devices gives the
    one-device pattern and values (the grow scores read all-reduced gradients)."""
    x = jax.random.normal(jax.random.key(4), (32, 32))
    y = jax.random.normal(jax.random.key(5), (32, 4))
    dst = (jsparse.train.RigL if algorithm == "rigl" else jsparse.train.SET)(
        total_steps=50, delta_t=10
    )

    def run(x, y):
        model = _SparseNet(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

        @nnx.jit
        def update(model, optimizer, t, x, y):
            if algorithm == "set":
                return dst.update(model, optimizer, t)
            return dst.update(model, optimizer, t, _net_loss, x, y)

        patterns = []
        for t in range(1, 51):
            _step(model, optimizer, x, y)
            if dst.is_update_step(t):
                update(model, optimizer, jnp.asarray(t), x, y)
                patterns.append(np.asarray(model.hidden.kernel_indices[...]))
        return patterns, model

    want_patterns, want = run(x, y)
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        got_patterns, got = run(jax.device_put(x, P("data")), jax.device_put(y, P("data")))
    assert len(want_patterns) >= 3
    for g, w in zip(got_patterns, want_patterns, strict=True):
        np.testing.assert_array_equal(g, w)
    assert not np.array_equal(want_patterns[0], want_patterns[-1]) or algorithm == "set"
    np.testing.assert_allclose(
        np.asarray(got.hidden.kernel_data[...]), np.asarray(want.hidden.kernel_data[...]),
        rtol=1e-3, atol=1e-4,
    )  # fmt: skip


def test_gradual_magnitude_pruning_data_parallel_equals_one_device():
    """GMP (the stored-block count shrinks at each update, outside jit) on 8 devices
    with the batch sharded keeps the one-device patterns, values and optimizer state."""
    x = jax.random.normal(jax.random.key(6), (32, 32))
    y = jax.random.normal(jax.random.key(7), (32, 4))
    gmp = jsparse.train.GradualMagnitudePruning(0.9, begin_step=0, end_step=12, frequency=6)

    def run(x, y):
        model = _SparseNet(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

        patterns, losses = [], []
        for t in range(1, 16):
            losses.append(float(_step(model, optimizer, x, y)))
            if gmp.update(model, optimizer, t):
                patterns.append(np.asarray(model.hidden.kernel_indices[...]))
        return patterns, losses, model, optimizer

    want_patterns, want_losses, want, _ = run(x, y)
    with jax.set_mesh(jax.make_mesh((8,), ("data",))):
        got_patterns, got_losses, got, got_opt = run(
            jax.device_put(x, P("data")), jax.device_put(y, P("data"))
        )
    assert [p.shape for p in want_patterns] == [(7,), (3,)]  # 8 of 32 blocks stored at first
    for g, w in zip(got_patterns, want_patterns, strict=True):
        np.testing.assert_array_equal(g, w)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-4)
    np.testing.assert_allclose(
        np.asarray(got.hidden.kernel_data[...]), np.asarray(want.hidden.kernel_data[...]),
        rtol=1e-3, atol=1e-4,
    )  # fmt: skip
    mu = got_opt.opt_state[0].mu["hidden"]["kernel_data"][...]
    assert mu.shape == got.hidden.kernel_data[...].shape
