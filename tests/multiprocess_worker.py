"""One process of the data-parallel sparse training run of tests/test_multiprocess.py.

``python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz``: each process
has ``4 // NUM_PROCESSES`` host devices, so the mesh has 4 devices whatever the
split; with more than one process, ``jax.distributed`` connects them on localhost
with gloo's CPU collectives. The model (a BCSR layer trained by RigL and an N:M
layer, Adam on the stored values) is replicated, the batch is sharded over the mesh.
Process 0 writes the final state's leaves to OUT.npz.
"""

from __future__ import annotations

import os
import sys

process_id, num_processes, port, out = (
    int(sys.argv[1]),
    int(sys.argv[2]),
    sys.argv[3],
    sys.argv[4],
)
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsparse  # noqa: E402

STEPS, BATCH = 12, 32


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = jsparse.nn.BCSRLinear(32, 64, sparsity=0.75, block_shape=(8, 8), rngs=rngs)
        self.out = jsparse.nn.NMLinear(64, 8, n=2, m=4, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def main():
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))

    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, jsparse.train.values_only(optax.adam(1e-2)), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    # Every process built the same state: make it one replicated global array per leaf.
    state = jax.tree.map(
        lambda a: jax.make_array_from_callback(a.shape, replicated, lambda i: np.asarray(a)[i]),
        state,
    )
    model, optimizer = nnx.merge(graphdef, state)
    initial_indices = np.asarray(jax.device_get(model.hidden.kernel_indices[...]))
    rigl = jsparse.train.RigL(total_steps=STEPS, delta_t=3)

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def rigl_update(model, optimizer, i, x, y):
        rigl.update(model, optimizer, i, loss_fn, x, y)

    rng = np.random.default_rng(0)
    per_process = BATCH // num_processes
    rows = slice(process_id * per_process, (process_id + 1) * per_process)
    for i in range(1, STEPS + 1):
        x = rng.normal(size=(BATCH, 32)).astype(np.float32)
        y = rng.integers(0, 8, size=BATCH).astype(np.int32)
        xs = jax.make_array_from_process_local_data(batch_sharding, x[rows])
        ys = jax.make_array_from_process_local_data(batch_sharding, y[rows])
        step(model, optimizer, xs, ys)
        if rigl.is_update_step(i):
            rigl_update(model, optimizer, jnp.asarray(i), xs, ys)

    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
    arrays = {jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in leaves}
    if process_id == 0:
        np.savez(out, initial_indices=initial_indices, **arrays)
    if num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
