"""Block-sparse (BCSR) times dense as Pallas kernels: ``Y = A @ X`` and ``Y = A.T @ X``.

``A`` (``shape = (M, K)``) is given by its stored blocks ``data (nse, bm, bn)`` and
pattern metadata the caller computes once with the pattern, never per call:

* ``A @ X``: the CSR row pointer ``indptr (M // bm + 1,)`` and the block-column of
  each stored block ``indices (nse,)``;
* ``A.T @ X``: the *CSC view* of the same blocks: a column pointer
  ``(K // bn + 1,)``, ``perm (nse,)`` (the stored block at each CSC position) and
  the block-row of the block at each position. :func:`csc_view` computes it (a
  stable argsort; a reference utility, the kernel never sorts).

In both cases the kernel walks *positions* ``ptr[i]:ptr[i + 1]`` of output block-row
``i``; position ``p`` multiplies stored block ``perm[p]`` (``p`` when ``perm`` is
``None``) with the block-row ``src[p]`` of ``X``. ``A.T`` is never formed: each
block is transposed in registers/VMEM. Arrays in, arrays out: nothing here knows
about autodiff or the jsparse formats.

Two kernels, one per hardware family:

* **GPU** (Triton backend): the grid is ``(output block-row, N tile)``. Each
  program reads its slice of the pointer from the index arrays (ordinary inputs:
  scalar prefetch is TPU-only) and runs a ``fori_loop`` with data-dependent bounds
  over the positions of its row, accumulating in float32 registers. Empty
  block-rows run zero iterations and store zeros.
* **TPU** (Mosaic): a ``PrefetchScalarGridSpec`` whose grid walks a *schedule* of
  ``(block-row, stored block)`` steps computed in ``jnp`` by the wrapper. Each
  block-row owns ``max(count, 1)`` consecutive steps, so empty rows are visited
  once (to write zeros) and the output tile of a row stays resident in VMEM while
  its blocks are accumulated. The schedule has the static length ``nse + nrows``;
  unused trailing steps repeat the last row and do nothing.

Accumulation is float32; the output has ``x``'s dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.common import (
    MIN_DOT,
    Unsupported,
    check_backend,
    check_dtype,
    is_pow2,
    next_pow2,
    out_struct,
    round_up,
    tpu_sublane,
)
from pallas_kernels.targets import Target, current_target, fit_tiles

__all__ = [
    "SpmmConfig",
    "bcsr_spmm",
    "bcsr_spmm_reference",
    "csc_view",
    "plan_spmm",
    "row_ids_from_pointer",
    "row_pointer",
]

_KERNELS = "Pallas BCSR kernels"


@dataclasses.dataclass(frozen=True)
class SpmmConfig:
    """Static configuration of one SpMM launch.

    Attributes:
      block_shape: ``(bm, bn)``, the stored block shape of ``A``.
      tn: columns of ``X`` per program; the wrapper pads ``N`` to a multiple.
      backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic).
      transpose: compute ``A.T @ X``.
      num_warps, num_stages: Triton launch parameters (GPU only).
      tm: output rows per program, dividing the output block (``bm``, or ``bn``
        when transposed); ``None``: the whole block.
      tk: rows of ``X`` per step inside a block, dividing the input block;
        ``None``: the whole block. Large blocks are tiled ``tm x tk`` so that what
        a program holds on chip fits the target (:func:`plan_spmm` picks them).
      f32_operands: multiply in float32 (TPU v2/v3: Mosaic has no bfloat16 matmul).

    Raises (at construction):
      ValueError: a non-positive size or an unknown backend.
      Unsupported: a shape the backend's kernel cannot tile.

    Example:
      >>> from pallas_kernels.bcsr import SpmmConfig
      >>> cfg = SpmmConfig((16, 32), 64, transpose=True)
      >>> cfg.out_block, cfg.tm, cfg.tk
      (32, 32, 16)
      >>> SpmmConfig((16, 24), 64)
      Traceback (most recent call last):
      ...
      pallas_kernels.common.Unsupported: the Triton BCSR kernel needs power-of-two tiles; bn=24
    """

    block_shape: tuple[int, int]
    tn: int
    backend: str = "gpu"
    transpose: bool = False
    num_warps: int = 4
    num_stages: int = 2
    tm: int | None = None
    tk: int | None = None
    f32_operands: bool = False

    def __post_init__(self):
        bm, bn = self.block_shape
        check_backend(self.backend)
        if min(bm, bn, self.tn) <= 0:
            raise ValueError(
                f"block_shape and tn must be positive, got {self.block_shape}, {self.tn}"
            )
        out_b, in_b = (bn, bm) if self.transpose else (bm, bn)
        if self.tm is None:
            object.__setattr__(self, "tm", out_b)
        if self.tk is None:
            object.__setattr__(self, "tk", in_b)
        for name, t, b in (("tm", self.tm, out_b), ("tk", self.tk, in_b)):
            if t <= 0 or b % t:
                raise ValueError(f"{name}={t} must divide the block side {b}")
        if self.backend == "gpu":
            # Triton tiles are powers of two in every dimension.
            for name, v in (("bm", bm), ("bn", bn), ("tn", self.tn)):
                if not is_pow2(v):
                    raise Unsupported(
                        f"the Triton BCSR kernel needs power-of-two tiles; {name}={v}"
                    )
        else:
            if bm % 8 or bn % 8:
                raise Unsupported(
                    f"the TPU BCSR kernel needs bm and bn multiples of 8, got {self.block_shape}"
                )
            if self.tn % 8:
                raise Unsupported(
                    f"the TPU BCSR kernel needs tn a multiple of 8 (128 is best), got {self.tn}"
                )
            # Mosaic blocks: the last dim a multiple of 128 (or whole), the one
            # before a multiple of 8 (or whole).
            lane, sub = (self.tm, self.tk) if self.transpose else (self.tk, self.tm)
            lane_b, sub_b = (out_b, in_b) if self.transpose else (in_b, out_b)
            if (lane != lane_b and lane % 128) or (sub != sub_b and sub % 8):
                raise Unsupported(
                    f"the TPU BCSR kernel tiles blocks in multiples of (8, 128); got tiles "
                    f"tm={self.tm}, tk={self.tk} of block {self.block_shape}"
                )

    @property
    def out_block(self) -> int:
        """Rows of one output block (``bn`` when transposed)."""
        return self.block_shape[1] if self.transpose else self.block_shape[0]

    @property
    def in_block(self) -> int:
        """Rows of ``X`` one stored block reads."""
        return self.block_shape[0] if self.transpose else self.block_shape[1]

    def padded_n(self, n: int) -> int:
        return round_up(max(n, 1), self.tn)

    def onchip_bytes(self, dtype) -> int:
        """Estimated on-chip bytes of one program: shared memory (GPU: the dot
        operands of each pipeline stage) or scoped VMEM (TPU: double-buffered input
        and output blocks, the float32 accumulator, casts)."""
        isz = jnp.dtype(dtype).itemsize
        tm, tk, tn = self.tm, self.tk, self.tn
        if self.backend == "gpu":
            return max(self.num_stages, 1) * (tm * tk + tk * tn) * isz
        cast = 4 * (tm * tk + tk * tn) if self.f32_operands else 0
        # double-buffered blocks, the output tile, the accumulator and the dot's
        # float32 result (measured: Mosaic also materialises the loaded block)
        blocks = 2 * (tm * tk + tk * tn) * isz + 2 * tm * tn * isz
        return blocks + tm * tk * isz + 3 * 4 * tm * tn + cast

    @classmethod
    def for_shapes(
        cls,
        block_shape: tuple[int, int],
        n: int,
        *,
        dtype=jnp.float32,
        backend: str = "gpu",
        transpose: bool = False,
    ) -> SpmmConfig:
        """Defaults picked from the shapes (whole blocks; :func:`plan_spmm` then
        tiles them for the target): ``N`` tiles of up to 128 columns.

        GPU: ``tn`` is the next power of two of ``N`` (at least 16 so skinny ``N``
        still uses the tensor-core dot), at most 128. TPU: ``tn = N`` rounded up to
        a sublane multiple when ``N <= 128`` (a full-width block), else 128 (256
        for 16-bit types, one MXU pass).

        Example:
          >>> from pallas_kernels.bcsr import SpmmConfig
          >>> SpmmConfig.for_shapes((16, 16), 3).tn, SpmmConfig.for_shapes((16, 16), 300).tn
          (16, 128)
        """
        bm, bn = (int(b) for b in block_shape)
        if backend == "gpu":
            tn = min(128, max(MIN_DOT, next_pow2(n)))
            elements = bm * bn * tn
            num_warps = 8 if elements >= 128 * 128 * 64 else 4
            return cls((bm, bn), tn, backend, transpose, num_warps=num_warps)
        if n <= 128:
            tn = round_up(max(n, 1), tpu_sublane(dtype))
        else:
            tn = 256 if jnp.dtype(dtype).itemsize == 2 else 128
        return cls((bm, bn), tn, backend, transpose)


def plan_spmm(
    block_shape: tuple[int, int],
    n: int,
    dtype,
    *,
    backend: str,
    transpose: bool = False,
    target: Target | None = None,
) -> SpmmConfig:
    """The config for these shapes on ``target``, after every support check.

    Callers (the jsparse registry) use it to learn *before tracing anything*
    whether the kernel handles a configuration. Blocks are tiled inside the kernel
    (``tm x tk``) until the estimate of on-chip memory fits the target: Triton's
    shared memory per block on GPUs, the scoped VMEM limit on TPUs.

    Args:
      block_shape: ``(bm, bn)`` of the stored blocks.
      n: columns of the dense operand.
      dtype: the compute dtype.
      backend: ``"gpu"`` or ``"tpu"``.
      transpose: plan ``A.T @ X``.
      target: the chip; default :func:`~pallas_kernels.targets.current_target`.

    Returns:
      The :class:`SpmmConfig`.

    Raises:
      ValueError: an unknown backend or a non-positive size.
      Unsupported: the dtype or block shape is not supported by ``backend``, or no
        tiling of the block fits the target's memory (the message names both).

    Example:
      >>> from pallas_kernels.bcsr import plan_spmm
      >>> from pallas_kernels.targets import target_for_kind
      >>> plan_spmm((32, 32), 8, "bfloat16", backend="tpu").tn
      16
      >>> cfg = plan_spmm((256, 256), 512, "float32", backend="gpu",
      ...                 target=target_for_kind("NVIDIA H100 80GB HBM3"))
      >>> cfg.tm, cfg.tk, cfg.onchip_bytes("float32") <= 232448
      (128, 64, True)
      >>> plan_spmm((32, 32), 8, "float64", backend="gpu")
      Traceback (most recent call last):
      ...
      pallas_kernels.common.Unsupported: Pallas BCSR kernels support only float32, bfloat16, ...
    """
    check_dtype(dtype, kernel=_KERNELS)
    config = SpmmConfig.for_shapes(block_shape, n, dtype=dtype, backend=backend,
                                   transpose=transpose)  # fmt: skip
    if backend == "tpu" and any(b % tpu_sublane(dtype) for b in block_shape):
        raise Unsupported(
            f"the TPU BCSR kernel needs {jnp.dtype(dtype)} blocks in multiples of "
            f"{tpu_sublane(dtype)} rows, got {tuple(block_shape)}"
        )
    target = current_target(backend) if target is None else target
    if target.backend != backend:
        raise ValueError(f"target {target.name} is a {target.backend} target, not {backend}")
    f32 = backend == "tpu" and not target.bf16_matmul and jnp.dtype(dtype).itemsize == 2
    tm, tk = fit_tiles(
        config.out_block,
        config.in_block,
        lambda tm, tk: dataclasses.replace(config, tm=tm, tk=tk, f32_operands=f32).onchip_bytes(
            dtype
        ),
        target,
        cap=128 if backend == "gpu" else 1024,
        kernel="the BCSR SpMM kernel",
        request=f"blocks {tuple(block_shape)}, N tile {config.tn}, {jnp.dtype(dtype).name}",
    )
    num_warps = 8 if tm * tk * config.tn >= 128 * 128 * 64 else 4
    if backend == "tpu":
        num_warps = config.num_warps
    return dataclasses.replace(config, tm=tm, tk=tk, f32_operands=f32, num_warps=num_warps)


# ------------------------------------------------------------------ metadata
# Pattern utilities for references and tests; the kernels take their results as inputs.
def row_pointer(row_ids: jax.Array, nrows: int) -> jax.Array:
    """CSR pointer ``(nrows + 1,)`` from sorted block-row ids (jit-friendly).

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.bcsr import row_pointer
      >>> row_pointer(jnp.array([0, 0, 2]), 3).tolist()
      [0, 2, 2, 3]
    """
    bounds = jnp.arange(nrows + 1, dtype=jnp.int32)
    return jnp.searchsorted(row_ids.astype(jnp.int32), bounds, side="left").astype(jnp.int32)


def row_ids_from_pointer(indptr: jax.Array, nse: int) -> jax.Array:
    """Block-row of each stored block from a CSR pointer (jit-friendly).

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.bcsr import row_ids_from_pointer
      >>> row_ids_from_pointer(jnp.array([0, 2, 2, 3]), 3).tolist()
      [0, 0, 2]
    """
    pos = jnp.arange(nse, dtype=jnp.int32)
    return (jnp.searchsorted(indptr.astype(jnp.int32), pos, side="right") - 1).astype(jnp.int32)


def csc_view(
    indptr: jax.Array, indices: jax.Array, ncols: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The block metadata sorted by block-column (a CSC view), without moving data.

    What :func:`bcsr_spmm` takes as ``(ptr, perm, src)`` for ``transpose=True``. A
    reference utility (a stable argsort, jit-friendly): callers compute the view
    once with the pattern, not per product.

    Returns:
      ``colptr (ncols + 1,)``: the blocks of block-column ``c`` are CSC positions
      ``colptr[c]:colptr[c + 1]``; ``perm (nse,)``: the stored block at each
      position; ``rows (nse,)``: its block-row. Within a column, blocks keep their
      row order (stable sort).

    Example:
      Blocks at (row 0, col 1), (row 1, col 0), (row 1, col 1):

      >>> import jax.numpy as jnp
      >>> from pallas_kernels.bcsr import csc_view
      >>> colptr, perm, rows = csc_view(jnp.array([0, 1, 3]), jnp.array([1, 0, 1]), 2)
      >>> colptr.tolist(), perm.tolist(), rows.tolist()
      ([0, 1, 3], [1, 0, 2], [1, 0, 1])
    """
    nse = indices.shape[0]
    rows = row_ids_from_pointer(indptr, nse)
    perm = jnp.argsort(indices.astype(jnp.int32), stable=True).astype(jnp.int32)
    cols_sorted = indices.astype(jnp.int32)[perm]
    return row_pointer(cols_sorted, ncols), perm, rows[perm]


def _tpu_schedule(ptr: jax.Array, nrows: int, nse: int):
    """Grid steps for the TPU kernel: ``(row, position, valid, first)`` per step.

    Computed from the pointer on every call (a few small ``jnp`` ops on ``nrows``
    and ``nse`` elements).

    Block-row ``r`` owns ``max(count_r, 1)`` consecutive steps; the ``nse + nrows``
    static steps leave a tail that repeats the last row with ``valid = 0``.
    """
    counts = ptr[1:] - ptr[:-1]
    steps = jnp.maximum(counts, 1)
    ends = jnp.cumsum(steps)
    starts = ends - steps
    s = jnp.arange(nse + nrows, dtype=jnp.int32)
    row = jnp.minimum(jnp.searchsorted(ends, s, side="right"), nrows - 1).astype(jnp.int32)
    k = s - starts[row]
    valid = (k < counts[row]).astype(jnp.int32)
    first = (k == 0).astype(jnp.int32)
    pos = jnp.clip(ptr[row] + k, 0, max(nse - 1, 0)).astype(jnp.int32)
    return row, pos, valid, first


# ------------------------------------------------------------------ kernels
def _block_product(a, xt, *, transpose: bool, use_dot: bool, f32: bool = False):
    """``a @ xt`` (``a.T @ xt`` when transposed) in float32."""
    if f32:
        a, xt = a.astype(jnp.float32), xt.astype(jnp.float32)
    if use_dot:
        dims = (((0,), (0,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))
        return lax.dot_general(a, xt, dims, preferred_element_type=jnp.float32)
    a32, x32 = a.astype(jnp.float32), xt.astype(jnp.float32)
    if transpose:
        return jnp.sum(a32[:, :, None] * x32[:, None, :], axis=0)
    return jnp.sum(a32[:, :, None] * x32[None, :, :], axis=1)


def _gpu_kernel(*refs, cfg: SpmmConfig, has_perm: bool):
    if has_perm:
        ptr_ref, perm_ref, src_ref, data_ref, x_ref, o_ref = refs
    else:
        (ptr_ref, src_ref, data_ref, x_ref, o_ref), perm_ref = refs, None
    # Program i computes rows [sub * tm, (sub + 1) * tm) of output block-row `row`.
    i, j = pl.program_id(0), pl.program_id(1)
    per_row = cfg.out_block // cfg.tm
    row, sub = i // per_row, i % per_row
    b_in, tn, tm, tk = cfg.in_block, cfg.tn, cfg.tm, cfg.tk
    ksteps = b_in // tk
    use_dot = min(tm, tk, tn) >= MIN_DOT
    r0 = pl.multiple_of(sub * tm, tm)

    def body(p, acc):
        blk = p if perm_ref is None else perm_ref[p]
        x0 = src_ref[p] * b_in

        def step(kk, acc):
            k0 = 0 if ksteps == 1 else pl.multiple_of(kk * tk, tk)
            if cfg.transpose:  # the block is (in, out): rows k0.., columns r0..
                a = data_ref[blk, pl.ds(k0, tk), pl.ds(r0, tm)]
            else:
                a = data_ref[blk, pl.ds(r0, tm), pl.ds(k0, tk)]
            xt = x_ref[pl.ds(pl.multiple_of(x0 + k0, tk), tk), pl.ds(j * tn, tn)]
            return acc + _block_product(a, xt, transpose=cfg.transpose, use_dot=use_dot)

        if ksteps == 1:
            return step(0, acc)
        return lax.fori_loop(0, ksteps, step, acc)

    acc = jnp.zeros((tm, tn), jnp.float32)
    acc = lax.fori_loop(ptr_ref[row], ptr_ref[row + 1], body, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def _tpu_kernel(
    row_ref, blk_ref, src_ref, valid_ref, first_ref, data_ref, x_ref, o_ref, acc_ref,
    *, cfg: SpmmConfig,
):  # fmt: skip
    del row_ref, blk_ref, src_ref  # consumed by the index maps
    s, kk = pl.program_id(2), pl.program_id(3)

    @pl.when(jnp.logical_and(first_ref[s] == 1, kk == 0))
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid_ref[s] == 1)
    def _():
        a = data_ref[0]
        if cfg.transpose:
            a = a.T
        x = x_ref[...]
        if cfg.f32_operands:
            a, x = a.astype(jnp.float32), x.astype(jnp.float32)
        acc_ref[...] += jnp.dot(a, x, preferred_element_type=jnp.float32)

    # The output tile of a row is written back when the grid moves to another row;
    # storing on every step keeps it correct whichever step is the row's last.
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


# ------------------------------------------------------------------ wrapper
# jit with static configuration: eager calls hit the compilation cache instead of
# re-tracing the kernel (inside an outer jit it is an ordinary nested call).
@functools.partial(
    jax.jit, static_argnames=("shape", "transpose", "backend", "config", "interpret")
)
def bcsr_spmm(
    data: jax.Array,
    ptr: jax.Array,
    src: jax.Array,
    x: jax.Array,
    *,
    perm: jax.Array | None = None,
    shape: tuple[int, int],
    transpose: bool = False,
    backend: str = "gpu",
    config: SpmmConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``A @ x`` (or ``A.T @ x``) for a BCSR ``A`` of ``shape``, as a Pallas kernel.

    Args:
      data: ``(nse, bm, bn)`` stored blocks.
      ptr: int32 pointer over positions per output block-row: the CSR row pointer
        ``indptr (M // bm + 1,)``, or when ``transpose`` the CSC column pointer
        ``(K // bn + 1,)``.
      src: ``(nse,)`` int32 block-row of ``x`` that each position reads: the
        block-column ``indices`` of each stored block, or when ``transpose`` the
        block-row of the block at each CSC position.
      x: dense ``(K, N)`` (``(M, N)`` when ``transpose``); any ``N >= 1``.
      perm: ``(nse,)`` int32 stored block at each position. ``None`` is the
        identity (position ``p`` reads block ``p``: CSR order, as for ``A @ X``);
        for ``transpose`` pass the CSC view's ``perm`` (the stable argsort of
        ``indices``, see :func:`csc_view`).
      shape: ``(M, K)`` of ``A``.
      transpose: multiply by ``A.T``.
      backend: ``"gpu"`` (Triton kernel) or ``"tpu"`` (Mosaic kernel).
      config: tile sizes; default :func:`plan_spmm`.
      interpret: run the kernel in the Pallas interpreter (any platform, e.g. CPU).

    Returns:
      ``(M, N)`` (``(K, N)`` when transposed) in ``x.dtype``, accumulated in float32.

    Raises:
      ValueError: inconsistent shapes or a config for other shapes.
      Unsupported: a dtype or block shape the backend's kernel cannot handle.

    Example:
      Two 16x16 blocks of ones at block (0, 1) and (1, 0), in the interpreter:

      >>> import jax.numpy as jnp
      >>> from pallas_kernels.bcsr import bcsr_spmm, csc_view
      >>> data = jnp.ones((2, 16, 16))
      >>> indptr, indices = jnp.array([0, 1, 2]), jnp.array([1, 0])
      >>> x = jnp.concatenate([jnp.ones((16, 2)), 2 * jnp.ones((16, 2))])
      >>> y = bcsr_spmm(data, indptr, indices, x, shape=(32, 32), interpret=True)
      >>> y[0].tolist(), y[16].tolist()
      ([32.0, 32.0], [16.0, 16.0])
      >>> colptr, perm, rows = csc_view(indptr, indices, 2)
      >>> yt = bcsr_spmm(data, colptr, rows, x, perm=perm, shape=(32, 32), transpose=True,
      ...                interpret=True)
      >>> yt[0].tolist()  # A is symmetric here
      [32.0, 32.0]
    """
    if data.ndim != 3:
        raise ValueError(f"bcsr_spmm: data must be (nse, bm, bn), got {data.shape}")
    nse, bm, bn = data.shape
    m, k = shape
    if m % bm or k % bn:
        raise ValueError(f"block shape {(bm, bn)} does not divide the shape {shape}")
    rows_in = m if transpose else k
    if x.ndim != 2 or x.shape[0] != rows_in:
        raise ValueError(
            f"bcsr_spmm: x must be ({rows_in}, N) for A {shape} (transpose={transpose}), "
            f"got {x.shape}"
        )
    out_rows_blocks = k // bn if transpose else m // bm
    if ptr.shape != (out_rows_blocks + 1,):
        pointer = "column pointer (K // bn + 1,)" if transpose else "row pointer (M // bm + 1,)"
        raise ValueError(
            f"bcsr_spmm: ptr must be the {pointer} = ({out_rows_blocks + 1},) for A {shape} "
            f"and blocks {(bm, bn)}, got {ptr.shape}"
        )
    for name, arr in (("src", src), ("perm", perm)):
        if arr is not None and arr.shape != (nse,):
            raise ValueError(f"bcsr_spmm: {name} must be (nse,) = ({nse},), got {arr.shape}")
    n = x.shape[1]
    dtype = jnp.promote_types(data.dtype, x.dtype)
    if config is None:
        config = plan_spmm((bm, bn), n, dtype, backend=backend, transpose=transpose)
    else:
        check_dtype(data.dtype, x.dtype, kernel=_KERNELS)
    if config.block_shape != (bm, bn) or config.transpose != transpose:
        raise ValueError(f"config {config} does not match block shape {(bm, bn)}, {transpose=}")
    out_rows = out_rows_blocks * config.out_block
    if nse == 0 or n == 0:
        return jnp.zeros((out_rows, n), x.dtype)
    data = data.astype(dtype)
    n_pad = config.padded_n(n)
    xp = x.astype(dtype)
    if n_pad != n:
        xp = jnp.pad(xp, ((0, 0), (0, n_pad - n)))
    ptr, src = ptr.astype(jnp.int32), src.astype(jnp.int32)
    if perm is not None:
        perm = perm.astype(jnp.int32)
    out_shape = out_struct((out_rows, n_pad), x.dtype)
    grid_n = n_pad // config.tn
    if config.backend == "gpu":
        index_arrays = (ptr, src) if perm is None else (ptr, perm, src)
        y = pl.pallas_call(
            functools.partial(_gpu_kernel, cfg=config, has_perm=perm is not None),
            grid=(out_rows // config.tm, grid_n),
            in_specs=[pl.no_block_spec] * (len(index_arrays) + 2),
            out_specs=pl.BlockSpec((config.tm, config.tn), lambda i, j: (i, j)),
            out_shape=out_shape,
            compiler_params=pltriton.CompilerParams(
                num_warps=config.num_warps, num_stages=config.num_stages
            ),
            interpret=interpret,
            name="bcsr_spmm_t" if transpose else "bcsr_spmm",
        )(*index_arrays, data, xp)
    else:
        y = _tpu_call(config, ptr, perm, src, data, xp, out_shape, out_rows_blocks, interpret)
    return y[:, :n] if n_pad != n else y


def _tpu_call(cfg, ptr, perm, src, data, xp, out_shape, nrows, interpret):
    nse = data.shape[0]
    row, pos, valid, first = _tpu_schedule(ptr, nrows, nse)
    blk = pos if perm is None else perm[pos]
    src = src[pos]
    tm, tk, tn = cfg.tm, cfg.tk, cfg.tn
    per_row, ksteps = cfg.out_block // tm, cfg.in_block // tk

    # Grid (N tile j, output sub-row t, schedule step s, contraction sub-tile kk);
    # index maps receive the grid indices, then the scalar-prefetch refs.
    if cfg.transpose:  # the stored block is (in, out)
        data_block = (1, tk, tm)

        def data_map(j, t, s, kk, row, blk, src, valid, first):
            return blk[s], kk, t
    else:
        data_block = (1, tm, tk)

        def data_map(j, t, s, kk, row, blk, src, valid, first):
            return blk[s], t, kk

    def x_map(j, t, s, kk, row, blk, src, valid, first):
        return src[s] * ksteps + kk, j

    def out_map(j, t, s, kk, row, blk, src, valid, first):
        return row[s] * per_row + t, j

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(xp.shape[1] // tn, per_row, row.shape[0], ksteps),
        in_specs=[pl.BlockSpec(data_block, data_map), pl.BlockSpec((tk, tn), x_map)],
        out_specs=pl.BlockSpec((tm, tn), out_map),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_tpu_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret,
        name="bcsr_spmm_t_tpu" if cfg.transpose else "bcsr_spmm_tpu",
    )(row, blk, src, valid, first, data, xp)


# ------------------------------------------------------------------ reference
def bcsr_spmm_reference(
    data: jax.Array,
    indptr: jax.Array,
    indices: jax.Array,
    x: jax.Array,
    *,
    shape: tuple[int, int],
    transpose: bool = False,
) -> jax.Array:
    """Pure-``jnp`` reference of :func:`bcsr_spmm` from the CSR metadata (also for
    ``transpose``): gather the ``X`` blocks, one einsum, a segment sum.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.bcsr import bcsr_spmm_reference
      >>> data = jnp.arange(4.0).reshape(1, 2, 2)  # one block at block (1, 0)
      >>> y = bcsr_spmm_reference(data, jnp.array([0, 0, 1]), jnp.array([0]),
      ...                         jnp.ones((4, 1)), shape=(4, 4))
      >>> y[:, 0].tolist()
      [0.0, 0.0, 1.0, 5.0]
    """
    nse, bm, bn = data.shape
    m, k = shape
    rows = row_ids_from_pointer(indptr, nse)
    cols = indices.astype(jnp.int32)
    n = x.shape[1]
    if transpose:
        xb = x.reshape(m // bm, bm, n)[rows]
        y = jnp.einsum("bij,bin->bjn", data, xb, preferred_element_type=jnp.float32)
        out = jax.ops.segment_sum(y, cols, num_segments=k // bn).reshape(k, n)
    else:
        xb = x.reshape(k // bn, bn, n)[cols]
        y = jnp.einsum("bij,bjn->bin", data, xb, preferred_element_type=jnp.float32)
        out = jax.ops.segment_sum(y, rows, num_segments=m // bm).reshape(m, n)
    return out.astype(x.dtype)
