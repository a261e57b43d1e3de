"""Layer call: one :class:`jsparse.nn.SparseLinear` (BCSR) at the shape of the
quickstart's RigL hidden layer against an :class:`flax.nnx.Linear` of the same shape.

The quickstart (``examples/quickstart.py``) trains an MLP 64 -> 2048 -> 2048 -> 10 at
batch 128; RigL makes it 90% sparse overall with ERK, which leaves the first and last
layers dense and the 2048x2048 hidden layer at 93.25% sparsity in 32x32 blocks. This
section times that layer alone: a jitted forward call, a jitted ``value_and_grad`` step
with respect to the layer's ``nnx.Param`` values, and the eager (un-jitted) forward
call, where the Python-side work of a call (building the format, dispatch) shows.

Each pair is timed in alternating rounds (:func:`benchmarks.timing.paired_times`), in
one process. Also runnable alone: ``python benchmarks/layer_call.py``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

import jsparse

try:
    from benchmarks.timing import markdown_table, paired_times
except ModuleNotFoundError:  # run as a script: its folder is on sys.path
    from timing import markdown_table, paired_times

BATCH = 128
FEATURES = 2048
BLOCK_SHAPE = (32, 32)
# jsparse.train.erk(MLP(2048), 0.9)["layers/1"] for the quickstart's MLP.
SPARSITY = 0.93251953125


def _functional(layer: nnx.Module):
    """(params, rest, jitted forward, jitted value_and_grad wrt params) of ``layer``."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def forward(params, rest, x):
        return nnx.merge(graphdef, params, rest)(x)

    def loss(params, rest, x):
        return jnp.mean(jnp.square(forward(params, rest, x)))

    return params, rest, jax.jit(forward), jax.jit(jax.value_and_grad(loss))


def run(quick: bool = False) -> str:
    """Markdown: SparseLinear vs nnx.Linear call times at the quickstart's hidden layer."""
    load_before = os.getloadavg()[0]
    rounds = {"reps": 3, "run": 3} if quick else {"reps": 15, "run": 5}
    eager_rounds = {"reps": 2, "run": 5} if quick else {"reps": 10, "run": 5}

    sparse = jsparse.nn.SparseLinear(
        FEATURES, FEATURES, sparsity=SPARSITY, block_shape=BLOCK_SHAPE, rngs=nnx.Rngs(0)
    )
    dense = nnx.Linear(FEATURES, FEATURES, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (BATCH, FEATURES))

    s_params, s_rest, s_fwd, s_step = _functional(sparse)
    d_params, d_rest, d_fwd, d_step = _functional(dense)
    cases = [
        ("forward, jit", d_fwd, (d_params, d_rest, x), s_fwd, (s_params, s_rest, x), rounds),
        (
            "value_and_grad wrt nnx.Param, jit",
            d_step,
            (d_params, d_rest, x),
            s_step,
            (s_params, s_rest, x),
            rounds,
        ),
        ("forward, eager", dense, (x,), sparse, (x,), eager_rounds),
    ]
    rows = []
    for name, d_fn, d_args, s_fn, s_args, kw in cases:
        t_dense, t_sparse, speedup = paired_times(d_fn, d_args, s_fn, s_args, **kw)
        rows.append([name, t_sparse * 1e3, t_dense * 1e3, speedup])

    nse = sparse.kernel.nse
    blocks = (FEATURES // BLOCK_SHAPE[0]) * (FEATURES // BLOCK_SHAPE[1])
    calls = kw["reps"] * kw["run"]
    return (
        f"## Layer call: SparseLinear {FEATURES}x{FEATURES}, {BLOCK_SHAPE[0]}x"
        f"{BLOCK_SHAPE[1]} blocks, {100 * SPARSITY:.2f}% sparse ({nse}/{blocks} blocks), "
        f"batch {BATCH}, float32\n\n"
        "The quickstart's RigL hidden layer against `nnx.Linear` of the same shape. "
        "Times are medians per call (ms) over alternating rounds after warm-up "
        f"({rounds['reps']}x{rounds['run']} calls per side jitted, {calls} eager); "
        "speedup = median over rounds of nnx.Linear time / SparseLinear time.\n\n"
        + markdown_table(["call", "SparseLinear ms", "nnx.Linear ms", "speedup"], rows)
        + f"\n\n1-minute load average before / after: {load_before:.2f} / "
        f"{os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)."
    )


if __name__ == "__main__":
    print(f"jsparse from {jsparse.__file__}, jax {jax.__version__}\n")
    print(run(quick=False))
