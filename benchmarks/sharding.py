"""Sharded training: a sparse MLP against the dense one, data parallel on 8 host
CPU devices (examples/sharded_mlp.py's model, the hidden layer 90% sparse in 32x32
blocks).

Reports the training-step time of each (paired, alternating rounds:
:func:`benchmarks.timing.paired_times`) and the bytes each device holds for the
parameters and the Adam state. The devices need ``XLA_FLAGS`` set before JAX starts,
so the section runs itself in a child process. Also runnable alone:
``python benchmarks/sharding.py [--quick]``.
"""

from __future__ import annotations

import os
import subprocess
import sys

_FLAG = "--xla_force_host_platform_device_count=8"


def run(quick: bool = False) -> str:
    """The section's markdown (measured in a child process with 8 host devices)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_FLAG}".strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    args = [sys.executable, os.path.abspath(__file__), "--child"] + (["--quick"] if quick else [])
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"benchmarks/sharding.py failed:\n{out.stderr[-4000:]}")
    return out.stdout


def _measure(quick: bool) -> str:
    import jax
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from benchmarks.timing import markdown_table, paired_times
    from examples.sharded_mlp import SparseMLP, data, make_step

    class DenseMLP(nnx.Module):
        def __init__(self, features, hidden, classes, *, rngs):
            self.first = nnx.Linear(features, hidden, rngs=rngs)
            self.middle = nnx.Linear(hidden, hidden, rngs=rngs)
            self.last = nnx.Linear(hidden, classes, rngs=rngs)

        def __call__(self, x):
            return self.last(jax.nn.relu(self.middle(jax.nn.relu(self.first(x)))))

    batch, hidden = (64, 512) if quick else (256, 2048)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    xs, ys = data(jax.random.key(0), 1, batch, 64, 10)
    rows = []
    with jax.set_mesh(mesh):
        x = jax.device_put(xs[0], NamedSharding(mesh, P("data", None)))
        y = jax.device_put(ys[0], NamedSharding(mesh, P("data")))
        runs = {}
        for name, model in (
            ("dense", DenseMLP(64, hidden, 10, rngs=nnx.Rngs(0))),
            ("sparse (BCSR 90%)", SparseMLP(64, hidden, 10, 0.9, rngs=nnx.Rngs(0))),
        ):
            optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
            step = make_step()
            per_device = sum(
                leaf.addressable_shards[0].data.nbytes
                for leaf in jax.tree.leaves(nnx.state((model, optimizer)))
                if hasattr(leaf, "addressable_shards")
            )
            runs[name] = (step, (model, optimizer, x, y), per_device)
        (dense_step, dense_args, dense_bytes) = runs["dense"]
        (sparse_step, sparse_args, sparse_bytes) = runs["sparse (BCSR 90%)"]
        t_dense, t_sparse, ratio = paired_times(
            dense_step, dense_args, sparse_step, sparse_args, reps=3 if quick else 9
        )
    rows.append(["dense", t_dense * 1e3, 1.0, dense_bytes / 2**20])
    rows.append(["sparse (BCSR 90%)", t_sparse * 1e3, ratio, sparse_bytes / 2**20])
    header = ["MLP (data parallel)", "step ms", "speedup vs dense", "MiB per device"]
    title = (
        f"### Sharded training ({jax.device_count()} host devices, batch {batch}, "
        f"64 -> {hidden} -> {hidden} -> 10)\n\n"
    )
    return title + markdown_table(header, rows) + "\n"


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(_measure("--quick" in sys.argv))
    else:
        print(run("--quick" in sys.argv))
