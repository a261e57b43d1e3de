"""Train a sparse MLP data-parallel on 8 host CPU devices, and checkpoint it.

The batch is split over a mesh axis ``"data"`` (explicit axes, ``jax.make_mesh``'s
default); the model is replicated. Every sparse product runs on each device's own
rows, and the gradient of the stored values is summed by one all-reduce the size of
the stored values (docs/scale.md). The run is checked against the same training on
one device. The trained model and its optimizer state are then saved with
``jsparse.checkpoint`` (stored values and index arrays only) and restored into an
abstract model built on the mesh, whose outputs must equal the trained model's.

    python examples/sharded_mlp.py            # 200 steps
    python examples/sharded_mlp.py --quick    # 20 steps, small
"""

from __future__ import annotations

import os

# 8 host devices: must be set before JAX starts.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jsparse import checkpoint  # noqa: E402
from jsparse.nn import BCSRLinear  # noqa: E402


class SparseMLP(nnx.Module):
    """in -> hidden (dense) -> hidden (BCSR) -> out (dense)."""

    def __init__(self, features: int, hidden: int, classes: int, sparsity: float, *, rngs):
        self.first = nnx.Linear(features, hidden, rngs=rngs)
        self.middle = BCSRLinear(hidden, hidden, sparsity=sparsity, block_shape=(32, 32), rngs=rngs)
        self.last = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x):
        return self.last(jax.nn.relu(self.middle(jax.nn.relu(self.first(x)))))


def make_step():
    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    return step


def data(key, steps, batch, features, classes):
    """A fixed random teacher's labels on Gaussian inputs."""
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (steps, batch, features))
    teacher = jax.random.normal(kw, (features, classes))
    return x, jnp.argmax(x @ teacher, axis=-1)


def train(xs, ys, *, mesh=None, hidden, sparsity, lr=3e-3):
    """Losses of a training run, on one device (``mesh=None``) or data parallel."""
    model = SparseMLP(xs.shape[-1], hidden, 10, sparsity, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    step = make_step()
    losses = []
    for x, y in zip(xs, ys, strict=True):
        if mesh is not None:
            x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data", None)))
            y = jax.device_put(y, jax.sharding.NamedSharding(mesh, P("data")))
        losses.append(float(step(model, optimizer, x, y)))
    return losses, model, optimizer


def save_and_restore(model, optimizer, mesh, *, hidden, sparsity, lr=3e-3):
    """Checkpoint ``(model, optimizer)``, restore it into an abstract copy built on
    ``mesh``; returns the restored pair and the bytes on disk."""
    directory = tempfile.mkdtemp() + "/ckpt"
    checkpoint.save(directory, (model, optimizer))

    def build():
        fresh = SparseMLP(64, hidden, 10, sparsity, rngs=nnx.Rngs(1))
        return fresh, nnx.Optimizer(fresh, optax.adam(lr), wrt=nnx.Param)

    with jax.set_mesh(mesh):
        abstract = nnx.eval_shape(build)
        restored = checkpoint.restore(directory, abstract)
    return restored, checkpoint.nbytes_on_disk(directory)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short, small run")
    args = parser.parse_args()
    steps, batch, hidden = (20, 64, 256) if args.quick else (200, 256, 1024)
    xs, ys = data(jax.random.key(0), steps, batch, 64, 10)

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    # jax.set_mesh: the dense layers' gradients need the mesh in context (explicit
    # axes); the sparse layers work with or without it.
    with jax.set_mesh(mesh):
        sharded, model, optimizer = train(xs, ys, mesh=mesh, hidden=hidden, sparsity=0.9)
    single, _, _ = train(xs, ys, hidden=hidden, sparsity=0.9)
    print(f"devices: {jax.device_count()}, stored blocks: {model.middle.nse}")
    print(f"loss: {sharded[0]:.3f} -> {sharded[-1]:.3f} (data parallel)")
    print(f"loss: {single[0]:.3f} -> {single[-1]:.3f} (one device)")
    np.testing.assert_allclose(sharded, single, rtol=1e-3, atol=1e-4)
    print("data-parallel run equals the one-device run")

    (restored, _), on_disk = save_and_restore(model, optimizer, mesh, hidden=hidden, sparsity=0.9)
    dense = checkpoint.dense_nbytes(model)
    print(f"checkpoint: {on_disk / 2**20:.2f} MiB on disk (model + Adam state); the dense")
    print(f"  model's parameters alone: {dense / 2**20:.2f} MiB")
    with jax.set_mesh(mesh):
        x = jax.device_put(xs[0], jax.sharding.NamedSharding(mesh, P("data", None)))
        np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(model(x)))
    print("restored model's outputs equal the trained model's")


if __name__ == "__main__":
    main()
