"""jsparse.train: schedules, ERK, pruning, SET/RigL on the real BCSR representation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jsparse
from jsparse.nn import SparseLinear, sparse_layers, sparsify
from jsparse.train import (
    SET,
    SRSTE,
    GradualMagnitudePruning,
    RigL,
    ValueRemap,
    cosine_drop_fraction,
    cubic_sparsity,
    erk,
    erk_sparsities,
    grow_and_drop,
    magnitude_prune,
    remap_opt_state,
)

from oracle import np_init


class MLP(nnx.Module):
    def __init__(self, rngs, din=16, hidden=64, dout=4):
        self.l1 = nnx.Linear(din, hidden, kernel_init=np_init, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, kernel_init=np_init, rngs=rngs)
        self.l3 = nnx.Linear(hidden, dout, kernel_init=np_init, rngs=rngs)

    def __call__(self, x):
        return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


def normal(shape, seed=0):
    # NumPy draws: jax.random would compile a sampler per shape.
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def synthetic_task(n=256, din=16, seed=0):
    x = normal((n, din), seed)
    y = (x[:, 0] > 0).astype(jnp.int32) + 2 * (x[:, 1] + x[:, 2] > 0).astype(jnp.int32)
    return x, y


def check_pattern(layer: SparseLinear, nse: int):
    """Stored count unchanged, the BCSR valid and in canonical sorted order."""
    w = layer.kernel
    assert w.nse == nse and layer.kernel_data[...].shape[0] == nse
    w.validate()  # indptr consistent, block-columns strictly increasing in each row
    nbc = layer.out_features // layer.block_shape[1]
    pos = np.asarray(w.row_ids) * nbc + np.asarray(w.indices)
    assert np.all(np.diff(pos) > 0)


# ------------------------------------------------------------------ schedules
def test_cubic_schedule_documented_values():
    s = cubic_sparsity(0.9, begin_step=100, end_step=300, initial_sparsity=0.1)
    gmp = GradualMagnitudePruning(
        0.9, begin_step=100, end_step=300, initial_sparsity=0.1, frequency=50
    )
    assert float(s(0)) == pytest.approx(0.1)
    assert float(s(100)) == pytest.approx(0.1)
    assert float(s(200)) == pytest.approx(0.9 + (0.1 - 0.9) / 8)  # (1 - 1/2)^3
    assert float(s(300)) == pytest.approx(0.9)
    assert float(s(10_000)) == pytest.approx(0.9)
    assert float(jax.jit(s)(jnp.asarray(200))) == pytest.approx(0.8)
    assert [t for t in range(400) if gmp.is_update_step(t)] == [100, 150, 200, 250, 300]
    values = [float(s(t)) for t in range(100, 301, 10)]
    assert values == sorted(values)


def test_cosine_drop_fraction_documented_values():
    f = cosine_drop_fraction(0.3, end_step=750)
    rigl = RigL(total_steps=1000, delta_t=100)  # end_step 750
    assert float(f(0)) == pytest.approx(0.3)
    assert float(f(375)) == pytest.approx(0.15)
    assert float(f(750)) == pytest.approx(0.0, abs=1e-7)
    assert float(f(1000)) == pytest.approx(0.0, abs=1e-7)
    assert [t for t in range(1001) if rigl.is_update_step(t)] == [100, 200, 300, 400, 500, 600, 700]


def test_rigl_defaults_are_the_papers():
    rigl = RigL(total_steps=1000)
    assert (rigl.delta_t, rigl.drop_fraction, rigl.stop_fraction) == (100, 0.3, 0.75)
    assert rigl.end_step == 750
    assert float(rigl.schedule(0)) == pytest.approx(0.3)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: cubic_sparsity(0.9, begin_step=10, end_step=10), "must come after"),
        (lambda: cubic_sparsity(0.9, begin_step=10, end_step=5), "must come after"),
        (lambda: cubic_sparsity(1.0, begin_step=0, end_step=5), r"in \[0, 1\)"),
        (
            lambda: cubic_sparsity(0.5, begin_step=0, end_step=5, initial_sparsity=0.7),
            "exceed",
        ),
        (
            lambda: GradualMagnitudePruning(0.5, begin_step=0, end_step=5, frequency=0),
            "frequency",
        ),
        (lambda: cosine_drop_fraction(1.5, end_step=10), r"in \[0, 1\]"),
        (lambda: cosine_drop_fraction(0.3, end_step=0), "must come after"),
        (lambda: RigL(total_steps=0), "total_steps"),
        (lambda: SET(total_steps=10, stop_fraction=0.0), "stop_fraction"),
    ],
)
def test_schedule_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------ ERK
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.99])
def test_erk_budget_sums_to_target(sparsity):
    shapes = {"in": (64, 2048), "hidden": (2048, 2048), "mid": (2048, 512), "out": (512, 10)}
    out = erk_sparsities(shapes, sparsity)
    sizes = {k: math.prod(v) for k, v in shapes.items()}
    kept = sum((1 - out[k]) * sizes[k] for k in shapes)
    assert kept == pytest.approx((1 - sparsity) * sum(sizes.values()), rel=1e-9)
    assert all(0.0 <= s < 1.0 for s in out.values())


def test_erk_dense_overflow_and_proportions():
    shapes = {"in": (64, 2048), "hidden": (2048, 2048), "out": (2048, 10)}
    out = erk_sparsities(shapes, 0.9)
    assert out["in"] == 0.0 and out["out"] == 0.0  # would exceed density 1: made dense
    assert out["hidden"] == pytest.approx(1 - (0.1 * 4_345_856 - 131_072 - 20_480) / 2048**2)
    # Without overflow, densities are proportional to (n_in + n_out) / (n_in * n_out).
    two = erk_sparsities({"a": (256, 256), "b": (512, 512)}, 0.9)
    ratio = (1 - two["a"]) / (1 - two["b"])
    assert ratio == pytest.approx((512 / 256**2) / (1024 / 512**2))
    uniform = erk_sparsities({"a": (256, 256), "b": (512, 512)}, 0.9, power=0.0)
    assert uniform["a"] == pytest.approx(0.9) and uniform["b"] == pytest.approx(0.9)


def test_erk_of_a_model_feeds_sparsify():
    model = MLP(nnx.Rngs(0))
    sparsity = erk(model, 0.8)
    assert set(sparsity) == {"l1", "l2", "l3"}
    model = sparsify(model, format="bcsr", sparsity=sparsity, block_shape=(4, 4))
    total = sum(layer.in_features * layer.out_features for _, layer in sparse_layers(model))
    kept = sum(layer.nse for _, layer in sparse_layers(model))
    assert kept * 16 / total == pytest.approx(0.2, abs=5e-3)


def test_erk_bad_input():
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        erk_sparsities({"a": (4, 4)}, 1.0)
    with pytest.raises(ValueError, match="no layer shapes"):
        erk_sparsities({}, 0.5)
    with pytest.raises(ValueError, match="are not layers"):
        erk_sparsities({"a": (4, 4)}, 0.5, dense=["b"])
    with pytest.raises(ValueError, match="exceed the budget"):
        erk_sparsities({"a": (100, 100), "b": (10, 10)}, 0.5, dense=["a"])
    with pytest.raises(ValueError, match="selects no nnx.Linear"):
        erk(MLP(nnx.Rngs(0)), 0.5, filter=lambda *_: False)


# ------------------------------------------------------------------ drop and grow
@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_grow_and_drop_invariants(k):
    w = jsparse.BCSR.random(jax.random.key(0), (32, 48), density=0.25, block_shape=(4, 8))
    nbr, nbc = 8, 6
    scores = jnp.asarray(np.random.default_rng(1).uniform(size=nbr * nbc), jnp.float32)
    new, remap = jax.jit(grow_and_drop, static_argnames=("k_max",))(
        w, k=k, k_max=6, grow_scores=scores
    )
    data = new.data
    new = jsparse.BCSR(data, new.indices, new.indptr, shape=w.shape)  # validates: sorted, unique
    assert new.nse == w.nse
    old_pos = set((np.asarray(w.row_ids) * nbc + np.asarray(w.indices)).tolist())
    new_pos = np.asarray(new.row_ids) * nbc + np.asarray(new.indices)
    assert np.all(np.diff(new_pos) > 0)
    reset = np.asarray(remap.reset)
    assert reset.sum() == k
    np.testing.assert_array_equal(np.asarray(data)[reset], 0.0)  # grown blocks start at zero
    # Kept blocks keep their values at their positions; the k smallest were dropped.
    norms = np.sum(np.asarray(w.data) ** 2, axis=(1, 2))
    old_pos_list = (np.asarray(w.row_ids) * nbc + np.asarray(w.indices)).tolist()
    dropped = {old_pos_list[i] for i in np.argsort(norms, kind="stable")[:k]}
    old_values = dict(zip(old_pos_list, np.asarray(w.data), strict=True))
    for p, block, r in zip(new_pos.tolist(), np.asarray(data), reset, strict=True):
        if not r:
            assert p in old_pos and p not in dropped
            np.testing.assert_array_equal(block, old_values[p])
    # The grown positions are the best-scored ones among the positions not kept.
    kept = old_pos - dropped
    free = [p for p in range(nbr * nbc) if p not in kept]
    best = sorted(free, key=lambda p: -float(scores[p]))[:k]
    assert sorted(new_pos[reset].tolist()) == sorted(best)


def test_remap_opt_state_plain_optax():
    params = {"layer": {"kernel_data": jnp.arange(12.0).reshape(3, 2, 2)}, "b": jnp.ones(3)}
    tx = optax.adam(1e-3)
    state = tx.init(params)
    state = jax.tree.map(lambda x: x + 1.0 if x.ndim else x, state)
    remap = ValueRemap(
        source=jnp.array([2, 0, 1]), reset=jnp.array([False, True, False]), old_shape=(3, 2, 2)
    )
    new = remap_opt_state(state, {("layer", "kernel_data"): remap})
    mu = new[0].mu["layer"]["kernel_data"]
    np.testing.assert_array_equal(mu[0], state[0].mu["layer"]["kernel_data"][2])
    np.testing.assert_array_equal(mu[1], 0.0)
    np.testing.assert_array_equal(new[0].nu["b"], state[0].nu["b"])  # same shape, other path
    assert new[0].count == state[0].count


# ------------------------------------------------------------------ SET / RigL
def _sparse_mlp(sparsity=0.75):
    return sparsify(
        MLP(nnx.Rngs(0)),
        format="bcsr",
        sparsity=sparsity,
        block_shape=(8, 8),
        filter=lambda path, layer: path == ("l2",),
    )


def test_rigl_grows_where_the_dense_gradient_is_largest_and_resets_moments():
    model = _sparse_mlp()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, y = synthetic_task()
    for _ in range(3):
        train_step(model, optimizer, x, y)
    layer = model.l2
    nse = layer.nse
    mu = optimizer.opt_state[0].mu["l2"]["kernel_data"]
    nbc = 64 // 8
    old_pos = np.asarray(layer.kernel.row_ids) * nbc + np.asarray(layer.kernel.indices)
    old_mu = dict(zip(old_pos.tolist(), np.asarray(mu[...]), strict=True))
    norms = np.sum(np.asarray(layer.kernel_data[...]) ** 2, axis=(1, 2))
    grad = jsparse.train.dense_gradients(model, [layer], loss_fn, x, y)[0]
    rigl = RigL(total_steps=1000)
    replaced = nnx.jit(rigl.update, static_argnums=(3,))(
        model, optimizer, jnp.asarray(100), loss_fn, x, y
    )
    k = int(replaced["l2"])
    assert k == math.floor(float(rigl.schedule(100)) * nse) > 0
    dropped = set(old_pos[np.argsort(norms, kind="stable")[:k]].tolist())
    survivors = set(old_pos.tolist()) - dropped
    check_pattern(layer, nse)
    new_pos = np.asarray(layer.kernel.row_ids) * nbc + np.asarray(layer.kernel.indices)
    grown = [i for i, p in enumerate(new_pos.tolist()) if p not in survivors]
    assert len(grown) == k  # a just-dropped block may come back (at zero), as in RigL
    data = np.asarray(layer.kernel_data[...])
    new_mu = np.asarray(optimizer.opt_state[0].mu["l2"]["kernel_data"][...])
    new_nu = np.asarray(optimizer.opt_state[0].nu["l2"]["kernel_data"][...])
    np.testing.assert_array_equal(data[grown], 0.0)
    np.testing.assert_array_equal(new_mu[grown], 0.0)
    np.testing.assert_array_equal(new_nu[grown], 0.0)
    for i, p in enumerate(new_pos.tolist()):  # survivors carry their moments along
        if p in survivors:
            np.testing.assert_array_equal(new_mu[i], old_mu[p])
    # Grown positions score at least as high (block norm of the dense gradient) as any
    # free position left unused.
    block_scores = np.sum(np.asarray(grad).reshape(8, 8, 8, 8) ** 2, axis=(1, 3)).ravel()
    unused = sorted(set(range(64)) - set(new_pos.tolist()))
    assert unused
    assert min(block_scores[new_pos[grown]]) >= max(block_scores[unused]) - 1e-12


@pytest.mark.parametrize("algorithm", ["set", "rigl"])
def test_short_training_run_reduces_loss_and_keeps_exact_sparsity(algorithm):
    model = _sparse_mlp()
    nse = model.l2.nse
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, y = synthetic_task()
    total = 120
    dst = (SET if algorithm == "set" else RigL)(total_steps=total, delta_t=10)
    traces = []

    @nnx.jit
    def update(model, optimizer, step, x, y):
        traces.append(None)
        if algorithm == "set":
            return dst.update(model, optimizer, step)
        return dst.update(model, optimizer, step, loss_fn, x, y)

    first = float(loss_fn(model, x, y))
    before = np.asarray(model.l2.kernel_indices[...]).copy()
    updates = 0
    for step in range(1, total + 1):
        train_step(model, optimizer, x, y)
        if dst.is_update_step(step):
            update(model, optimizer, jnp.asarray(step), x, y)
            updates += 1
            check_pattern(model.l2, nse)
    assert updates == 8 and len(traces) == 1  # the pattern moved without recompiling
    assert not np.array_equal(before, np.asarray(model.l2.kernel_indices[...]))
    assert float(loss_fn(model, x, y)) < 0.5 * first
    assert model.l2.density == pytest.approx(0.25)
    assert np.mean(np.asarray(model.l2.dense_kernel()) != 0) <= 0.25


def test_dst_skips_dense_layers_and_honours_filter():
    model = sparsify(
        MLP(nnx.Rngs(0)),
        format="bcsr",
        sparsity={"l1": 0.0, "l2": 0.5, "l3": 0.5},
        block_shape=(4, 4),
    )
    assert [p for p, _ in SET(total_steps=10).layers(model)] == [("l2",), ("l3",)]
    only = SET(total_steps=10, filter=lambda path, layer: path == ("l3",))
    assert [p for p, _ in only.layers(model)] == [("l3",)]


# ------------------------------------------------------------------ pruning
def test_one_shot_magnitude_pruning_layer_and_global():
    model = magnitude_prune(MLP(nnx.Rngs(0)), 0.75, block_shape=(4, 4))
    for _, layer in sparse_layers(model):
        assert layer.density == pytest.approx(0.25)
    model = MLP(nnx.Rngs(0))
    kernels = {name: np.asarray(getattr(model, name).kernel[...]) for name in ("l1", "l2", "l3")}
    model = magnitude_prune(model, 0.75, block_shape=(4, 4), scope="global")
    layers = dict(sparse_layers(model))
    total = sum(k.size for k in kernels.values())
    kept = sum(layer.nse * 16 for layer in layers.values())
    assert kept == pytest.approx(0.25 * total, abs=32)
    # One global threshold: every kept block outweighs every pruned block.
    kept_min, pruned_max = np.inf, 0.0
    for (path,), layer in layers.items():
        dense = np.asarray(layer.dense_kernel())
        norms = np.sqrt(
            (kernels[path].reshape(dense.shape[0] // 4, 4, -1, 4) ** 2).sum(axis=(1, 3))
        )
        stored = np.abs(dense).reshape(norms.shape[0], 4, -1, 4).sum(axis=(1, 3)) > 0
        if layer.nse > 1:  # a layer keeps at least one block, whatever its norm
            kept_min = min(kept_min, norms[stored].min())
        pruned_max = max(pruned_max, norms[~stored].max(initial=0.0))
    assert kept_min >= pruned_max
    with pytest.raises(ValueError, match="scope"):
        magnitude_prune(MLP(nnx.Rngs(0)), 0.5, scope="row")


def test_gradual_magnitude_pruning_follows_the_cubic_schedule():
    model = sparsify(
        MLP(nnx.Rngs(0)),
        format="bcsr",
        sparsity=0.0,
        block_shape=(8, 8),
        filter=lambda path, layer: path == ("l2",),
    )
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    gmp = GradualMagnitudePruning(0.9, begin_step=0, end_step=40, frequency=20)
    schedule = gmp.schedule
    x, y = synthetic_task()
    first = float(loss_fn(model, x, y))
    events = []
    for step in range(1, 61):
        train_step(model, optimizer, x, y)
        if gmp.update(model, optimizer, step):
            events.append(step)
            layer = model.l2
            assert layer.nse == round((1 - float(schedule(step))) * 64)
            layer.kernel.validate()
            mu = optimizer.opt_state[0].mu["l2"]["kernel_data"]
            assert mu[...].shape == layer.kernel_data[...].shape
    assert events == [20, 40]
    assert model.l2.nse == round(0.1 * 64)
    assert float(loss_fn(model, x, y)) < first


def layer_name(model, layer):
    return next(name for name in ("l1", "l2", "l3") if getattr(model, name) is layer)


# ------------------------------------------------------------------ SR-STE
def test_sr_ste_gradient_is_ste_plus_decay_on_pruned():
    from jsparse.train.sr_ste import sr_ste_masked

    w = normal((8, 3))
    mask = jsparse.nm_mask(w, 2, 4, axis=0)
    np.testing.assert_array_equal(sr_ste_masked(w, 2, 4, 0.5), w * mask)
    g = jax.grad(lambda w: jnp.sum(3.0 * sr_ste_masked(w, 2, 4, 0.5)))(w)
    np.testing.assert_allclose(g, 3.0 + 0.5 * np.where(mask, 0.0, w), rtol=1e-6)


def test_sr_ste_training_ends_in_nm_linear():
    from jsparse.nn import NMLinear
    from jsparse.train.sr_ste import SRSTELinear

    sr_ste = SRSTE(n=2, m=4)
    assert sr_ste.decay == 2e-4
    model = sr_ste.apply(MLP(nnx.Rngs(0)))
    assert all(isinstance(getattr(model, n), SRSTELinear) for n in ("l1", "l2", "l3"))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    assert optimizer.opt_state[0].mu["l2"]["kernel"][...].shape == (64, 64)  # dense weights kept
    x, y = synthetic_task()
    first = float(loss_fn(model, x, y))
    for _ in range(30):
        train_step(model, optimizer, x, y)
    trained = float(loss_fn(model, x, y))
    assert trained < 0.5 * first
    model = sr_ste.finalize(model)
    assert all(isinstance(getattr(model, n), NMLinear) for n in ("l1", "l2", "l3"))
    assert float(loss_fn(model, x, y)) == pytest.approx(trained, rel=1e-4, abs=1e-5)
    groups = np.asarray(model.l2.dense_kernel() != 0).reshape(16, 4, 64).sum(axis=1)
    assert groups.max() <= 2


def test_sr_ste_bad_input():
    with pytest.raises(ValueError, match="1 <= n < m"):
        SRSTE(n=4, m=4)
    with pytest.raises(ValueError, match="decay"):
        SRSTE(decay=-1.0)
    with pytest.raises(ValueError, match="does not divide in_features"):
        SRSTE(n=2, m=32).apply(MLP(nnx.Rngs(0)))
    with pytest.warns(UserWarning, match="selects no nnx.Linear"):
        SRSTE(filter=lambda *_: False).apply(MLP(nnx.Rngs(0)))
