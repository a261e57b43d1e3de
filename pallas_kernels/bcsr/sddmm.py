"""Block-sampled dense-dense matmul (SDDMM) as Pallas kernels.

For stored block ``b`` at block coordinates ``(r, c)`` the kernel computes
``out[b] = u[r*bm:(r+1)*bm] @ v[c*bn:(c+1)*bn].T``, i.e. the blocks of ``u @ v.T``
at a BCSR pattern. It is the ``dA`` of ``Y = A @ X`` (``u = dY``, ``v = X``)
without forming the dense ``dY @ X.T``.

* **GPU** (Triton backend): grid over stored blocks; each program reads its
  ``(row, col)`` from the index arrays and loops over the contraction axis in
  tiles of ``tj``, accumulating a ``(bm, bn)`` float32 tile.
* **TPU** (Mosaic): ``PrefetchScalarGridSpec`` with the block coordinates as
  scalar prefetch, grid ``(stored block, J tile)``; the index maps pick the
  ``u``/``v`` tiles, a VMEM float32 scratch accumulates over the J tiles.

The output has ``u``'s dtype. Arrays in, arrays out: no autodiff, no formats.
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

__all__ = ["SddmmConfig", "bcsr_sddmm", "bcsr_sddmm_reference", "plan_sddmm"]

_KERNELS = "Pallas SDDMM kernels"


@dataclasses.dataclass(frozen=True)
class SddmmConfig:
    """Static configuration of one SDDMM launch.

    Attributes:
      block_shape: ``(bm, bn)`` of the sampled blocks.
      tj: contraction columns per step; the wrapper pads ``J`` to a multiple.
      backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic).
      num_warps, num_stages: Triton launch parameters (GPU only).
      tm, tn: the output tile of one program, dividing ``(bm, bn)``; ``None``: the
        whole block. :func:`plan_sddmm` tiles large blocks to fit the target.
      f32_operands: multiply in float32 (TPU v2/v3: Mosaic has no bfloat16 matmul).

    Raises (at construction):
      ValueError: non-positive sizes, tiles that do not divide the block, or an
        unknown backend.
      Unsupported: tiles the backend cannot handle.

    Example:
      >>> from pallas_kernels.bcsr import SddmmConfig
      >>> SddmmConfig((16, 16), 32).padded_j(40)
      64
    """

    block_shape: tuple[int, int]
    tj: int
    backend: str = "gpu"
    num_warps: int = 4
    num_stages: int = 2
    tm: int | None = None
    tn: int | None = None
    f32_operands: bool = False

    def __post_init__(self):
        bm, bn = self.block_shape
        check_backend(self.backend)
        if min(bm, bn, self.tj) <= 0:
            raise ValueError(
                f"block_shape and tj must be positive, got {self.block_shape}, {self.tj}"
            )
        if self.tm is None:
            object.__setattr__(self, "tm", bm)
        if self.tn is None:
            object.__setattr__(self, "tn", bn)
        for name, t, side in (("tm", self.tm, bm), ("tn", self.tn, bn)):
            if t <= 0 or side % t:
                raise ValueError(f"{name}={t} must divide the block side {side}")
        if self.backend == "gpu":
            for name, v in (("bm", bm), ("bn", bn), ("tj", self.tj)):
                if not is_pow2(v):
                    raise Unsupported(
                        f"the Triton SDDMM kernel needs power-of-two tiles; {name}={v}"
                    )
        else:
            if bm % 8 or bn % 8:
                raise Unsupported(
                    f"the TPU SDDMM kernel needs bm and bn multiples of 8, got {self.block_shape}"
                )
            if (self.tn != bn and self.tn % 128) or (self.tm != bm and self.tm % 8):
                raise Unsupported(
                    f"the TPU SDDMM kernel tiles blocks in multiples of (8, 128); got tiles "
                    f"tm={self.tm}, tn={self.tn} of block {self.block_shape}"
                )

    def padded_j(self, j: int) -> int:
        return round_up(max(j, 1), self.tj)

    def onchip_bytes(self, dtype) -> int:
        """Estimated on-chip bytes of one program: shared memory (GPU: both dot
        operands of each pipeline stage) or scoped VMEM (TPU: double-buffered input
        and output tiles, the float32 accumulator, casts)."""
        isz = jnp.dtype(dtype).itemsize
        tm, tn, tj = self.tm, self.tn, self.tj
        if self.backend == "gpu":
            return max(self.num_stages, 1) * (tm + tn) * tj * isz
        cast = 4 * (tm + tn) * tj if self.f32_operands else 0
        return 2 * (tm + tn) * tj * isz + 2 * tm * tn * isz + 3 * 4 * tm * tn + cast

    @classmethod
    def for_shapes(
        cls, block_shape: tuple[int, int], j: int, *, dtype=jnp.float32, backend: str = "gpu"
    ) -> SddmmConfig:
        """Whole blocks (:func:`plan_sddmm` then tiles them for the target). GPU:
        ``tj`` = next power of two of ``J`` in ``[16, 64]``. TPU: the whole ``J``
        (rounded up to 128) when ``J <= 512``, else 512.

        Example:
          >>> from pallas_kernels.bcsr import SddmmConfig
          >>> SddmmConfig.for_shapes((16, 16), 40).tj
          64
          >>> SddmmConfig.for_shapes((16, 16), 40, backend="tpu").tj
          128
        """
        bm, bn = (int(b) for b in block_shape)
        if backend == "gpu":
            return cls((bm, bn), min(64, max(MIN_DOT, next_pow2(j))), backend)
        tj = round_up(max(j, 1), 128) if j <= 512 else 512
        return cls((bm, bn), tj, backend)


def plan_sddmm(
    block_shape: tuple[int, int], j: int, dtype, *, backend: str, target: Target | None = None
) -> SddmmConfig:
    """The config for these shapes on ``target``, after every support check.

    Output blocks are tiled (``tm x tn`` per program) until the estimate of
    on-chip memory fits the target (Triton's shared memory per block, or 3/4 of the
    TPU's scoped VMEM limit); GPU tiles are at most 128 (the float32 accumulator
    lives in registers).

    Args:
      block_shape: ``(bm, bn)`` of the sampled blocks.
      j: the contraction length.
      dtype: the compute dtype.
      backend: ``"gpu"`` or ``"tpu"``.
      target: the chip; default :func:`~pallas_kernels.targets.current_target`.

    Returns:
      The :class:`SddmmConfig`.

    Raises:
      ValueError: an unknown backend or a non-positive size.
      Unsupported: the dtype or block shape is not supported by ``backend``, or no
        tiling fits the target's memory.

    Example:
      >>> from pallas_kernels.bcsr import plan_sddmm
      >>> plan_sddmm((8, 8), 64, "float32", backend="tpu").tj
      128
      >>> plan_sddmm((256, 256), 64, "float32", backend="gpu").tm
      128
      >>> plan_sddmm((8, 8), 64, "bfloat16", backend="tpu")
      Traceback (most recent call last):
      ...
      pallas_kernels.common.Unsupported: the TPU SDDMM kernel needs bfloat16 blocks in multiples ...
    """
    check_dtype(dtype, kernel=_KERNELS)
    config = SddmmConfig.for_shapes(block_shape, j, dtype=dtype, backend=backend)
    if backend == "tpu" and any(b % tpu_sublane(dtype) for b in block_shape):
        raise Unsupported(
            f"the TPU SDDMM kernel needs {jnp.dtype(dtype)} blocks in multiples of "
            f"{tpu_sublane(dtype)} rows, got {tuple(block_shape)}"
        )
    target = current_target(backend) if target is None else target
    if target.backend != backend:
        raise ValueError(f"target {target.name} is a {target.backend} target, not {backend}")
    f32 = backend == "tpu" and not target.bf16_matmul and jnp.dtype(dtype).itemsize == 2
    tm, tn = fit_tiles(
        config.block_shape[0],
        config.block_shape[1],
        lambda tm, tn: dataclasses.replace(config, tm=tm, tn=tn, f32_operands=f32).onchip_bytes(
            dtype
        ),
        target,
        cap=128 if backend == "gpu" else 1024,
        kernel="the BCSR SDDMM kernel",
        request=f"blocks {tuple(block_shape)}, J tile {config.tj}, {jnp.dtype(dtype).name}",
    )
    num_warps = 8 if backend == "gpu" and tm * tn * config.tj >= 128 * 128 * 64 else 4
    return dataclasses.replace(config, tm=tm, tn=tn, f32_operands=f32, num_warps=num_warps)


def _gpu_kernel(rows_ref, cols_ref, u_ref, v_ref, o_ref, *, cfg: SddmmConfig, steps: int):
    # Program (b, ti, tc) computes the (tm, tn) tile (ti, tc) of stored block b.
    b, ti, tc = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bm, bn = cfg.block_shape
    tm, tn, tj = cfg.tm, cfg.tn, cfg.tj
    r0 = pl.multiple_of(rows_ref[b] * bm + ti * tm, tm)
    c0 = pl.multiple_of(cols_ref[b] * bn + tc * tn, tn)
    use_dot = min(tm, tn, tj) >= MIN_DOT

    def body(t, acc):
        ut = u_ref[pl.ds(r0, tm), pl.ds(t * tj, tj)]
        vt = v_ref[pl.ds(c0, tn), pl.ds(t * tj, tj)]
        if use_dot:
            prod = lax.dot_general(
                ut, vt, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
        else:
            prod = jnp.sum(
                ut.astype(jnp.float32)[:, None, :] * vt.astype(jnp.float32)[None, :, :], axis=2
            )
        return acc + prod

    acc = lax.fori_loop(0, steps, body, jnp.zeros((tm, tn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _tpu_kernel(rows_ref, cols_ref, u_ref, v_ref, o_ref, acc_ref, *, f32: bool):
    del rows_ref, cols_ref  # consumed by the index maps
    t = pl.program_id(3)

    @pl.when(t == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    u, v = u_ref[...], v_ref[...]
    if f32:
        u, v = u.astype(jnp.float32), v.astype(jnp.float32)
    acc_ref[...] += lax.dot_general(
        u, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )

    @pl.when(t == pl.num_programs(3) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_shape", "backend", "config", "interpret"))
def bcsr_sddmm(
    u: jax.Array,
    v: jax.Array,
    row_ids: jax.Array,
    col_ids: jax.Array,
    *,
    block_shape: tuple[int, int],
    backend: str = "gpu",
    config: SddmmConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The blocks of ``u @ v.T`` at ``(row_ids, col_ids)``, as a Pallas kernel.

    Args:
      u: dense ``(M, J)``; v: dense ``(K, J)`` (the right factor, transposed, so
        both operands are read row-wise).
      row_ids, col_ids: ``(nse,)`` int32 block coordinates of the samples.
      block_shape: ``(bm, bn)``, dividing ``(M, K)``.
      backend: ``"gpu"`` (Triton kernel) or ``"tpu"`` (Mosaic kernel).
      config: tile sizes; default :meth:`SddmmConfig.for_shapes`.
      interpret: run the kernel in the Pallas interpreter.

    Returns:
      ``(nse, bm, bn)`` in ``u.dtype``, accumulated in float32.

    Raises:
      ValueError: inconsistent shapes or a config for another block shape.
      Unsupported: a dtype or block shape the backend cannot handle.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.bcsr import bcsr_sddmm
      >>> u, v = jnp.ones((32, 8)), jnp.ones((32, 8))
      >>> blocks = bcsr_sddmm(u, v, jnp.array([0, 1]), jnp.array([1, 1]),
      ...                     block_shape=(16, 16), interpret=True)
      >>> blocks.shape, float(blocks[0, 0, 0])
      ((2, 16, 16), 8.0)
    """
    bm, bn = (int(b) for b in block_shape)
    if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[1]:
        raise ValueError(f"bcsr_sddmm: u (M, J) and v (K, J) expected, got {u.shape}, {v.shape}")
    if u.shape[0] % bm or v.shape[0] % bn:
        raise ValueError(
            f"block shape {(bm, bn)} does not divide the sampled shape {(u.shape[0], v.shape[0])}"
        )
    nse, j = row_ids.shape[0], u.shape[1]
    dtype = jnp.promote_types(u.dtype, v.dtype)
    if config is None:
        config = plan_sddmm((bm, bn), j, dtype, backend=backend)
    else:
        check_dtype(u.dtype, v.dtype, kernel=_KERNELS)
    if config.block_shape != (bm, bn):
        raise ValueError(f"config {config} does not match block shape {(bm, bn)}")
    if nse == 0 or j == 0:
        return jnp.zeros((nse, bm, bn), u.dtype)
    j_pad = config.padded_j(j)
    up, vp = u.astype(dtype), v.astype(dtype)
    if j_pad != j:
        up = jnp.pad(up, ((0, 0), (0, j_pad - j)))
        vp = jnp.pad(vp, ((0, 0), (0, j_pad - j)))
    rows, cols = row_ids.astype(jnp.int32), col_ids.astype(jnp.int32)
    out_shape = out_struct((nse, bm, bn), u.dtype)
    steps = j_pad // config.tj
    if config.backend == "gpu":
        tm, tn = config.tm, config.tn
        return pl.pallas_call(
            functools.partial(_gpu_kernel, cfg=config, steps=steps),
            grid=(nse, bm // tm, bn // tn),
            in_specs=[pl.no_block_spec] * 4,
            out_specs=pl.BlockSpec((None, tm, tn), lambda b, i, c: (b, i, c)),
            out_shape=out_shape,
            compiler_params=pltriton.CompilerParams(
                num_warps=config.num_warps, num_stages=config.num_stages
            ),
            interpret=interpret,
            name="bcsr_sddmm",
        )(rows, cols, up, vp)
    tj, tm, tn = config.tj, config.tm, config.tn
    per_m, per_n = bm // tm, bn // tn
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(nse, per_m, per_n, steps),
        in_specs=[
            pl.BlockSpec((tm, tj), lambda b, i, c, t, rows, cols: (rows[b] * per_m + i, t)),
            pl.BlockSpec((tn, tj), lambda b, i, c, t, rows, cols: (cols[b] * per_n + c, t)),
        ],
        out_specs=pl.BlockSpec((None, tm, tn), lambda b, i, c, t, rows, cols: (b, i, c)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_tpu_kernel, f32=config.f32_operands),
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="bcsr_sddmm_tpu",
    )(rows, cols, up, vp)


def bcsr_sddmm_reference(
    u: jax.Array,
    v: jax.Array,
    row_ids: jax.Array,
    col_ids: jax.Array,
    *,
    block_shape: tuple[int, int],
) -> jax.Array:
    """Pure-``jnp`` reference: gather the row blocks of ``u`` and ``v``, one einsum.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.bcsr import bcsr_sddmm_reference
      >>> u = jnp.arange(4.0).reshape(4, 1)
      >>> bcsr_sddmm_reference(u, jnp.ones((4, 1)), jnp.array([1]), jnp.array([0]),
      ...                      block_shape=(2, 2))[0].tolist()
      [[2.0, 2.0], [3.0, 3.0]]
    """
    bm, bn = block_shape
    j = u.shape[1]
    ub = u.reshape(-1, bm, j)[row_ids]
    vb = v.reshape(-1, bn, j)[col_ids]
    out = jnp.einsum("bij,bkj->bik", ub, vb, preferred_element_type=jnp.float32)
    return out.astype(u.dtype)
