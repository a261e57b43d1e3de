"""The GPU suite: ``python -m jsparse.bench --suite gpu [--output FILE] [--profile DIR]``.

On one GPU (sized for an H100/H200 inside 8 minutes) it

1. **checks correctness first**: every case runs ``impl="pallas"`` forward and
   ``value_and_grad`` (compiled kernels: ``A @ X``, ``A.T @ dY``, the sampled ``dA``)
   and compares them with the XLA reference (``impl="xla"`` on float32 copies of
   the same operands), with a tolerance per dtype;
2. **then times** each case against dense ``jnp`` (cuBLAS) on the densified weight,
   forward and ``value_and_grad``, and reports the ratio (× > 1: faster than dense),
   the achieved TFLOP/s and TB/s (stored FLOPs and bytes) and the fraction of the
   chip's peak (the larger of the FLOP and byte fractions: the roofline bound).

Cases (the issue's): BCSR 4096² at 90% sparsity with 32×32, 64×64 and 128×128 blocks
for N = 1, 16, 256, 4096; N:M 2:4 4096² for N = 1, 16, 64, 256; Monarch 4096² with 4
and 16 blocks for N = 1024; bfloat16 and float32; and block-sparse attention (bfloat16,
B = 1, H = 8, D = 64, block 64: local 512 causal at L = 8192, causal at L = 4096,
strided at L = 8192) against dense attention (cuDNN where it can express the mask,
else XLA's masked softmax). The table goes to ``--output``
(default ``gpu_suite.md``) and to stdout. Rows with a speed target (bfloat16 on
H100/H200) say whether it was met; ``--profile DIR`` writes a ``jax.profiler`` trace
of every case that misses it.

On a machine without a GPU the correctness half runs in the Pallas interpreter on
tiny shapes (:func:`check_correctness` with :func:`tiny_cases`; tested on CPU).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

import jsparse.attention as ja
from benchmarks.timing import markdown_table, paired_times
from jsparse import BCSR, NM, Monarch, matmul

# Dense peaks (tensor cores; float32 dots run as TF32 in Triton and cuBLAS) and HBM
# bandwidth, from the vendors' data sheets (SXM parts).
PEAKS = {
    "h200": {"bfloat16": 989e12, "float32": 494e12, "bytes": 4.8e12},
    "h100": {"bfloat16": 989e12, "float32": 494e12, "bytes": 3.35e12},
    "a100": {"bfloat16": 312e12, "float32": 156e12, "bytes": 2.04e12},
}
# Relative error (max |kernel - reference| / max |reference|) allowed per dtype: bf16
# rounds the inputs and the output; float32 dots run as TF32 on tensor cores.
TOLERANCE = {"bfloat16": 3e-2, "float32": 1e-2}
# Wall-time budget of the whole suite: timing stops (rows say so) past it.
BUDGET_S = 7.5 * 60


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case.

    Attributes:
      fmt: ``"bcsr"``, ``"nm"`` or ``"monarch"``.
      size: ``A`` is ``size x size``.
      n: columns of ``X``.
      dtype: ``"bfloat16"`` or ``"float32"``.
      param: the block side (BCSR), ``(n, m)`` (N:M) or the number of blocks (Monarch).
      target: the speed-up over dense the issue asks for (bfloat16, H100/H200), or None.
      density: BCSR's fraction of stored blocks.
    """

    fmt: str
    size: int
    n: int
    dtype: str
    param: int | tuple[int, int]
    target: float | None = None
    density: float = 0.1

    @property
    def label(self) -> str:
        if self.fmt == "bcsr":
            what = f"BCSR {100 - 100 * self.density:.0f}% {self.param}×{self.param}"
        elif self.fmt == "nm":
            what = f"N:M {self.param[0]}:{self.param[1]}"
        else:
            what = f"Monarch nblocks={self.param}"
        return f"{what} {self.size}² N={self.n} {self.dtype}"


def cases(quick: bool = False) -> list[Case]:
    """The issue's cases (``quick``: the bfloat16 ones with N <= 256 only)."""
    out = []
    for dtype in ("bfloat16", "float32"):
        bf16 = dtype == "bfloat16"
        for block in (32, 64, 128):
            for n in (1, 16, 256, 4096):
                target = None
                if bf16 and block == 64:
                    target = 6.0 if n <= 16 else (4.0 if n >= 1024 else None)
                out.append(Case("bcsr", 4096, n, dtype, block, target))
        for n in (1, 16, 64, 256):
            out.append(Case("nm", 4096, n, dtype, (2, 4), 1.5 if bf16 and n <= 64 else None))
        for nblocks in (4, 16):
            out.append(Case("monarch", 4096, 1024, dtype, nblocks,
                            4.0 if bf16 and nblocks == 16 else None))  # fmt: skip
    if quick:
        out = [c for c in out if c.dtype == "bfloat16" and c.n <= 256]
    return out


def tiny_cases() -> list[Case]:
    """Small shapes of every format and dtype (the interpreter on CPU)."""
    return [
        Case("bcsr", 64, 3, "float32", 16, density=0.5),
        Case("nm", 32, 16, "bfloat16", (2, 4)),
        Case("monarch", 64, 5, "float32", 4),
        Case("bcsr", 64, 16, "bfloat16", 32, density=0.5),
    ]


def make(case: Case, key: jax.Array):
    """``(A, X, C)``: the sparse operand, the dense ``X`` and a fixed cotangent ``C``
    for ``value_and_grad`` of ``sum(A @ X * C)``."""
    dtype = jnp.dtype(case.dtype)
    k_a, k_x, k_c = jax.random.split(key, 3)
    shape = (case.size, case.size)
    if case.fmt == "bcsr":
        b = case.param
        a = BCSR.random(k_a, shape, density=case.density, block_shape=(b, b), dtype=dtype)
    elif case.fmt == "nm":
        a = NM.random(k_a, shape, n=case.param[0], m=case.param[1], dtype=dtype)
    else:
        a = Monarch.init(k_a, shape, nblocks=case.param, dtype=dtype)
    x = jax.random.normal(k_x, (case.size, case.n), dtype)
    c = jax.random.normal(k_c, (case.size, case.n), jnp.float32)
    return a, x, c


def _functions(impl: str):
    """Jitted forward and ``value_and_grad`` (w.r.t. ``A`` and ``X``) of ``impl``."""

    def forward(a, x):
        return matmul(a, x, impl=impl)

    def loss(a, x, c):
        return jnp.sum(forward(a, x).astype(jnp.float32) * c)

    vjp = jax.value_and_grad(loss, argnums=(0, 1), allow_int=True)
    return jax.jit(forward), jax.jit(vjp)


def _dense_functions():
    def forward(w, x):
        return jnp.dot(w, x, preferred_element_type=jnp.float32).astype(x.dtype)

    def loss(w, x, c):
        return jnp.sum(forward(w, x).astype(jnp.float32) * c)

    return jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _float_leaves(tree) -> list[np.ndarray]:
    leaves = jax.tree.leaves(tree)
    return [np.asarray(v, np.float32) for v in leaves if jnp.issubdtype(v.dtype, jnp.floating)]


def _rel_error(got, want) -> float:
    errs = []
    for g, w in zip(_float_leaves(got), _float_leaves(want), strict=True):
        scale = max(float(np.max(np.abs(w))), 1e-30) if w.size else 1.0
        errs.append(float(np.max(np.abs(g - w))) / scale if w.size else 0.0)
    return max(errs, default=0.0)


def _to_f32(tree):
    return jax.tree.map(
        lambda v: v.astype(jnp.float32) if jnp.issubdtype(v.dtype, jnp.floating) else v, tree
    )


@dataclasses.dataclass
class Check:
    """The correctness verdict of one case: relative errors and whether they pass."""

    case: Case
    forward_error: float
    grad_error: float
    refused: str | None = None  # the planners' reason when impl="pallas" cannot run

    @property
    def ok(self) -> bool:
        tol = TOLERANCE[self.case.dtype]
        return self.refused is None and self.forward_error <= tol and self.grad_error <= tol


def check_correctness(case_list, *, key=None) -> list[Check]:
    """Run every case's ``impl="pallas"`` forward and ``value_and_grad`` and compare
    them with ``impl="xla"`` on float32 copies (the value, ``dA`` and ``dX``).

    Example:
      >>> from benchmarks.gpu import check_correctness, Case
      >>> [c.ok for c in check_correctness([Case("bcsr", 32, 2, "float32", 16)])]
      [True]
    """
    key = jax.random.key(0) if key is None else key
    pallas_fwd, pallas_vjp = _functions("pallas")
    xla_fwd, xla_vjp = _functions("xla")
    out = []
    for i, case in enumerate(case_list):
        a, x, c = make(case, jax.random.fold_in(key, i))
        a32, x32 = _to_f32(a), _to_f32(x)
        try:
            got_y = pallas_fwd(a, x)
        except ValueError as e:  # a configuration the planners refuse, with the reason
            out.append(Check(case, float("nan"), float("nan"), refused=str(e)))
            continue
        fwd_err = _rel_error(got_y, xla_fwd(a32, x32))
        got_v, got_g = pallas_vjp(a, x, c)
        want_v, want_g = xla_vjp(a32, x32, c)
        grad_err = max(_rel_error(got_v, want_v), _rel_error(got_g, want_g))
        out.append(Check(case, fwd_err, grad_err))
    return out


def _peaks(kind: str):
    k = kind.lower()
    for name, peaks in PEAKS.items():
        if name in k:
            return name, peaks
    return None, None


def _stored(a) -> tuple[int, int]:
    """(multiply-adds per column of X, bytes of A as stored)."""
    leaves = jax.tree.leaves(a)
    nbytes = sum(v.size * v.dtype.itemsize for v in leaves)
    if isinstance(a, BCSR):
        return int(a.data.size), nbytes
    if isinstance(a, NM):
        return int(a.values.size), nbytes
    return int(a.left.size + a.right.size), nbytes


def _timing_row(case, a, x, c, peaks, reps, profile_dir, index) -> list:
    pallas_fwd, pallas_vjp = _functions("pallas")
    dense_fwd, dense_vjp = _dense_functions()
    w = a.todense()
    macs, a_bytes = _stored(a)
    item = jnp.dtype(case.dtype).itemsize
    xy_bytes = 2 * case.size * case.n * item
    row = [case.label]
    for kind, (dense, dense_args, kernel, kernel_args), mult in (
        ("fwd", (dense_fwd, (w, x), pallas_fwd, (a, x)), 1),
        ("vjp", (dense_vjp, (w, x, c), pallas_vjp, (a, x, c)), 3),
    ):
        t_dense, t_kernel, ratio = paired_times(dense, dense_args, kernel, kernel_args, reps)
        flops = mult * 2 * macs * case.n
        nbytes = mult * (a_bytes + xy_bytes)
        tflops, tbs = flops / t_kernel / 1e12, nbytes / t_kernel / 1e12
        peak = "n/a"
        if peaks is not None:
            frac = max(flops / t_kernel / peaks[case.dtype], nbytes / t_kernel / peaks["bytes"])
            peak = f"{100 * frac:.0f}%"
        row += [t_kernel * 1e6, ratio, tflops, tbs, peak]
        if kind == "fwd":
            fwd_ratio = ratio
    verdict = ""
    if case.target is not None and peaks is not None:
        verdict = f"≥{case.target:g}×: " + ("met" if fwd_ratio >= case.target else "MISSED")
        if fwd_ratio < case.target and profile_dir is not None:
            trace_dir = pathlib.Path(profile_dir) / f"case{index:02d}"
            with jax.profiler.trace(str(trace_dir)):
                for _ in range(3):
                    jax.block_until_ready(pallas_fwd(a, x))
            verdict += f" (trace: {trace_dir})"
    return row + [verdict]


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """One block-sparse attention case (``mask``: a name in :func:`attention_mask`)."""

    mask: str
    length: int
    dtype: str = "bfloat16"
    heads: int = 8
    dim: int = 64
    block: int = 64

    @property
    def label(self) -> str:
        return f"attention {self.mask} L={self.length} {self.dtype}"


def attention_mask(name: str):
    """The mask function and the dense-attention keywords that express the same mask
    to cuDNN (None: only a dense boolean mask can)."""
    if name == "local 512 causal":
        return ja.causal() & ja.local(511), {"is_causal": True, "local_window_size": (511, 0)}
    if name == "causal":
        return ja.causal(), {"is_causal": True}
    if name == "strided":  # local 256 + a 64-wide band every 512 positions, causal
        return ja.causal() & (ja.local(255) | ja.strided(512, 64)), None
    raise ValueError(f"unknown attention mask {name!r}")


def attention_cases(quick: bool = False) -> list[AttentionCase]:
    """Issue 14's cases, in bfloat16 for the GPU."""
    out = [
        AttentionCase("local 512 causal", 8192),
        AttentionCase("causal", 4096),
        AttentionCase("strided", 8192),
    ]
    return out[:2] if quick else out


def tiny_attention_cases() -> list[AttentionCase]:
    """Small shapes for the interpreter on CPU."""
    return [
        AttentionCase("local 512 causal", 128, "float32", heads=2, dim=16, block=32),
        AttentionCase("causal", 96, "bfloat16", heads=2, dim=16, block=32),
    ]


def _attention_inputs(case: AttentionCase, key):
    fn, _ = attention_mask(case.mask)
    mask = ja.BlockMask.from_fn(fn, case.length, case.length, block_size=(case.block,) * 2)
    shape = (1, case.length, case.heads, case.dim)
    q, k, v, c = (
        jax.random.normal(kk, shape, jnp.dtype(case.dtype)) for kk in jax.random.split(key, 4)
    )
    return mask, q, k, v, c.astype(jnp.float32)


def _attention_functions(impl: str):
    def forward(q, k, v, mask):
        return ja.block_sparse_attention(q, k, v, mask, impl=impl)

    def loss(q, k, v, mask, c):
        return jnp.sum(forward(q, k, v, mask).astype(jnp.float32) * c)

    return jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def check_attention(case_list, *, key=None) -> list[Check]:
    """``impl="pallas"`` against ``impl="xla"`` on float32 copies: the output and the
    gradients w.r.t. ``q, k, v``.

    Example:
      >>> from benchmarks.gpu import check_attention, tiny_attention_cases
      >>> [c.ok for c in check_attention(tiny_attention_cases()[:1])]
      [True]
    """
    key = jax.random.key(2) if key is None else key
    pallas_fwd, pallas_vjp = _attention_functions("pallas")
    xla_fwd, xla_vjp = _attention_functions("xla")
    out = []
    for i, case in enumerate(case_list):
        mask, q, k, v, c = _attention_inputs(case, jax.random.fold_in(key, i))
        q32, k32, v32 = _to_f32((q, k, v))
        try:
            got = pallas_fwd(q, k, v, mask)
        except ValueError as e:
            out.append(Check(case, float("nan"), float("nan"), refused=str(e)))
            continue
        fwd_err = _rel_error(got, xla_fwd(q32, k32, v32, mask))
        got_v, got_g = pallas_vjp(q, k, v, mask, c)
        want_v, want_g = xla_vjp(q32, k32, v32, mask, c)
        out.append(Check(case, fwd_err, max(_rel_error(got_v, want_v), _rel_error(got_g, want_g))))
    return out


def _dense_attention(case: AttentionCase, mask):
    """Jitted dense forward and value_and_grad, and what runs them: cuDNN when the
    mask is expressible to it and it accepts the shapes, else XLA with a boolean mask."""
    _, cudnn_kwargs = attention_mask(case.mask)
    dense_mask = mask.to_dense()[None]

    def make(fwd):
        def loss(q, k, v, c):
            return jnp.sum(fwd(q, k, v).astype(jnp.float32) * c)

        return jax.jit(fwd), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    if cudnn_kwargs is not None:
        fwd = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
            q, k, v, implementation="cudnn", **cudnn_kwargs
        )
        try:
            shape = jax.ShapeDtypeStruct((1, case.length, case.heads, case.dim), case.dtype)
            jax.jit(fwd).lower(shape, shape, shape).compile()
            return (*make(fwd), "cuDNN")
        except Exception:  # noqa: BLE001 - cuDNN refuses: fall back to XLA, say so
            pass
    fwd = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense_mask)  # noqa: E731
    return (*make(fwd), "XLA masked")


def _attention_timing_row(case, key, reps) -> list:
    mask, q, k, v, c = _attention_inputs(case, key)
    dense_fwd, dense_vjp, dense_name = _dense_attention(case, mask)
    fwd, vjp = _attention_functions("pallas")
    t_d, t_s, r_fwd = paired_times(dense_fwd, (q, k, v), fwd, (q, k, v, mask), reps)
    t_dg, t_sg, r_vjp = paired_times(dense_vjp, (q, k, v, c), vjp, (q, k, v, mask, c), reps)
    return [case.label, f"{100 * mask.density():.1f}%", dense_name, t_s * 1e6, r_fwd,
            t_sg * 1e6, r_vjp]  # fmt: skip


def run_suite(output: str | None = None, quick: bool = False, profile: str | None = None) -> str:
    """Correctness, then timings; returns the markdown and writes it to ``output``."""
    start = time.perf_counter()
    device = jax.devices()[0]
    kind = device.device_kind
    if jax.default_backend() != "gpu":
        text = (
            f"## GPU suite\n\nNo GPU here (backend {jax.default_backend()!r}, {kind}): the "
            "suite needs one. Its correctness half is tested on CPU in interpret mode "
            "(`tests/test_gpu_suite.py`)."
        )
        print(text)
        return text
    case_list = cases(quick)
    checks = check_correctness(case_list) + check_attention(attention_cases(quick))
    check_rows = [
        [
            ch.case.label,
            f"{ch.forward_error:.2e}",  # 2 decimals would hide small errors
            f"{ch.grad_error:.2e}",
            TOLERANCE[ch.case.dtype],
            "ok" if ch.ok else ("refused: " + ch.refused if ch.refused else "FAIL"),
        ]
        for ch in checks
    ]
    check_table = markdown_table(
        ["case", "fwd rel. error", "grad rel. error", "tolerance", "verdict"], check_rows
    )
    failed = [ch.case.label for ch in checks if not ch.ok and not ch.refused]
    _, peaks = _peaks(kind)
    rows = []
    reps = 3 if quick else 7
    refused = {ch.case for ch in checks if ch.refused}
    for i, case in enumerate(case_list):
        if case in refused:
            rows.append([case.label] + ["refused by the planner"] + [""] * 10)
            continue
        if time.perf_counter() - start > BUDGET_S:
            rows.append([case.label] + ["skipped: time budget"] + [""] * 10)
            continue
        a, x, c = make(case, jax.random.fold_in(jax.random.key(1), i))
        rows.append(_timing_row(case, a, x, c, peaks, reps, profile, i))
    attention_rows = []
    for i, case in enumerate(attention_cases(quick)):
        if case in refused:
            attention_rows.append([case.label, "refused by the planner"] + [""] * 5)
        elif time.perf_counter() - start > BUDGET_S:
            attention_rows.append([case.label, "skipped: time budget"] + [""] * 5)
        else:
            key = jax.random.fold_in(jax.random.key(3), i)
            attention_rows.append(_attention_timing_row(case, key, reps))
    header = ["case"]
    for kind_ in ("fwd", "vjp"):
        header += [f"{kind_} µs", f"{kind_} × dense", f"{kind_} TFLOP/s", f"{kind_} TB/s",
                   f"{kind_} % peak"]  # fmt: skip
    header.append("target (fwd, bf16)")
    elapsed = time.perf_counter() - start
    text = (
        f"## GPU suite ({kind}, jax {jax.__version__}, {elapsed:.0f} s)\n\n"
        '### Correctness: `impl="pallas"` against `impl="xla"` on float32 copies\n\n'
        + check_table
        + ("\n\nFAILED: " + ", ".join(failed) if failed else "\n\nAll cases within tolerance.")
        + "\n\n### Timings against dense `jnp.dot` of the densified weight\n\n"
        "× dense > 1: faster than dense. TFLOP/s and TB/s count stored entries (vjp: "
        "3× the forward's); % peak is the larger of the FLOP and byte fractions of the "
        "chip's peak"
        + (" (unknown chip: n/a)" if peaks is None else "")
        + ".\n\n"
        + markdown_table(header, rows)
        + "\n\n### Block-sparse attention against dense attention (B=1, H=8, D=64, "
        "block 64)\n\nvjp: `value_and_grad` w.r.t. q, k, v. × dense > 1: faster.\n\n"
        + markdown_table(
            ["case", "blocks kept", "dense by", "fwd µs", "fwd × dense", "vjp µs", "vjp × dense"],
            attention_rows,
        )  # fmt: skip
    )
    path = pathlib.Path(output or "gpu_suite.md")
    path.write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\n(written to {path})")
    return text
