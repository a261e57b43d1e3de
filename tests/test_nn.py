"""jsparse.nn: sparse layers against their dense equivalents, and model surgery."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jsparse
from jsparse.nn import (
    LowRankSparseLinear,
    MonarchLinear,
    NMLinear,
    SparseLinear,
    SparsityPattern,
    densify,
    sparsify,
)

from oracle import assert_close, np_init


class MLP(nnx.Module):
    def __init__(self, rngs, din=16, hidden=32, dout=8):
        kw = dict(kernel_init=np_init, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(din, hidden, **kw), nnx.Linear(hidden, hidden, **kw)])
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, dout, use_bias=False, **kw)

    def __call__(self, x):
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
        return self.head(self.norm(x))


def _x(shape, seed=1):
    # NumPy draws: jax.random would compile a sampler per shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ------------------------------------------------------------------ SparseLinear
def test_full_pattern_equals_nnx_linear():
    """Consistency: a SparseLinear storing every block is nnx.Linear with that kernel."""
    linear = nnx.Linear(24, 16, kernel_init=np_init, rngs=nnx.Rngs(0))
    linear.bias[...] = _x((16,), 3)
    sparse = SparseLinear.from_linear(linear, sparsity=0.0, block_shape=(4, 8))
    np.testing.assert_array_equal(sparse.dense_kernel(), linear.kernel[...])
    x = _x((5, 24))
    assert_close(sparse(x), linear(x), jnp.float32, k=24)

    def loss(layer, x):
        return jnp.sum(jnp.sin(layer(x)))

    g_sparse = nnx.grad(loss)(sparse, x)
    g_dense = nnx.grad(loss)(linear, x)
    dense_as_bcsr = jsparse.BCSR.fromdense(g_dense["kernel"][...], block_shape=(4, 8), nse=12)
    assert_close(g_sparse["kernel_data"][...], dense_as_bcsr.data, jnp.float32, k=5)
    assert_close(g_sparse["bias"][...], g_dense["bias"][...], jnp.float32, k=5)
    gx_sparse = jax.grad(lambda x: loss(sparse, x))(x)
    gx_dense = jax.grad(lambda x: loss(linear, x))(x)
    assert_close(gx_sparse, gx_dense, jnp.float32, k=16)


@pytest.mark.parametrize(
    "block_shape, use_jit", [((1, 1), True), ((4, 8), False), ((4, 8), True), ((8, 4), True)]
)
def test_sparse_linear_matches_dense_oracle(block_shape, use_jit):
    layer = SparseLinear(
        32, 24, sparsity=0.7, block_shape=block_shape, kernel_init=np_init, rngs=nnx.Rngs(0)
    )
    layer.bias[...] = _x((24,), 2)
    x = _x((3, 5, 32))  # leading batch axes, like nnx.Linear
    kernel = layer.dense_kernel()
    assert kernel.shape == (32, 24)
    assert np.mean(np.asarray(kernel) != 0) == pytest.approx(layer.density, abs=1e-6)

    def loss(layer, x):
        return jnp.sum(jnp.tanh(layer(x)))

    grad = nnx.grad(loss, argnums=(0, 1))
    fwd = nnx.jit(lambda layer, x: layer(x)) if use_jit else (lambda layer, x: layer(x))
    grad = nnx.jit(grad) if use_jit else grad
    assert_close(fwd(layer, x), x @ kernel + layer.bias[...], jnp.float32, k=32)

    (g_layer, g_x) = grad(layer, x)

    def dense_loss(w, b, x):
        return jnp.sum(jnp.tanh(x @ w + b))

    gw, gb, gx = jax.grad(dense_loss, argnums=(0, 1, 2))(kernel, layer.bias[...], x)
    w = layer.kernel
    # The dense gradient gathered at the stored blocks.
    gathered = jax.vmap(
        lambda r, c: jax.lax.dynamic_slice(
            gw, (r * block_shape[0], c * block_shape[1]), block_shape
        )
    )(w.row_ids, w.indices)
    assert_close(g_layer["kernel_data"][...], gathered, jnp.float32, k=15)
    assert_close(g_layer["bias"][...], gb, jnp.float32, k=15)
    assert_close(g_x, gx, jnp.float32, k=24)
    assert "kernel_indices" not in g_layer and "kernel_indptr" not in g_layer


def test_dtype_and_param_dtype():
    layer = SparseLinear(
        16,
        16,
        sparsity=0.5,
        block_shape=(8, 8),
        param_dtype=jnp.bfloat16,
        kernel_init=np_init,
        rngs=nnx.Rngs(0),
    )
    assert layer.kernel_data[...].dtype == jnp.bfloat16
    assert layer(jnp.ones((2, 16), jnp.bfloat16)).dtype == jnp.bfloat16
    assert layer(jnp.ones((2, 16), jnp.float32)).dtype == jnp.float32
    layer32 = SparseLinear(
        16,
        16,
        sparsity=0.5,
        block_shape=(8, 8),
        dtype=jnp.float16,
        kernel_init=np_init,
        rngs=nnx.Rngs(0),
    )
    assert layer32(jnp.ones((2, 16))).dtype == jnp.float16


def test_layer_state_is_values_and_pattern():
    layer = SparseLinear(
        64, 32, sparsity=0.75, block_shape=(8, 8), kernel_init=np_init, rngs=nnx.Rngs(0)
    )
    assert layer.nse == 8 and layer.block_shape == (8, 8)
    assert layer.density == pytest.approx(0.25)
    params = nnx.state(layer, nnx.Param)
    assert set(params) == {"kernel_data", "bias"}
    pattern = nnx.state(layer, SparsityPattern)
    assert set(pattern) == {
        "kernel_indices",
        "kernel_indptr",
        "kernel_row_ids",
        "kernel_col_ptr",
        "kernel_col_order",
    }
    assert all(jnp.issubdtype(v[...].dtype, jnp.integer) for v in pattern.values())
    layer.kernel.validate()
    # Neither a Param nor trainable.
    assert not isinstance(layer.kernel_indices, nnx.Param)


def test_optimizer_state_is_sized_by_stored_values():
    model = sparsify(
        MLP(nnx.Rngs(0)),
        format="bcsr",
        sparsity=0.75,
        block_shape=(8, 8),
        filter=lambda path, layer: path == ("layers", 1),
    )
    layer = model.layers[1]
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    leaves = jax.tree.leaves(nnx.state(optimizer.opt_state))
    assert all(jnp.issubdtype(x.dtype, jnp.inexact) or x.ndim == 0 for x in leaves)
    mu = optimizer.opt_state[0].mu["layers"][1]
    assert set(mu) == {"kernel_data", "bias"}
    assert mu["kernel_data"][...].shape == (layer.nse, 8, 8)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_moments = sum(x.size for x in leaves if x.ndim > 0)
    assert n_moments == 2 * n_params  # Adam: mu and nu, nothing dense-sized


def test_jit_does_not_recompile_across_steps_and_pattern_changes():
    model = sparsify(
        MLP(nnx.Rngs(0)),
        format="bcsr",
        sparsity=0.5,
        block_shape=(8, 8),
        filter=lambda path, layer: path == ("layers", 1),
    )
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def step(model, optimizer, x):
        traces.append(None)
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    set_ = jsparse.train.SET(total_steps=100, delta_t=1, drop_fraction=0.5)
    update = nnx.jit(set_.update)
    x = _x((4, 16))
    before = np.asarray(model.layers[1].kernel_indices[...])
    for t in range(1, 6):
        step(model, optimizer, x)
        update(model, optimizer, jnp.asarray(t))
    assert len(traces) == 1
    assert not np.array_equal(before, np.asarray(model.layers[1].kernel_indices[...]))


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        SparseLinear(16, 16, sparsity=sparsity, rngs=nnx.Rngs(0))


def test_bad_block_shape():
    with pytest.raises(
        ValueError, match=r"block_shape \(5, 4\) does not divide the shape \(16, 16\)"
    ):
        SparseLinear(16, 16, sparsity=0.5, block_shape=(5, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="must be positive"):
        SparseLinear(16, 16, sparsity=0.5, block_shape=(0, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pattern must be"):
        SparseLinear(16, 16, sparsity=0.5, pattern="dense", rngs=nnx.Rngs(0))


def test_from_kernel_keeps_largest_blocks():
    kernel = jnp.zeros((8, 8)).at[:4, 4:].set(3.0).at[4:, :4].set(-1.0).at[4:, 4:].set(0.5)
    layer = SparseLinear.from_kernel(kernel, sparsity=0.5, block_shape=(4, 4))
    expected = kernel.at[4:, 4:].set(0.0)
    np.testing.assert_array_equal(layer.dense_kernel(), expected)
    assert layer.bias is None and not layer.use_bias


# ------------------------------------------------------------------ MonarchLinear
def test_monarch_linear_matches_dense_oracle():
    layer = MonarchLinear(32, 16, nblocks=4, rngs=nnx.Rngs(0))
    x = _x((5, 32))
    kernel = layer.dense_kernel()
    assert_close(layer(x), x @ kernel + layer.bias[...], jnp.float32, k=32)
    g = nnx.grad(lambda layer: jnp.sum(layer(x) ** 2))(layer)
    assert set(g) == {"kernel_left", "kernel_right", "bias"}
    params = sum(v.size for v in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert params < 32 * 16 + 16


def test_monarch_from_linear_is_the_projection():
    linear = nnx.Linear(32, 16, kernel_init=np_init, rngs=nnx.Rngs(0))
    layer = MonarchLinear.from_linear(linear, nblocks=4)
    expected = jsparse.Monarch.fromdense(linear.kernel[...], nblocks=4).todense()
    assert_close(layer.dense_kernel(), expected, jnp.float32, k=16)
    np.testing.assert_array_equal(layer.bias[...], linear.bias[...])


# ------------------------------------------------------------------ surgery
def test_sparsify_then_densify_round_trips_the_function():
    model = MLP(nnx.Rngs(0))
    x = _x((6, 16))
    sparse = sparsify(model, format="bcsr", sparsity=0.5, block_shape=(8, 8))
    assert isinstance(sparse.layers[0], SparseLinear)
    assert isinstance(sparse.head, SparseLinear) and sparse.head.bias is None
    assert isinstance(sparse.norm, nnx.LayerNorm)  # other layers left alone
    y_sparse = sparse(x)
    dense = densify(sparse)
    assert all(type(layer) is nnx.Linear for layer in dense.layers)
    assert dense.head.bias is None
    assert_close(dense(x), y_sparse, jnp.float32, k=32)


def test_sparsify_full_pattern_keeps_the_function_and_biases():
    model = MLP(nnx.Rngs(0))
    for layer in model.layers:
        layer.bias[...] = _x(layer.bias.shape, 5)
    x = _x((6, 16))
    y = model(x)
    biases = [np.asarray(layer.bias[...]) for layer in model.layers]
    sparse = sparsify(model, format="bcsr", sparsity=0.0, block_shape=(8, 8))
    assert_close(sparse(x), y, jnp.float32, k=32)
    for layer, bias in zip(sparse.layers, biases, strict=True):
        np.testing.assert_array_equal(layer.bias[...], bias)


def test_sparsify_filter_and_per_layer_sparsity():
    model = MLP(nnx.Rngs(0))
    sparse = sparsify(
        model,
        format="bcsr",
        filter=lambda path, layer: path[0] == "layers",
        sparsity={"layers/0": 0.5, "layers/1": 0.75},
        block_shape=(4, 4),
    )
    assert sparse.layers[0].density == pytest.approx(0.5)
    assert sparse.layers[1].density == pytest.approx(0.25)
    assert type(sparse.head) is nnx.Linear


def test_sparsify_a_single_layer_and_monarch_format():
    linear = nnx.Linear(16, 32, kernel_init=np_init, rngs=nnx.Rngs(0))
    layer = sparsify(linear, format="monarch", nblocks=4)
    assert isinstance(layer, MonarchLinear)
    back = densify(layer)
    assert type(back) is nnx.Linear
    np.testing.assert_allclose(back.kernel[...], layer.dense_kernel())


def test_surgery_bad_input():
    model = MLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match="format must be one of"):
        sparsify(model, format="csr", sparsity=0.5)
    with pytest.warns(UserWarning, match="selects no nnx.Linear"):
        out = sparsify(model, format="bcsr", sparsity=0.5, filter=lambda path, layer: False)
    assert out is model and type(model.head) is nnx.Linear
    with pytest.raises(KeyError, match="no entry for layer 'layers/1'"):
        sparsify(
            model, format="bcsr", sparsity={"layers/0": 0.5}, filter=lambda p, _: p[0] == "layers"
        )
    with pytest.raises(ValueError, match="does not divide"):
        sparsify(MLP(nnx.Rngs(0)), format="bcsr", sparsity=0.5, block_shape=(3, 3))
    with pytest.warns(UserWarning, match="selects no sparse layer"):
        densify(MLP(nnx.Rngs(0)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        densify(sparsify(MLP(nnx.Rngs(0)), format="bcsr", sparsity=0.5, block_shape=(8, 8)))


# ------------------------------------------------------------------ NMLinear
def test_nm_linear_matches_dense_oracle_and_is_n_of_m_along_inputs():
    layer = NMLinear(32, 16, n=2, m=4, kernel_init=np_init, rngs=nnx.Rngs(0))
    kernel = np.asarray(layer.dense_kernel())
    groups = (kernel.reshape(8, 4, 16) != 0).sum(axis=1)
    assert np.all(groups == 2)
    x = _x((5, 32))
    assert_close(layer(x), x @ kernel + layer.bias[...], jnp.float32, k=32)
    assert set(nnx.state(layer, nnx.Param)) == {"kernel_values", "bias"}
    assert set(nnx.state(layer, SparsityPattern)) == {"kernel_positions"}
    g = nnx.grad(lambda layer: jnp.sum(jnp.sin(layer(x))))(layer)
    gw = jax.grad(lambda w: jnp.sum(jnp.sin(x @ w + layer.bias[...])))(jnp.asarray(kernel))
    expected = jsparse.NM.fromdense(jnp.asarray(kernel), n=2, m=4, axis=0)
    positions = expected.unpacked_positions.reshape(8, 2, 16).astype(jnp.int32)
    gathered = jnp.take_along_axis(gw.reshape(8, 4, 16), positions, axis=1).reshape(16, 16)
    assert_close(g["kernel_values"][...], gathered, jnp.float32, k=5)


def test_nm_linear_from_linear_and_sparsify():
    model = sparsify(MLP(nnx.Rngs(0)), format="nm", n=1, m=4)
    assert isinstance(model.layers[0], NMLinear) and model.layers[0].n == 1
    linear = nnx.Linear(16, 8, kernel_init=np_init, rngs=nnx.Rngs(0))
    layer = NMLinear.from_linear(linear, n=2, m=4)
    np.testing.assert_array_equal(
        layer.dense_kernel(), jsparse.NM.fromdense(linear.kernel[...], n=2, m=4, axis=0).todense()
    )


@pytest.mark.parametrize(
    "n, m, match", [(4, 4, "1 <= n < m"), (0, 4, "1 <= n < m"), (2, 3, "does not divide")]
)
def test_nm_linear_bad_input(n, m, match):
    with pytest.raises(ValueError, match=match):
        NMLinear(16, 8, n=n, m=m, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ LowRankSparseLinear
def test_lowrank_sparse_linear_matches_dense_oracle():
    layer = LowRankSparseLinear(
        32, 16, rank=4, sparsity=0.75, block_shape=(4, 4), kernel_init=np_init, rngs=nnx.Rngs(0)
    )
    layer.kernel_V[...] = _x((4, 16), 7)
    x = _x((5, 32))
    assert_close(layer(x), x @ layer.dense_kernel() + layer.bias[...], jnp.float32, k=32)
    assert set(nnx.state(layer, nnx.Param)) == {"kernel_U", "kernel_V", "kernel_S_data", "bias"}
    g = nnx.grad(lambda layer: jnp.sum(layer(x) ** 2))(layer)
    assert g["kernel_S_data"][...].shape == (8, 4, 4)


def test_lowrank_sparse_linear_from_linear_and_errors():
    linear = nnx.Linear(32, 16, kernel_init=np_init, rngs=nnx.Rngs(0))
    layer = sparsify(linear, format="lowrank", rank=4, sparsity=0.5, block_shape=(4, 4))
    assert isinstance(layer, LowRankSparseLinear) and layer.rank == 4
    err = jnp.linalg.norm(layer.dense_kernel() - linear.kernel[...]) / jnp.linalg.norm(
        linear.kernel[...]
    )
    assert float(err) < 0.6
    with pytest.raises(ValueError, match="rank must be in"):
        LowRankSparseLinear(8, 4, rank=5, sparsity=0.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        LowRankSparseLinear(8, 4, rank=1, sparsity=1.0, rngs=nnx.Rngs(0))
