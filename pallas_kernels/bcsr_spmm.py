"""Block-sparse (BCSR) times dense as Pallas kernels: ``Y = A @ X`` and ``Y = A.T @ X``.

``A`` (``shape = (M, K)``) is given by its stored blocks ``data (nse, bm, bn)``, the
row pointer ``indptr (M // bm + 1,)`` and the block-column of each block
``indices (nse,)``. Arrays in, arrays out: nothing here knows about autodiff or the
jsparse formats.

Two kernels, one per hardware family:

* **GPU** (Triton backend): the grid is ``(output block-row, N tile)``. Each
  program reads its slice of the row pointer from the index arrays (ordinary
  inputs: scalar prefetch is TPU-only) and runs a ``fori_loop`` with
  data-dependent bounds over the blocks of its row, accumulating in float32
  registers. Empty block-rows run zero iterations and store zeros.
* **TPU** (Mosaic): a ``PrefetchScalarGridSpec`` whose grid walks a *schedule* of
  ``(block-row, stored block)`` steps computed in ``jnp`` by the wrapper. Each
  block-row owns ``max(count, 1)`` consecutive steps, so empty rows are visited
  once (to write zeros) and the output tile of a row stays resident in VMEM while
  its blocks are accumulated. The schedule has the static length ``nse + nrows``;
  unused trailing steps repeat the last row and do nothing.

The transposed product reads the same blocks through a *CSC view* of the block
metadata (:func:`csc_view`: a stable argsort by block-column, jit-friendly): a
column pointer, the permutation from CSC position to stored block, and the
block-row of each position. ``A.T`` is never formed: each block is transposed in
registers/VMEM.

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

__all__ = [
    "SpmmConfig",
    "bcsr_spmm",
    "bcsr_spmm_reference",
    "csc_view",
    "plan_spmm",
    "row_pointer",
]

BACKENDS = ("gpu", "tpu")
# dtypes the kernels accept (no float64 on accelerators' matrix units).
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Triton's tensor-core dot needs every dimension >= 16; below that the GPU kernel
# multiplies with a broadcast and a reduction instead.
_TRITON_MIN_DOT = 16


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def check_dtype(*dtypes) -> None:
    """NotImplementedError for a dtype no kernel supports (e.g. float64)."""
    for d in dtypes:
        if jnp.dtype(d) not in SUPPORTED_DTYPES:
            raise NotImplementedError(
                f"Pallas BCSR kernels support float32, bfloat16 and float16, got {jnp.dtype(d)}"
            )


def tpu_sublane(dtype) -> int:
    """Second-minor tile of a TPU vreg for ``dtype`` (8 for 32-bit, 16 for 16-bit)."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


@dataclasses.dataclass(frozen=True)
class SpmmConfig:
    """Static configuration of one SpMM launch.

    Attributes:
      block_shape: ``(bm, bn)``, the stored block shape of ``A``.
      tn: columns of ``X`` per program; the wrapper pads ``N`` to a multiple.
      backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic).
      transpose: compute ``A.T @ X``.
      num_warps, num_stages: Triton launch parameters (GPU only).

    Raises (at construction):
      ValueError: a non-positive size or an unknown backend.
      NotImplementedError: a shape the backend's kernel cannot tile (the
        registry then falls back to another implementation).
    """

    block_shape: tuple[int, int]
    tn: int
    backend: str = "gpu"
    transpose: bool = False
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        bm, bn = self.block_shape
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if min(bm, bn, self.tn) <= 0:
            raise ValueError(
                f"block_shape and tn must be positive, got {self.block_shape}, {self.tn}"
            )
        if self.backend == "gpu":
            # Triton tiles are powers of two in every dimension.
            for name, v in (("bm", bm), ("bn", bn), ("tn", self.tn)):
                if not _is_pow2(v):
                    raise NotImplementedError(
                        f"the Triton BCSR kernel needs power-of-two tiles; {name}={v}"
                    )
        else:
            if bm % 8 or bn % 8:
                raise NotImplementedError(
                    f"the TPU BCSR kernel needs bm and bn multiples of 8, got {self.block_shape}"
                )
            if self.tn % 128 and self.tn % 8:
                raise NotImplementedError(f"TPU tn must be a multiple of 128 (or 8), got {self.tn}")

    @property
    def out_block(self) -> int:
        """Rows of one output tile (``bn`` when transposed)."""
        return self.block_shape[1] if self.transpose else self.block_shape[0]

    @property
    def in_block(self) -> int:
        """Rows of ``X`` one stored block reads."""
        return self.block_shape[0] if self.transpose else self.block_shape[1]

    def padded_n(self, n: int) -> int:
        return _round_up(max(n, 1), self.tn)

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
        """Defaults picked from the shapes: ``N`` tiles of up to 128 columns.

        GPU: ``tn`` is the next power of two of ``N`` (at least 16 so skinny ``N``
        still uses the tensor-core dot), at most 128. TPU: ``tn = N`` rounded up to
        a sublane multiple when ``N <= 128`` (a full-width block), else 128 (256
        for 16-bit types, one MXU pass).
        """
        bm, bn = (int(b) for b in block_shape)
        if backend == "gpu":
            tn = min(128, max(_TRITON_MIN_DOT, _next_pow2(n)))
            elements = bm * bn * tn
            num_warps = 8 if elements >= 128 * 128 * 64 else 4
            return cls((bm, bn), tn, backend, transpose, num_warps=num_warps)
        if n <= 128:
            tn = _round_up(max(n, 1), tpu_sublane(dtype))
        else:
            tn = 256 if jnp.dtype(dtype).itemsize == 2 else 128
        return cls((bm, bn), tn, backend, transpose)


def plan_spmm(
    block_shape: tuple[int, int], n: int, dtype, *, backend: str, transpose: bool = False
) -> SpmmConfig:
    """The default config for these shapes, after every support check.

    Callers (the jsparse registry) use it to learn *before tracing anything*
    whether the kernel handles a configuration.

    Raises:
      NotImplementedError: the dtype or block shape is not supported by ``backend``.
    """
    check_dtype(dtype)
    config = SpmmConfig.for_shapes(block_shape, n, dtype=dtype, backend=backend,
                                   transpose=transpose)  # fmt: skip
    if backend == "tpu" and any(b % tpu_sublane(dtype) for b in block_shape):
        raise NotImplementedError(
            f"the TPU BCSR kernel needs {jnp.dtype(dtype)} blocks in multiples of "
            f"{tpu_sublane(dtype)} rows, got {tuple(block_shape)}"
        )
    return config


# ------------------------------------------------------------------ metadata
def row_pointer(row_ids: jax.Array, nrows: int) -> jax.Array:
    """CSR pointer ``(nrows + 1,)`` from sorted block-row ids (jit-friendly)."""
    bounds = jnp.arange(nrows + 1, dtype=jnp.int32)
    return jnp.searchsorted(row_ids.astype(jnp.int32), bounds, side="left").astype(jnp.int32)


def row_ids_from_pointer(indptr: jax.Array, nse: int) -> jax.Array:
    """Block-row of each stored block from a CSR pointer (jit-friendly)."""
    pos = jnp.arange(nse, dtype=jnp.int32)
    return (jnp.searchsorted(indptr.astype(jnp.int32), pos, side="right") - 1).astype(jnp.int32)


def csc_view(
    indptr: jax.Array, indices: jax.Array, ncols: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The block metadata sorted by block-column (a CSC view), without moving data.

    Returns:
      ``colptr (ncols + 1,)``: the blocks of block-column ``c`` are CSC positions
      ``colptr[c]:colptr[c + 1]``; ``perm (nse,)``: the stored block at each
      position; ``rows (nse,)``: its block-row. Within a column, blocks keep their
      row order (stable sort).
    """
    nse = indices.shape[0]
    rows = row_ids_from_pointer(indptr, nse)
    perm = jnp.argsort(indices.astype(jnp.int32), stable=True).astype(jnp.int32)
    cols_sorted = indices.astype(jnp.int32)[perm]
    return row_pointer(cols_sorted, ncols), perm, rows[perm]


def _tpu_schedule(ptr: jax.Array, nrows: int, nse: int):
    """Grid steps for the TPU kernel: ``(row, position, valid, first)`` per step.

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
def _block_product(a, xt, *, transpose: bool, use_dot: bool):
    """``a @ xt`` (``a.T @ xt`` when transposed) in float32."""
    if use_dot:
        dims = (((0,), (0,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))
        return lax.dot_general(a, xt, dims, preferred_element_type=jnp.float32)
    a32, x32 = a.astype(jnp.float32), xt.astype(jnp.float32)
    if transpose:
        return jnp.sum(a32[:, :, None] * x32[:, None, :], axis=0)
    return jnp.sum(a32[:, :, None] * x32[None, :, :], axis=1)


def _gpu_kernel(ptr_ref, perm_ref, src_ref, data_ref, x_ref, o_ref, *, cfg: SpmmConfig):
    i, j = pl.program_id(0), pl.program_id(1)
    b_in, tn = cfg.in_block, cfg.tn
    use_dot = min(cfg.block_shape + (tn,)) >= _TRITON_MIN_DOT

    def body(p, acc):
        blk = perm_ref[p] if cfg.transpose else p
        src = src_ref[p]
        a = data_ref[blk]
        xt = x_ref[pl.ds(pl.multiple_of(src * b_in, b_in), b_in), pl.ds(j * tn, tn)]
        return acc + _block_product(a, xt, transpose=cfg.transpose, use_dot=use_dot)

    acc = jnp.zeros((cfg.out_block, tn), jnp.float32)
    acc = lax.fori_loop(ptr_ref[i], ptr_ref[i + 1], body, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


def _tpu_kernel(
    row_ref, blk_ref, src_ref, valid_ref, first_ref, data_ref, x_ref, o_ref, acc_ref,
    *, cfg: SpmmConfig,
):  # fmt: skip
    del row_ref, blk_ref, src_ref  # consumed by the index maps
    s = pl.program_id(1)

    @pl.when(first_ref[s] == 1)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(valid_ref[s] == 1)
    def _():
        a = data_ref[0]
        if cfg.transpose:
            a = a.T
        acc_ref[...] += jnp.dot(a, x_ref[...], preferred_element_type=jnp.float32)

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
    indptr: jax.Array,
    indices: jax.Array,
    x: jax.Array,
    *,
    shape: tuple[int, int],
    transpose: bool = False,
    backend: str = "gpu",
    config: SpmmConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """``A @ x`` (or ``A.T @ x``) for a BCSR ``A`` of ``shape``, as a Pallas kernel.

    Args:
      data: ``(nse, bm, bn)`` stored blocks.
      indptr: ``(M // bm + 1,)`` int32 row pointer.
      indices: ``(nse,)`` int32 block-column of each block.
      x: dense ``(K, N)`` (``(M, N)`` when ``transpose``); any ``N >= 1``.
      shape: ``(M, K)`` of ``A``.
      transpose: multiply by ``A.T`` (reads the blocks through :func:`csc_view`).
      backend: ``"gpu"`` (Triton kernel) or ``"tpu"`` (Mosaic kernel).
      config: tile sizes; default :meth:`SpmmConfig.for_shapes`.
      interpret: run the kernel in the Pallas interpreter (any platform, e.g. CPU).

    Returns:
      ``(M, N)`` (``(K, N)`` when transposed) in ``x.dtype``, accumulated in float32.

    Raises:
      ValueError: inconsistent shapes.
      NotImplementedError: a dtype or block shape the backend's kernel cannot handle.
    """
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
    n = x.shape[1]
    dtype = jnp.promote_types(data.dtype, x.dtype)
    if config is None:
        config = plan_spmm((bm, bn), n, dtype, backend=backend, transpose=transpose)
    else:
        check_dtype(data.dtype, x.dtype)
    if config.block_shape != (bm, bn) or config.transpose != transpose:
        raise ValueError(f"config {config} does not match block shape {(bm, bn)}, {transpose=}")
    nbr, nbc = m // bm, k // bn
    out_rows_blocks = nbc if transpose else nbr
    out_rows = out_rows_blocks * config.out_block
    if nse == 0 or n == 0:
        return jnp.zeros((out_rows, n), x.dtype)
    data = data.astype(dtype)
    n_pad = config.padded_n(n)
    xp = x.astype(dtype)
    if n_pad != n:
        xp = jnp.pad(xp, ((0, 0), (0, n_pad - n)))
    if transpose:
        ptr, perm, src = csc_view(indptr, indices, nbc)
    else:
        ptr = indptr.astype(jnp.int32)
        perm = jnp.arange(nse, dtype=jnp.int32)
        src = indices.astype(jnp.int32)
    out_shape = jax.ShapeDtypeStruct((out_rows, n_pad), x.dtype)
    grid_n = n_pad // config.tn
    if config.backend == "gpu":
        y = pl.pallas_call(
            functools.partial(_gpu_kernel, cfg=config),
            grid=(out_rows_blocks, grid_n),
            in_specs=[pl.no_block_spec] * 5,
            out_specs=pl.BlockSpec((config.out_block, config.tn), lambda i, j: (i, j)),
            out_shape=out_shape,
            compiler_params=pltriton.CompilerParams(
                num_warps=config.num_warps, num_stages=config.num_stages
            ),
            interpret=interpret,
            name="bcsr_spmm_t" if transpose else "bcsr_spmm",
        )(ptr, perm, src, data, xp)
    else:
        y = _tpu_call(config, ptr, perm, src, data, xp, out_shape, out_rows_blocks, interpret)
    return y[:, :n] if n_pad != n else y


def _tpu_call(cfg, ptr, perm, src, data, xp, out_shape, nrows, interpret):
    nse = data.shape[0]
    row, pos, valid, first = _tpu_schedule(ptr, nrows, nse)
    blk, src = perm[pos], src[pos]
    _, bm, bn = data.shape
    b_in, b_out, tn = cfg.in_block, cfg.out_block, cfg.tn

    # Index maps receive the grid indices, then the scalar-prefetch refs.
    def data_map(j, s, row, blk, src, valid, first):
        return blk[s], 0, 0

    def x_map(j, s, row, blk, src, valid, first):
        return src[s], j

    def out_map(j, s, row, blk, src, valid, first):
        return row[s], j

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(xp.shape[1] // tn, row.shape[0]),
        in_specs=[
            pl.BlockSpec((1, bm, bn), data_map),
            pl.BlockSpec((b_in, tn), x_map),
        ],
        out_specs=pl.BlockSpec((b_out, tn), out_map),
        scratch_shapes=[pltpu.VMEM((b_out, tn), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_tpu_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
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
    """Pure-``jnp`` reference: gather the ``X`` blocks, one einsum, a segment sum."""
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
