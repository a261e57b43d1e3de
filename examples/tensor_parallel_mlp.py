"""Train a sparse MLP tensor-parallel (Megatron style) on 8 host CPU devices.

A 2x4 mesh: the batch is split over ``"data"``, the two BCSR weights over ``"model"``:
the first by block-columns (column-parallel: each device computes its own hidden
features, no collective), the second by block-rows (row-parallel: partial products
summed by one all-reduce). Each device stores only its shard of each weight (values
and index arrays). The losses are checked against the same training on one device.

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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsparse  # noqa: E402
from jsparse import parallel  # noqa: E402


def weights(features, hidden, classes, density):
    k1, k2 = jax.random.split(jax.random.key(0))
    scale1, scale2 = features**-0.5 / density**0.5, hidden**-0.5 / density**0.5
    w1 = jsparse.BCSR.random(k1, (features, hidden), density=density, block_shape=(16, 16))
    w2 = jsparse.BCSR.random(k2, (hidden, classes), density=density, block_shape=(16, 2))
    return jsparse.scale(w1, scale1), jsparse.scale(w2, scale2)


def data(key, steps, batch, features, classes):
    """A fixed random teacher's labels on Gaussian inputs."""
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (steps, batch, features))
    teacher = jax.random.normal(kw, (features, classes))
    return x, jnp.argmax(x @ teacher, axis=-1)


def cross_entropy(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_one_device(w1, w2, xs, ys, lr):
    def loss_fn(values, x, y):
        h = jax.nn.relu(x @ w1.with_values(values[0]))
        return cross_entropy(h @ w2.with_values(values[1]), y)

    return _train(loss_fn, [w1.data, w2.data], xs, ys, lr, place=lambda x, y: (x, y))


def train_tensor_parallel(w1, w2, xs, ys, lr, mesh):
    s1 = parallel.split(w1, mesh.shape["model"], along="cols").on_mesh(mesh, "model")
    s2 = parallel.split(w2, mesh.shape["model"], along="rows").on_mesh(mesh, "model")

    def local(s1, s2, x, y):  # each device: its rows of the batch, its weight shards
        h = jax.nn.relu(parallel.matmul(x, s1, axis_name="model"))
        logits = parallel.matmul(h, s2, axis_name="model")  # the one all-reduce
        return jax.lax.pmean(cross_entropy(logits, y), "data")

    mlp = jax.shard_map(
        local, mesh=mesh, in_specs=(P("model"), P("model"), P("data", None), P("data")),
        out_specs=P(),
    )  # fmt: skip

    def loss_fn(values, x, y):
        v1 = parallel.Split(s1.local.with_values(values[0]), s1.padding, s1.along, s1.shape)
        v2 = parallel.Split(s2.local.with_values(values[1]), s2.padding, s2.along, s2.shape)
        return mlp(v1, v2, x, y)

    def place(x, y):
        return (
            jax.device_put(x, NamedSharding(mesh, P("data", None))),
            jax.device_put(y, NamedSharding(mesh, P("data"))),
        )

    return _train(loss_fn, [s1.local.data, s2.local.data], xs, ys, lr, place), (s1, s2)


def _train(loss_fn, values, xs, ys, lr, place):
    tx = optax.adam(lr)
    state = tx.init(values)

    @jax.jit
    def step(values, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(values, x, y)
        updates, state = tx.update(grads, state, values)
        return optax.apply_updates(values, updates), state, loss

    losses = []
    for x, y in zip(xs, ys, strict=True):
        values, state, loss = step(values, state, *place(x, y))
        losses.append(float(loss))
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short, small run")
    args = parser.parse_args()
    steps, batch, hidden = (20, 32, 128) if args.quick else (200, 256, 1024)
    features, classes, lr = 64, 8, 3e-3
    xs, ys = data(jax.random.key(1), steps, batch, features, classes)
    w1, w2 = weights(features, hidden, classes, density=0.25)

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    sharded, (s1, s2) = train_tensor_parallel(w1, w2, xs, ys, lr, mesh)
    single = train_one_device(w1, w2, xs, ys, lr)
    print(f"mesh {dict(mesh.shape)}; stored values {w1.nstored + w2.nstored}, "
          f"per device {(s1.nstored + s2.nstored) // mesh.shape['model']} (plus padding "
          f"{s1.npadding + s2.npadding} blocks over all devices)")  # fmt: skip
    print(f"loss: {sharded[0]:.3f} -> {sharded[-1]:.3f} (tensor parallel)")
    print(f"loss: {single[0]:.3f} -> {single[-1]:.3f} (one device)")
    np.testing.assert_allclose(sharded, single, rtol=2e-3, atol=1e-4)
    print("tensor-parallel run equals the one-device run")


if __name__ == "__main__":
    main()
