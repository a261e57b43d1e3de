"""Issue 16, "NNX habits": the repros as reported, each against a dense reference.

- ``sparsify`` converts ``nnx.LinearGeneral`` (the projections of
  ``nnx.MultiHeadAttention``) and warns, naming each layer, about those it cannot;
- layers stacked by ``nnx.vmap`` (kernel ``(L, in, out)``) convert to stacked layers
  that ``nnx.scan`` runs and that train under ``nnx.jit``;
- ``kernel_init=nnx.with_partitioning(...)`` and ``precision`` survive
  ``sparsify`` / ``densify``;
- ERK given the block shape agrees with ``sparsify`` on which layers can be blocked,
  and ``examples/quickstart.py`` runs with ``--hidden 256``, few steps and one method.

The oracle is always the dense model before conversion (or a known value).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import jsparse
from jsparse.nn import (
    FORMATS,
    BCSRLinear,
    FormatLinearGeneral,
    densify,
    linear_layers,
    linear_shape,
    path_str,
    sparsify,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Format parameters for 32x32 kernels: the layer built with them (random) holds a
# kernel in the format, and sparsify with them recovers it.
BUILD = {
    "bcsr": dict(sparsity=0.5, block_shape=(8, 8)),
    "nm": dict(n=2, m=4),
    "monarch": dict(nblocks=4, block_rank=2),
    "lowrank": dict(rank=2, sparsity=0.0, block_shape=(8, 8)),
}
# The sparse products sum in another order than the dense dot: equal to float32
# rounding, not bit for bit.
EXACT = {"bcsr": False, "nm": False, "monarch": False, "lowrank": False}


def in_format_kernel(fmt: str, shape, seed: int) -> jax.Array:
    """A dense ``shape`` kernel that ``fmt`` stores (exactly or up to rounding)."""
    layer = FORMATS[fmt](*shape, rngs=nnx.Rngs(seed), **BUILD[fmt])
    if fmt == "monarch":  # non-zero right factors: a kernel of full block rank
        layer.kernel_right.set_value(
            jax.random.normal(jax.random.key(seed), layer.kernel_right.shape) * 0.3
        )
    return layer.dense_kernel()


def assert_close(actual, expected, exact: bool):
    tol = 0 if exact else 2e-5
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=tol, atol=tol)


# ------------------------------------------------------------------ LinearGeneral
def attention(seed=0):
    return nnx.MultiHeadAttention(
        num_heads=4, in_features=32, qkv_features=32, decode=False, rngs=nnx.Rngs(seed)
    )


def put_in_format(model, fmt: str):
    """Give every LinearGeneral a kernel that ``fmt`` stores (reshaped)."""
    for i, (_, layer) in enumerate(linear_layers(model)):
        _, flat = linear_shape(layer)
        kernel = in_format_kernel(fmt, flat, seed=10 + i)
        layer.kernel.set_value(jnp.reshape(kernel, layer.kernel.shape))


def test_multi_head_attention_projections_stay_dense_before_the_fix_repro():
    # The report: sparsify left q/k/v/out dense without a word. Now all four convert.
    att = attention()
    assert [path_str(p) for p, _ in linear_layers(att)] == ["key", "out", "query", "value"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        att = sparsify(att, format="bcsr", sparsity=0.0, block_shape=(8, 8))
    for name in ("query", "key", "value", "out"):
        assert isinstance(getattr(att, name), FormatLinearGeneral), name
    assert not any(isinstance(m, nnx.LinearGeneral) for _, m in nnx.iter_graph(att))


@pytest.mark.parametrize("fmt", sorted(BUILD))
def test_sparsified_attention_equals_the_dense_attention(fmt):
    dense = attention()
    put_in_format(dense, fmt)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    expected = dense(x)
    sparse = sparsify(nnx.clone(dense), format=fmt, **BUILD[fmt])
    inner = {type(getattr(sparse, n).layer) for n in ("query", "key", "value", "out")}
    assert inner == {FORMATS[fmt]}
    assert_close(sparse(x), expected, EXACT[fmt])
    assert_close(nnx.jit(lambda m, x: m(x))(sparse, x), expected, False)
    # Gradients with respect to the input agree as well.
    grad = jax.grad(lambda x, m: jnp.sum(jnp.tanh(m(x))))
    assert_close(grad(x, sparse), grad(x, dense), False)
    # densify gives the LinearGeneral layers back, with their shapes.
    back = densify(sparse)
    for name in ("query", "key", "value", "out"):
        layer, original = getattr(back, name), getattr(dense, name)
        assert type(layer) is nnx.LinearGeneral
        assert layer.kernel.shape == original.kernel.shape
        assert layer.bias.shape == original.bias.shape
        assert (layer.in_features, layer.out_features, layer.axis) == (
            original.in_features,
            original.out_features,
            original.axis,
        )
    assert_close(back(x), expected, EXACT[fmt])


@pytest.mark.parametrize(
    "in_features,out_features,axis,x_shape",
    [
        (16, (4, 8), -1, (3, 16)),
        ((4, 8), 16, (-2, -1), (2, 3, 4, 8)),
        ((4, 8), (2, 8), (1, 2), (3, 4, 8, 5)),  # contracted axes in the middle
        ((8, 4), 16, (0, 2), (8, 6, 4)),  # leading and trailing
        (8, 16, 0, (8, 3)),  # the first axis
    ],
)
def test_linear_general_shapes_and_axes(in_features, out_features, axis, x_shape):
    dense = nnx.LinearGeneral(in_features, out_features, axis=axis, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), x_shape)
    sparse = sparsify(nnx.clone(dense), format="bcsr", sparsity=0.0, block_shape=(4, 4))
    assert isinstance(sparse, FormatLinearGeneral)
    y = sparse(x)
    assert y.shape == dense(x).shape
    assert_close(y, dense(x), False)
    assert_close(densify(sparse)(x), dense(x), False)


def test_unconvertible_linear_general_is_skipped_with_a_warning_naming_it():
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.batched = nnx.LinearGeneral(8, 4, batch_axis={0: 3}, rngs=rngs)
            self.plain = nnx.LinearGeneral(8, (2, 4), rngs=rngs)

    model = Model(nnx.Rngs(0))
    with pytest.warns(UserWarning, match=r"batched \(LinearGeneral: it has batch_axis \{0: 3\}"):
        model = sparsify(model, format="bcsr", sparsity=0.0, block_shape=(4, 4))
    assert type(model.batched) is nnx.LinearGeneral
    assert isinstance(model.plain, FormatLinearGeneral)
    with pytest.raises(ValueError, match="batch_axis"):
        linear_shape(model.batched)


def test_out_sharding_is_refused_clearly():
    layer = sparsify(nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0)), format="nm", n=2, m=4)
    with pytest.raises(NotImplementedError, match="out_sharding"):
        layer(jnp.ones((2, 8)), out_sharding=P())


# ------------------------------------------------------------------ nnx.vmap stacks
L, WIDTH = 3, 32


def BLOCKS(path, layer):  # noqa: N802 (a filter, used like nnx's filters)
    return path == ("blocks",)


@nnx.split_rngs(splits=L)
@nnx.vmap(in_axes=0, out_axes=0)
def stacked_linear(rngs):
    return nnx.Linear(WIDTH, WIDTH, rngs=rngs)


class ScannedMLP(nnx.Module):
    def __init__(self, rngs):
        self.blocks = stacked_linear(rngs)
        self.head = nnx.Linear(WIDTH, 4, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(layer, x):
            return jax.nn.relu(layer(x))

        return self.head(body(self.blocks, x))


def scanned_mlp_in_format(fmt: str):
    model = ScannedMLP(nnx.Rngs(0))
    kernels = [in_format_kernel(fmt, (WIDTH, WIDTH), seed=20 + i) for i in range(L)]
    model.blocks.kernel.set_value(jnp.stack(kernels))
    return model


def test_stacked_linear_repro_kernel_must_be_2d():
    # The report: "kernel must be 2-D". Now one stacked layer with a leading L axis.
    model = scanned_mlp_in_format("bcsr")
    assert linear_shape(model.blocks) == ((L,), (WIDTH, WIDTH))
    model = sparsify(model, format="bcsr", sparsity=0.5, block_shape=(8, 8), filter=BLOCKS)
    assert isinstance(model.blocks, BCSRLinear)
    assert model.blocks.kernel_data.shape == (L, 8, 8, 8)  # (L, nse, bm, bn)


@pytest.mark.parametrize("fmt", sorted(BUILD))
def test_scanned_mlp_sparsified_equals_the_dense_scanned_model(fmt):
    dense = scanned_mlp_in_format(fmt)
    x = jax.random.normal(jax.random.key(3), (5, WIDTH))
    expected = dense(x)
    sparse = sparsify(nnx.clone(dense), format=fmt, filter=BLOCKS, **BUILD[fmt])
    assert isinstance(sparse.blocks, FORMATS[fmt])
    assert type(sparse.head) is nnx.Linear
    assert_close(sparse(x), expected, False)
    back = densify(nnx.clone(sparse))
    assert type(back.blocks) is nnx.Linear and back.blocks.kernel.shape == (L, WIDTH, WIDTH)
    assert_close(back.blocks.kernel[...], dense.blocks.kernel[...], EXACT[fmt])
    assert_close(back(x), expected, False)


def test_stacked_bcsr_patterns_differ_per_layer_with_the_same_count():
    dense = scanned_mlp_in_format("bcsr")
    sparse = sparsify(
        nnx.clone(dense), format="bcsr", sparsity=0.5, block_shape=(8, 8), filter=BLOCKS
    )
    indices = np.asarray(sparse.blocks.kernel_indices[...])
    assert indices.shape == (L, 8)
    assert len({tuple(row) for row in indices}) == L  # the slices' own patterns


def test_scanned_sparse_mlp_trains_one_step_like_the_masked_dense_step():
    lr = 0.1
    dense = scanned_mlp_in_format("bcsr")
    x = jax.random.normal(jax.random.key(4), (8, WIDTH))
    y = jnp.arange(8) % 4
    stored = np.asarray(dense.blocks.kernel[...]) != 0  # BCSR at 0.5 stores these
    sparse = sparsify(
        nnx.clone(dense),
        format="bcsr",
        sparsity=0.5,
        block_shape=(8, 8),
        filter=BLOCKS,
    )

    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    optimizer = nnx.Optimizer(sparse, optax.sgd(lr), wrt=nnx.Param)
    loss = step(sparse, optimizer)

    # The reference: the dense step with the kernel gradient masked to the pattern.
    dense_loss, grads = nnx.value_and_grad(loss_fn)(dense)
    kernel = dense.blocks.kernel[...] - lr * grads.blocks.kernel[...] * stored
    np.testing.assert_allclose(float(loss), float(dense_loss), rtol=1e-6)
    trained = densify(nnx.clone(sparse)).blocks
    assert_close(trained.kernel[...], kernel, False)
    assert_close(trained.bias[...], dense.blocks.bias[...] - lr * grads.blocks.bias[...], False)
    assert_close(
        sparse.head.kernel[...], dense.head.kernel[...] - lr * grads.head.kernel[...], False
    )


# ------------------------------------------------------------------ partitioning, precision
@pytest.fixture
def mesh():
    mesh = jax.make_mesh((1, 1), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
    with jax.set_mesh(mesh):
        yield mesh


@pytest.mark.parametrize("fmt", sorted(BUILD))
def test_with_partitioning_repro_and_round_trip(fmt, mesh):
    # The report: `kernel_init=nnx.with_partitioning(...)` crashed every jsparse layer
    # ("float() argument must be ... not 'VariableMetadata'") and sparsify -> densify
    # dropped the spec and precision.
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
    layer = FORMATS[fmt](32, 32, kernel_init=init, rngs=nnx.Rngs(0), **BUILD[fmt])
    assert layer(jnp.ones((2, 32))).shape == (2, 32)
    linear = nnx.Linear(32, 32, kernel_init=init, precision="highest", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (2, 32))
    linear.kernel.set_value(in_format_kernel(fmt, (32, 32), seed=1))
    back = densify(sparsify(nnx.clone(linear), format=fmt, **BUILD[fmt]))
    assert back.precision == "highest"
    assert nnx.get_partition_spec(nnx.state(back))["kernel"].get_value() == P("data", "model")
    assert_close(back(x), linear(x), EXACT[fmt])


def test_attention_partitioning_is_flattened_and_restored(mesh):
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model", None))
    dense = nnx.LinearGeneral(32, (4, 8), kernel_init=init, rngs=nnx.Rngs(0))
    sparse = sparsify(nnx.clone(dense), format="bcsr", sparsity=0.0, block_shape=(8, 8))
    specs = nnx.get_partition_spec(nnx.state(sparse))
    assert specs["layer"]["kernel_data"].get_value() == P(None, "data", "model")
    back = densify(sparse)
    assert nnx.get_partition_spec(nnx.state(back))["kernel"].get_value() == P("data", "model", None)
    minor = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, "model"))
    unflattenable = nnx.LinearGeneral(32, (4, 8), kernel_init=minor, rngs=nnx.Rngs(0))
    with pytest.warns(UserWarning, match="other than the leading one"):
        kept = sparsify(unflattenable, format="bcsr", sparsity=0.0, block_shape=(8, 8))
    assert type(kept) is nnx.LinearGeneral


# ------------------------------------------------------------------ ERK and the block shape
def mlp(hidden):
    return nnx.Sequential(
        nnx.Linear(64, hidden, rngs=nnx.Rngs(0)),
        nnx.relu,
        nnx.Linear(hidden, hidden, rngs=nnx.Rngs(1)),
        nnx.relu,
        nnx.Linear(hidden, 10, rngs=nnx.Rngs(2)),
    )


def test_erk_recipe_repro_head_the_block_shape_does_not_divide():
    # The report: with hidden 256, ERK leaves the (256, 10) head sparse and the
    # docs recipe crashes in sparsify.
    model = mlp(256)
    unaware = jsparse.train.erk(model, 0.9)
    assert unaware["layers/4"] > 0
    with pytest.raises(ValueError, match=r"does not divide"):
        sparsify(
            nnx.clone(model),
            format="bcsr",
            sparsity=unaware,
            block_shape=(32, 32),
            filter=lambda path, layer: unaware[path_str(path)] > 0,
        )
    # The recipe of docs/training.md, with the block shape given to ERK.
    sparsity = jsparse.train.erk(model, 0.9, block_shape=(32, 32))
    assert sparsity["layers/4"] == 0.0
    sparse = sparsify(
        nnx.clone(model),
        format="bcsr",
        sparsity=sparsity,
        block_shape=(32, 32),
        filter=lambda path, layer: sparsity[path_str(path)] > 0,
    )
    assert type(sparse.layers[4]) is nnx.Linear
    # The budget is the known 10% of all kernel values, the head counted as dense.
    sizes = {"layers/0": 64 * 256, "layers/2": 256 * 256, "layers/4": 256 * 10}
    kept = sum((1 - s) * sizes[k] for k, s in sparsity.items())
    assert kept == pytest.approx(0.1 * sum(sizes.values()))
    x = jax.random.normal(jax.random.key(6), (3, 64))
    assert sparse(x).shape == (3, 10)


def test_erk_counts_linear_general_flattened_and_stacks_as_repeated_layers():
    att = attention()
    s = jsparse.train.erk(att, 0.5)
    assert sorted(s) == ["key", "out", "query", "value"]
    # Four 32x32 kernels: the same density each, 50% overall (a known value).
    assert all(v == pytest.approx(0.5) for v in s.values())

    model = ScannedMLP(nnx.Rngs(0))
    stacked = jsparse.train.erk(model, 0.8)
    separate = jsparse.train.erk_sparsities(
        {**{f"b{i}": (WIDTH, WIDTH) for i in range(L)}, "head": (WIDTH, 4)}, 0.8
    )
    assert stacked == pytest.approx({"blocks": separate["b0"], "head": separate["head"]})


# ------------------------------------------------------------------ the quickstart
def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_time_is_defined_for_few_steps_and_skips_compilation():
    quickstart = load_quickstart()
    assert quickstart.step_time([9.0]) == 9.0
    assert quickstart.step_time([9.0, 1.0]) == 1.0
    assert quickstart.step_time([9.0, 1.0, 3.0, 2.0, 2.0]) == 2.0
    assert quickstart.step_time([9.0] * 5 + [1.0] * 20) == 1.0


def test_quickstart_hidden_256_few_steps_and_rigl_alone(capsys):
    pytest.importorskip("sklearn")
    quickstart = load_quickstart()
    rows = quickstart.main(
        ["--steps", "5", "--hidden", "256", "--methods", "dense", "rigl", "--plot", ""]
    )
    assert all(math.isfinite(r["step_time_s"]) for r in rows)
    table = capsys.readouterr().out
    assert "nan" not in table and "n/a" not in table
    rows = quickstart.main(["--steps", "5", "--hidden", "256", "--methods", "rigl", "--plot", ""])
    table = capsys.readouterr().out
    assert math.isfinite(rows[0]["step_time_s"])
    line = next(line for line in table.splitlines() if line.startswith("rigl"))
    assert line.count("n/a") == 2 and "1.00x" not in line
