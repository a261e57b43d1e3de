"""Native CPU kernels (``impl="cpu"``, jsparse_native): BCSR A (M x K) @ X (K x N)
against dense ``jnp``, jsparse's XLA kernels, ``jax.experimental.sparse`` and (when
installed) ``torch.sparse``; the gradient; the thread and instruction-set scaling; N:M
products, the native pruning (``NM.fromdense``) and the SR-STE layer built on both."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

import jsparse_native
from benchmarks.timing import markdown_table, paired_speedup, paired_times
from jsparse import BCSR, NM, matmul
from jsparse.core import product
from jsparse.formats.bcsr.cpu import CPU_KERNELS

# Calls of a few milliseconds move from one round to the next on this shared machine
# (a cell moved 2x between runs of 3 rounds): 11 rounds of 10 calls cost little. The
# long calls (N:M from 256 columns, 20-600 ms) run 3 rounds of 5.
_ROUNDS = {"reps": 11, "run": 10}
_ROUNDS_LONG = {"reps": 3, "run": 5}


def _case(shape, block_shape, density, n):
    key = jax.random.key(0)
    a = BCSR.random(key, shape, density=density, block_shape=block_shape)
    x = jax.random.normal(jax.random.fold_in(key, 1), (shape[1], n))
    return a, x


def _gflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9


def _torch_speedup(dense, dense_args, a: BCSR, x) -> object:
    try:
        import torch
    except ImportError:
        return "n/a"
    if a.block_shape[0] != a.block_shape[1]:
        return "n/a"  # torch's BSR @ dense (MKL) takes square blocks only
    w = torch.from_numpy(np.asarray(a.todense()))
    bsr = w.to_sparse_bsr(a.block_shape)
    xt = torch.from_numpy(np.asarray(x))
    with torch.inference_mode():
        return paired_speedup(dense, dense_args, lambda: bsr @ xt, (), reps=3, run=3)[1]


def _forward_row(a: BCSR, x) -> list:
    from jax.experimental import sparse as jsp

    w = a.todense()
    dense = jax.jit(lambda w, x: w @ x)
    fns = {i: jax.jit(lambda a, x, i=i: matmul(a, x, impl=i)) for i in ("cpu", "xla", "auto")}
    t_dense, t_cpu, cpu_speedup = paired_times(dense, (w, x), fns["cpu"], (a, x), **_ROUNDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = jsp.BCSR.fromdense(w)
        peer_mm = jax.jit(lambda p, x: p @ x)
        peer_speedup = paired_speedup(dense, (w, x), peer_mm, (peer, x), **_ROUNDS)[1]
    m, k = a.shape
    n = x.shape[1]
    return [
        f"{a.block_shape[0]}x{a.block_shape[1]}",
        f"{100 * (1 - a.density):.0f}%",
        t_dense * 1e3,
        cpu_speedup,
        paired_speedup(dense, (w, x), fns["xla"], (a, x), **_ROUNDS)[1],
        paired_speedup(dense, (w, x), fns["auto"], (a, x), **_ROUNDS)[1],
        peer_speedup,
        cpu_speedup / peer_speedup,
        _torch_speedup(dense, (w, x), a, x),
        _gflops(2 * m * k * n, t_dense),
        _gflops(2 * a.nse * a.block_shape[0] * a.block_shape[1] * n, t_cpu),
    ]


def _grad_row(a: BCSR, x) -> list:
    target = jnp.ones((a.shape[0], x.shape[1]))

    def loss_dense(w, x):
        return jnp.sum((w @ x - target) ** 2)

    def loss(impl):
        return lambda data, x: jnp.sum((matmul(a.with_values(data), x, impl=impl) - target) ** 2)

    g_dense = jax.jit(jax.value_and_grad(loss_dense, argnums=(0, 1)))
    g = {i: jax.jit(jax.value_and_grad(loss(i), argnums=(0, 1))) for i in ("cpu", "xla")}
    w = a.todense()
    t_dense, cpu = paired_speedup(g_dense, (w, x), g["cpu"], (a.data, x), **_ROUNDS)
    return [
        f"{a.block_shape[0]}x{a.block_shape[1]}",
        f"{100 * (1 - a.density):.0f}%",
        t_dense * 1e3,
        cpu,
        paired_speedup(g_dense, (w, x), g["xla"], (a.data, x), **_ROUNDS)[1],
    ]


def _set_then_call(control, value, f):
    """``f`` with the native control ``control(value)`` set before each call (the
    kernel reads it when it runs), so that two settings can alternate in rounds."""

    def call(*args):
        control(value)
        return f(*args)

    return call


def _scaling_rows(a: BCSR, x) -> list:
    """Time of the native product per thread cap and per instruction set."""
    f = jax.jit(lambda a, x: matmul(a, x, impl="cpu"))
    dense = jax.jit(lambda w, x: w @ x)
    w = a.todense()

    def capped(threads):
        return _set_then_call(jsparse_native.set_max_threads, threads, f)

    rows = []
    previous = jsparse_native.set_max_threads(1)
    try:
        # The kernel alone, one thread and all alternating: its own scaling.
        t_one, t_all, ratio = paired_times(capped(1), (a, x), capped(0), (a, x), **_ROUNDS)
        rows.append(
            ["threads: all / one, alone", f"{t_all * 1e3:.2f} / {t_one * 1e3:.2f} ms", ratio]
        )
        # Each alternating with the dense product (what a program mixing both sees; the
        # dense product's pool threads may still be busy when the kernel starts).
        jsparse_native.set_max_threads(1)
        t_one = paired_times(dense, (w, x), f, (a, x), **_ROUNDS)[1]
        jsparse_native.set_max_threads(0)
        t_all = paired_times(dense, (w, x), f, (a, x), **_ROUNDS)[1]
        rows.append(
            [
                "threads: all / one, after dense calls",
                f"{t_all * 1e3:.2f} / {t_one * 1e3:.2f} ms",
                t_one / t_all,
            ]
        )
        jsparse_native.set_max_threads(previous)
        for isa in jsparse_native.supported_isas():
            with jsparse_native.forced_isa(isa):
                t_dense, t_isa, speedup = paired_times(dense, (w, x), f, (a, x), **_ROUNDS)
            rows.append([f"isa {isa}", f"{t_isa * 1e3:.2f} ms", speedup])
    finally:
        jsparse_native.set_max_threads(previous)
    return rows


def _strip_rows(a: BCSR, x) -> list:
    """A strip block shape: the strip kernels (bcsr_strips.inc) against the general
    register tile (``jsparse_native.set_bcsr_strips(False)``), one thread, per op."""
    cfg, pat = a.kernel_config, a.pattern
    ops = {
        "A @ X": (jax.jit(lambda d, x: product.spmm(CPU_KERNELS, cfg, False, d, pat, x)), a.data),
        "A.T @ X": (jax.jit(lambda d, x: product.spmm(CPU_KERNELS, cfg, True, d, pat, x)), a.data),
        "SDDMM": (jax.jit(lambda u, v: product.sample(CPU_KERNELS, cfg, pat, u, v)), x),
    }

    def with_strips(f, on):
        return _set_then_call(jsparse_native.set_bcsr_strips, on, f)

    rows = []
    previous = jsparse_native.set_max_threads(1)
    try:
        for name, (f, first) in ops.items():
            t_general, t_strip, ratio = paired_times(
                with_strips(f, False), (first, x), with_strips(f, True), (first, x), **_ROUNDS
            )
            rows.append(
                [f"{a.block_shape[0]}x{a.block_shape[1]}", name, t_general * 1e3,
                 t_strip * 1e3, ratio]
            )  # fmt: skip
    finally:
        jsparse_native.set_bcsr_strips(True)
        jsparse_native.set_max_threads(previous)
    return rows


def _nm_row(a: NM, x) -> list:
    w = a.todense()
    dense = jax.jit(lambda w, x: w @ x)
    row = [f"{a.n}:{a.m} axis {a.axis}", x.shape[1]]
    rounds = _ROUNDS if x.shape[1] <= 64 else _ROUNDS_LONG
    for impl in ("cpu", "xla", "auto"):
        f = jax.jit(lambda a, x, impl=impl: matmul(a, x, impl=impl))
        t_dense, speedup = paired_speedup(dense, (w, x), f, (a, x), **rounds)
        row.append(speedup)
    # W.T @ X (the dX of a gradient): x @ W through the native kernel, against the
    # dense product with W.T materialised once (its best layout).
    xt = x.T
    f_t = jax.jit(lambda a, xt: matmul(xt, a, impl="cpu"))
    row.append(paired_speedup(dense, (xt, w), f_t, (a, xt), **rounds)[1])
    target = jnp.ones((a.shape[0], x.shape[1]))
    g_dense = jax.jit(jax.grad(lambda w, x: jnp.sum((w @ x - target) ** 2), argnums=(0, 1)))

    def loss(values, x):
        return jnp.sum((matmul(a.with_values(values), x, impl="cpu") - target) ** 2)

    g_cpu = jax.jit(jax.grad(loss, argnums=(0, 1)))
    row.append(paired_speedup(g_dense, (w, x), g_cpu, (a.values, x), **rounds)[1])
    return [*row[:2], t_dense * 1e3, *row[2:]]


def _prune_rows(size: int) -> list:
    """``NM.fromdense`` 2:4, ``cpu`` against ``xla``, with an elementwise pass over the
    same matrix (``2 * x``: one read, one write) as the memory-bound yardstick."""
    x = jax.random.normal(jax.random.key(0), (size, size))
    copy = jax.jit(lambda x: 2 * x)
    rows = []
    for axis in (0, 1):
        cpu, xla = (
            jax.jit(lambda x, i=impl, a=axis: NM.fromdense(x, n=2, m=4, axis=a, impl=i).values)
            for impl in ("cpu", "xla")
        )
        t_xla, t_cpu, speedup = paired_times(xla, (x,), cpu, (x,), reps=3, run=3)
        t_copy, _, vs_copy = paired_times(copy, (x,), cpu, (x,), **_ROUNDS)
        rows.append([f"2:4 axis {axis}", t_cpu * 1e3, t_xla * 1e3, speedup, t_copy * 1e3, vs_copy])
    return rows


def _sr_ste_rows(features: int, batches) -> list:
    """``value_and_grad`` of one ``SRSTELinear`` (2:4) step against ``nnx.Linear``'s."""
    from flax import nnx

    from jsparse.nn import SRSTELinear

    def loss(layer, x, target):
        return jnp.sum(jax.nn.relu(layer(x)) * target)

    step = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))
    linear = nnx.Linear(features, features, rngs=nnx.Rngs(0))
    rows = []
    for batch in batches:
        x = jax.random.normal(jax.random.key(1), (batch, features))
        t = jax.random.normal(jax.random.key(2), (batch, features))
        row = [batch]
        for impl in ("auto", "dense"):
            layer = SRSTELinear(linear, impl=impl)
            t_dense, speedup = paired_speedup(step, (linear, x, t), step, (layer, x, t), **_ROUNDS)
            row.append(speedup)
        rows.append([row[0], t_dense * 1e3, *row[1:]])
    return rows


def run(quick: bool = False) -> str:
    """The native-kernel tables (markdown)."""
    if not jsparse_native.available():
        return f"## Native CPU kernels\n\nnot available: {jsparse_native.load_error()}\n"
    size, n = (512, 128) if quick else (2048, 512)
    blocks = [(32, 32)] if quick else [(16, 16), (32, 32), (64, 64)]
    densities = [0.1] if quick else [0.5, 0.1]
    rows = [_forward_row(*_case((size, size), bs, d, n)) for bs in blocks for d in densities]
    # Strips (one row or one column per block; their own kernels), 90%.
    strips = [(1, 16)] if quick else [(1, 16), (16, 1)]
    rows += [_forward_row(*_case((size, size), bs, 0.1, n)) for bs in strips]
    strip_table = markdown_table(
        ["block", "op", "general ms", "strip ms", "general / strip"],
        [r for bs in strips for r in _strip_rows(*_case((size, size), bs, 0.1, n))],
    )
    fwd = markdown_table(
        [
            "block", "sparsity", "dense ms", "jsparse cpu", "jsparse xla", "jsparse auto",
            "jax.experimental.sparse.BCSR", "cpu / jax.experimental", "torch BSR",
            "dense GFLOP/s", "cpu GFLOP/s (stored)",
        ],
        rows,
    )  # fmt: skip
    grad_rows = [_grad_row(*_case((size, size), bs, 0.1, n)) for bs in blocks]
    grad = markdown_table(
        ["block", "sparsity", "dense ms", "jsparse cpu", "jsparse xla"], grad_rows
    )
    scaling = markdown_table(
        ["configuration", "cpu time", "ratio"],
        _scaling_rows(*_case((size, size), (32, 32), 0.1, n)),
    )
    size_nm = 1024 if quick else 4096
    # Narrow widths: the row-dot, dot and gather kernels (up to 64); wide: expanded tiles.
    widths = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 32, 48, 64, 256, 1024]
    nm_rows = []
    for axis in [1] if quick else [1, 0]:
        a = NM.random(jax.random.key(0), (size_nm, size_nm), n=2, m=4, axis=axis)
        for b in widths:
            x = jax.random.normal(jax.random.key(1), (size_nm, b))
            nm_rows.append(_nm_row(a, x))
    nm = markdown_table(
        [
            "n:m", "B", "dense ms", "jsparse cpu", "jsparse xla", "jsparse auto",
            "cpu X @ W", "cpu grad",
        ],
        nm_rows,
    )  # fmt: skip
    prune = markdown_table(
        ["pattern", "cpu ms", "xla ms", "cpu speedup", "2 * x ms", "2 * x / cpu"],
        _prune_rows(1024 if quick else 4096),
    )
    features = 512 if quick else 2048
    sr_ste = markdown_table(
        ["batch", "nnx.Linear ms", "SRSTELinear auto (N:M)", "SRSTELinear dense"],
        _sr_ste_rows(features, [128] if quick else [128, 512]),
    )
    return (
        f"## Native CPU kernels: BCSR A {size}x{size} @ X {size}x{n}, float32\n\n"
        "Speedups over dense `jnp` (dense time / method time; > 1 is faster), the median "
        "over 11 alternating rounds of 10 consecutive runs after warm-up (3 rounds of 5 for "
        "N:M from 256 columns), one process; "
        "GFLOP/s of the native kernel count the stored blocks' flops.\n\n"
        f"{fwd}\n\n"
        "`value_and_grad` with respect to (A's values, X) of `sum((A @ X - T)**2)`: "
        "speedup over the dense gradient.\n\n"
        f"{grad}\n\n"
        "Strip blocks at 90%, one thread: the row-strip kernel against the general register "
        "tile (`jsparse_native.set_bcsr_strips(False)`), alternating. It runs 1x16 `A @ X` "
        "and 16x1 `A.T @ X`; the other rows run the general kernel both ways (their ratio "
        "is the noise of one cell).\n\n"
        f"{strip_table}\n\n"
        "90% / 32x32: the native product with one thread against all of XLA's intra-op "
        "pool (ratio: one-thread time / all-threads time; *alone*: the two alternate, "
        "*after dense calls*: each alternates with the dense product), and per "
        "instruction set (ratio: speedup over dense).\n\n"
        f"{scaling}\n\n"
        f"N:M W {size_nm}x{size_nm} @ X {size_nm}xB, float32: speedups over dense (`X @ W`: "
        "X.T (B x K) @ W through the native kernel of W.T, against dense `X.T @ W`; the "
        "gradient column: `grad` of `sum((W @ X - T)**2)` in (values, X) over the dense "
        "gradient).\n\n"
        f"{nm}\n\n"
        f"`NM.fromdense` (2:4) of a {size_nm // (4 if quick else 1)}x"
        f"{size_nm // (4 if quick else 1)} float32 matrix: the native pruning against "
        "`lax.top_k` (`xla`), and against one elementwise pass over the matrix.\n\n"
        f"{prune}\n\n"
        f"One SR-STE step (`value_and_grad` in the layer and X) of a {features}x{features} "
        "layer, 2:4: speedup over `nnx.Linear`'s step. *auto*: pruned natively every call, "
        "the N:M products for the forward and dX, dense dW; *dense*: the masked dense "
        "product.\n\n"
        f"{sr_ste}"
    )
