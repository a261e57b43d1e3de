"""Train a sparse MLP tensor-parallel (Megatron style) on 8 host CPU devices.

A 2x4 mesh: the batch is split over ``"data"``, the two BCSR layers
(:class:`jsparse.parallel.ParallelLinear`) over ``"model"``: the first column-parallel
(each device computes its own hidden features, no collective), the second
row-parallel (partial products summed by one all-reduce). Each device stores only its
shard of each weight (values and index arrays), and the Adam state is sharded alike.
Every ``--dst-every`` steps each device moves blocks within its shards (SET: drop the
smallest, grow at random), the optimizer moments following the values. The losses are
checked against the same model trained off the mesh (one device, same seed).

    python examples/tensor_parallel_mlp.py            # 200 steps
    python examples/tensor_parallel_mlp.py --quick    # 20 steps, small
"""

from __future__ import annotations

import os

# 8 host devices: must be set before JAX starts.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse  # noqa: E402
import contextlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jsparse.parallel import ParallelLinear  # noqa: E402


class MLP(nnx.Module):
    def __init__(self, features, hidden, classes, *, parts=None, rngs):
        self.fc1 = ParallelLinear(
            features, hidden, parallel="column", parts=parts, sparsity=0.75,
            block_shape=(16, 16), rngs=rngs,
        )  # fmt: skip
        self.fc2 = ParallelLinear(
            hidden, classes, parallel="row", parts=parts, sparsity=0.75, block_shape=(16, 2),
            rngs=rngs,
        )  # fmt: skip

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))  # the one all-reduce


def data(key, steps, batch, features, classes):
    """A fixed random teacher's labels on Gaussian inputs."""
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (steps, batch, features))
    teacher = jax.random.normal(kw, (features, classes))
    return x, jnp.argmax(x @ teacher, axis=-1)


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def set_step(model, optimizer, key):
    """SET on both layers: each device drops its 2 smallest blocks and grows 2 at random
    positions of its own shard; the Adam moments follow the values."""
    for i, (name, layer) in enumerate((("fc1", model.fc1), ("fc2", model.fc2))):
        noise = jax.random.uniform(
            jax.random.fold_in(key, i), (layer.in_features, layer.out_features)
        )
        scores = layer.block_scores(noise)  # random block scores: SET
        layer.grow_and_drop(k=2, k_max=2, grow_scores=scores, optimizer=optimizer, path=(name,))


def train(xs, ys, sizes, lr, dst_every, mesh=None):
    context = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    with context:
        parts = None if mesh is not None else 4  # off the mesh: the same 4 shards
        model = nnx.jit(lambda: MLP(*sizes, parts=parts, rngs=nnx.Rngs(0)))()
        optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
        losses = []
        for step, (x, y) in enumerate(zip(xs, ys, strict=True)):
            if mesh is not None:
                x = jax.device_put(x, NamedSharding(mesh, P("data", None)))
                y = jax.device_put(y, NamedSharding(mesh, P("data")))
            losses.append(float(train_step(model, optimizer, x, y)))
            if dst_every and (step + 1) % dst_every == 0:
                set_step(model, optimizer, jax.random.key(step))
        return losses, model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short, small run")
    parser.add_argument("--dst-every", type=int, default=10, help="SET every N steps (0: off)")
    args = parser.parse_args()
    steps, batch, hidden = (20, 32, 128) if args.quick else (200, 256, 1024)
    features, classes, lr = 64, 8, 3e-3
    xs, ys = data(jax.random.key(1), steps, batch, features, classes)
    sizes = (features, hidden, classes)

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    sharded, model = train(xs, ys, sizes, lr, args.dst_every, mesh)
    single, _ = train(xs, ys, sizes, lr, args.dst_every)
    s1, s2 = jax.device_get(model.fc1.split), jax.device_get(model.fc2.split)
    print(f"mesh {dict(mesh.shape)}; stored values {s1.nstored + s2.nstored}, per device "
          f"{(s1.nstored + s2.nstored) // mesh.shape['model']}; "
          f"fc1 sharded as {model.fc1.kernel_data[...].sharding.spec}")  # fmt: skip
    print(f"loss: {sharded[0]:.3f} -> {sharded[-1]:.3f} (tensor parallel)")
    print(f"loss: {single[0]:.3f} -> {single[-1]:.3f} (one device)")
    np.testing.assert_allclose(sharded, single, rtol=2e-3, atol=1e-4)
    print("tensor-parallel run equals the one-device run")


if __name__ == "__main__":
    main()
