"""jsparse.checkpoint: orbax round trips of sparse models and optimizer state (stored
values and index arrays only), abstract restore, a pattern that changed size between
saves, another mesh, and a writer killed half-way."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jsparse
from jsparse import checkpoint

LAYERS = {
    "bcsr": lambda rngs: jsparse.nn.BCSRLinear(
        64, 96, sparsity=0.9, block_shape=(16, 16), rngs=rngs
    ),
    "csr": lambda rngs: jsparse.nn.BCSRLinear(64, 96, sparsity=0.9, rngs=rngs),
    "nm": lambda rngs: jsparse.nn.NMLinear(64, 96, n=2, m=4, rngs=rngs),
    "monarch": lambda rngs: jsparse.nn.MonarchLinear(64, 96, nblocks=4, rngs=rngs),
    "lowrank": lambda rngs: jsparse.nn.LowRankSparseLinear(
        64, 96, rank=4, sparsity=0.95, rngs=rngs
    ),
}


class MLP(nnx.Module):
    def __init__(self, kind, rngs):
        self.sparse = LAYERS[kind](rngs)
        self.head = nnx.Linear(96, 8, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.sparse(x)))


def _x(rows=4, features=64):
    return jax.random.normal(jax.random.key(7), (rows, features))


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_round_trip_into_abstract_model(tmp_path, kind):
    model = MLP(kind, nnx.Rngs(0))
    checkpoint.save(tmp_path / "ckpt", model)
    abstract = nnx.eval_shape(lambda: MLP(kind, nnx.Rngs(1)))
    restored = checkpoint.restore(tmp_path / "ckpt", abstract)
    np.testing.assert_array_equal(restored(_x()), model(_x()))
    # Only the stored values and index arrays are written (at this size orbax's own
    # metadata is a good part of the bytes; the next test measures the ratio).
    disk, dense = checkpoint.nbytes_on_disk(tmp_path / "ckpt"), checkpoint.dense_nbytes(model)
    assert disk < dense, (disk, dense)


def test_bytes_on_disk_follow_stored_values(tmp_path):
    """A 90% block-sparse 512x512 layer takes about a tenth of the dense bytes."""
    sparse = jsparse.nn.BCSRLinear(
        512, 512, sparsity=0.9, block_shape=(32, 32), use_bias=False, rngs=nnx.Rngs(0)
    )
    dense = nnx.Linear(512, 512, use_bias=False, rngs=nnx.Rngs(0))
    checkpoint.save(tmp_path / "sparse", sparse)
    checkpoint.save(tmp_path / "dense", dense)
    ratio = checkpoint.nbytes_on_disk(tmp_path / "sparse") / checkpoint.nbytes_on_disk(
        tmp_path / "dense"
    )
    assert 0.08 < ratio < 0.2, ratio
    assert checkpoint.dense_nbytes(sparse) == 512 * 512 * 4


def test_optimizer_state_round_trip(tmp_path):
    def make(seed):
        model = MLP("bcsr", nnx.Rngs(seed))
        tx = jsparse.train.values_only(optax.adam(1e-2))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    def loss_fn(model, x):
        return jnp.sum(model(x) ** 2)

    @nnx.jit
    def step(model, optimizer, x):
        optimizer.update(model, nnx.grad(loss_fn)(model, x))

    model, optimizer = make(0)
    step(model, optimizer, _x())
    checkpoint.save(tmp_path / "ckpt", (model, optimizer))
    r_model, r_optimizer = checkpoint.restore(tmp_path / "ckpt", nnx.eval_shape(lambda: make(1)))
    # The Adam moments are sized by the stored values, and come back equal.
    moments = jax.tree.leaves(nnx.state(optimizer, nnx.optimizer.OptState))
    r_moments = jax.tree.leaves(nnx.state(r_optimizer, nnx.optimizer.OptState))
    assert sum(m.size for m in moments) < 3 * sum(
        p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param))
    )
    for a, b in zip(moments, r_moments, strict=True):
        np.testing.assert_array_equal(a, b)
    step(model, optimizer, _x())
    step(r_model, r_optimizer, _x())
    np.testing.assert_array_equal(r_model(_x()), model(_x()))


def test_pattern_change_between_saves(tmp_path):
    """Gradual magnitude pruning drops blocks from storage: a checkpoint taken after it
    restores into a model built at the original size; one taken before restores too."""
    model = MLP("bcsr", nnx.Rngs(0))
    model.sparse = jsparse.nn.BCSRLinear(
        64, 96, sparsity=0.0, block_shape=(16, 16), rngs=nnx.Rngs(0)
    )
    checkpoint.save(tmp_path / "1", model)
    before = model(_x())
    gmp = jsparse.train.GradualMagnitudePruning(0.75, begin_step=0, end_step=1, frequency=1)
    gmp.update(model, None, 1)
    assert model.sparse.kernel.nse == 6
    checkpoint.save(tmp_path / "2", model)
    after = model(_x())

    def abstract():
        m = MLP("bcsr", nnx.Rngs(1))
        m.sparse = jsparse.nn.BCSRLinear(
            64, 96, sparsity=0.0, block_shape=(16, 16), rngs=nnx.Rngs(1)
        )
        return m

    r2 = checkpoint.restore(tmp_path / "2", nnx.eval_shape(abstract))
    assert r2.sparse.kernel.nse == 6
    np.testing.assert_array_equal(r2(_x()), after)
    r1 = checkpoint.restore(tmp_path / "1", nnx.eval_shape(abstract))
    assert r1.sparse.kernel.nse == 24
    np.testing.assert_array_equal(r1(_x()), before)


def test_same_size_pattern_change_restores_the_new_pattern(tmp_path):
    """RigL-style: same number of blocks, other positions."""
    model = MLP("bcsr", nnx.Rngs(0))
    checkpoint.save(tmp_path / "1", model)
    w = model.sparse.kernel
    dense = np.asarray(w.todense())
    moved = np.zeros_like(dense)
    moved[::-1] = dense  # the same blocks, other block-rows
    model.sparse.set_kernel(jsparse.BCSR.fromdense(moved, block_shape=(16, 16)))
    assert not np.array_equal(model.sparse.kernel_indices[...], w.indices)
    checkpoint.save(tmp_path / "2", model)
    restored = checkpoint.restore(tmp_path / "2", MLP("bcsr", nnx.Rngs(3)))
    np.testing.assert_array_equal(
        restored.sparse.kernel_indices[...], model.sparse.kernel_indices[...]
    )
    np.testing.assert_array_equal(restored(_x()), model(_x()))


def test_restore_casts_values_and_names_what_does_not_fit(tmp_path):
    model = MLP("bcsr", nnx.Rngs(0))
    checkpoint.save(tmp_path / "ckpt", model)
    half = MLP("bcsr", nnx.Rngs(1))
    half.head = nnx.Linear(96, 8, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    restored = checkpoint.restore(tmp_path / "ckpt", half)
    assert restored.head.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        restored.head.kernel[...], model.head.kernel[...].astype(jnp.bfloat16)
    )
    extra = MLP("bcsr", nnx.Rngs(0))
    extra.more = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no value for 'more/"):
        checkpoint.restore(tmp_path / "ckpt", extra)
    with pytest.raises(ValueError, match="no value for 'sparse/kernel_"):
        checkpoint.restore(tmp_path / "ckpt", MLP("nm", nnx.Rngs(0)))
    checkpoint.save(tmp_path / "nm", MLP("nm", nnx.Rngs(0)))
    other_positions = MLP("nm", nnx.Rngs(0))
    other_positions.sparse.kernel_positions = jsparse.nn.SparsityPattern(
        other_positions.sparse.kernel_positions[...].astype(jnp.int32)
    )
    with pytest.raises(ValueError, match=r"'sparse/kernel_positions/value'.*uint8.*int32"):
        checkpoint.restore(tmp_path / "nm", other_positions)


def test_restore_onto_another_mesh(tmp_path):
    """Saved with the values sharded over a (2, 4) mesh, restored onto (8,): each leaf
    takes the target's sharding, and the outputs are bit-identical."""
    assert jax.device_count() >= 8, "tests/conftest.py asks for 8 host devices"
    devices = np.array(jax.devices()[:8])
    mesh_a = Mesh(devices.reshape(2, 4), ("data", "model"))
    mesh_b = Mesh(devices, ("model",))

    def build(seed):
        return jsparse.nn.BCSRLinear(
            64,
            128,
            sparsity=0.75,
            block_shape=(16, 16),
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model")),
            rngs=nnx.Rngs(seed),
        )

    with jax.set_mesh(mesh_a):  # flax creates annotated variables sharded
        layer = build(0)
    assert layer.kernel_data[...].sharding.spec == P(None, None, "model")
    checkpoint.save(tmp_path / "ckpt", layer)
    with jax.set_mesh(mesh_b):
        abstract = nnx.eval_shape(lambda: build(1))
        restored = checkpoint.restore(tmp_path / "ckpt", abstract)
    with pytest.raises(ValueError, match="abstract mesh"):
        checkpoint.restore(tmp_path / "ckpt", abstract)
    data = restored.kernel_data[...]
    assert data.sharding.mesh.shape == mesh_b.shape
    assert data.sharding.spec == P(None, None, "model")
    np.testing.assert_array_equal(np.asarray(data), np.asarray(layer.kernel_data[...]))
    x = _x()
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(layer(x)))


KILLED_WRITER = textwrap.dedent(
    """
    import os, pathlib, signal, sys, threading, time
    import numpy as np
    from flax import nnx
    import jsparse
    from jsparse import checkpoint

    root = pathlib.Path(sys.argv[1])
    small = jsparse.nn.BCSRLinear(64, 64, sparsity=0.5, block_shape=(16, 16), rngs=nnx.Rngs(0))
    checkpoint.save(root / "1", small)
    big = nnx.Param(np.ones((64, 1024, 1024), np.float32))  # 256 MB: a long write

    def kill_when_writing():
        while True:
            if any(p.name.startswith("2") for p in root.iterdir()):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0005)

    threading.Thread(target=kill_when_writing, daemon=True).start()
    checkpoint.save(root / "2", {"big": big[...]})
    print("the write finished before the kill", flush=True)
    """
)


@pytest.mark.slow
def test_killed_writer_leaves_previous_checkpoint_readable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = sorted(p.name for p in pathlib.Path(tmp_path).iterdir())
    # The interrupted write is a temporary folder, never the committed name.
    assert "2" not in names, names
    assert any(n.startswith("2") and n != "2" for n in names), names
    restored = checkpoint.restore(
        tmp_path / "1",
        nnx.eval_shape(
            lambda: jsparse.nn.BCSRLinear(
                64, 64, sparsity=0.5, block_shape=(16, 16), rngs=nnx.Rngs(1)
            )
        ),
    )
    expected = jsparse.nn.BCSRLinear(64, 64, sparsity=0.5, block_shape=(16, 16), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(restored(_x()), expected(_x()))


def test_sharded_example_trains_and_restores_on_the_mesh():
    """examples/sharded_mlp.py, small: data-parallel training equals one device, and
    the checkpointed model restored into an abstract model on the mesh answers alike."""
    import importlib.util

    path = pathlib.Path(__file__).parents[1] / "examples" / "sharded_mlp.py"
    spec = importlib.util.spec_from_file_location("sharded_mlp", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    xs, ys = example.data(jax.random.key(0), 3, 16, 64, 10)
    mesh = jax.make_mesh((8,), ("data",))
    with jax.set_mesh(mesh):
        sharded, model, optimizer = example.train(xs, ys, mesh=mesh, hidden=64, sparsity=0.5)
    single, _, _ = example.train(xs, ys, hidden=64, sparsity=0.5)
    np.testing.assert_allclose(sharded, single, rtol=1e-4)
    (restored, restored_opt), on_disk = example.save_and_restore(
        model, optimizer, mesh, hidden=64, sparsity=0.5
    )
    assert 0 < on_disk
    with jax.set_mesh(mesh):
        x = jax.device_put(xs[0], jax.sharding.NamedSharding(mesh, P("data", None)))
        np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))
    mu = restored_opt.opt_state[0].mu["middle"]["kernel_data"][...]
    np.testing.assert_array_equal(
        np.asarray(mu), np.asarray(optimizer.opt_state[0].mu["middle"]["kernel_data"][...])
    )
