"""Monarch matrix times dense as a TPU (Mosaic) Pallas kernel.

``M = blockdiag(left) @ P @ blockdiag(right)`` with ``left (nb, s, q)``, ``right
(nb, q, p)``, ``q = nb * g`` (the jsparse ``Monarch`` format, as for the GPU kernel
:mod:`pallas_kernels.monarch.matmul`):

    y_l = sum_k left[l][:, k*g:(k+1)*g] @ (right[k][l*g:(l+1)*g] @ x_k)

The wrapper views the factors as grids of ``(nb, nb)`` small blocks (``left`` as
``[l, k, u, e]``, a copy of the small factor; ``right`` as ``[k, l, e, t]``, a free
reshape), so each ``(k, l)`` pair is one pair of MXU matmuls on whole blocks. The grid
is ``(output block l, N tile, input-block step)``; a step multiplies ``kb`` input
blocks (a batch of matmuls, unrolled) and accumulates the output block in float32 VMEM
scratch. The shuffle ``P`` lives only in the index maps: step ``kk`` of output block
``l`` reads ``left`` blocks ``(l, kk*kb + i)``, ``right`` blocks ``(kk*kb + i, l)`` and
``x`` rows of input blocks ``kk*kb + i``; the middle product never goes to memory. The
transpose ``M.T`` is the Monarch ``(right^T blocks, left^T blocks)`` (same kernel).

Block rows ``s`` and ``p`` are zero-padded to the dtype's sublane multiple (8 rows for
float32, 16 for bfloat16) when needed (a copy of the factors and of ``x``); ``N`` is
one full-width tile up to ``tn`` columns, else ``tn`` tiles. No index array steers the
grid, so there is no scalar prefetch. Accumulation is float32, the middle product is
rounded to the compute dtype before the second matmul (as on the GPU), the output has
``x``'s dtype. Reference: :func:`~pallas_kernels.monarch.monarch_matmul_reference`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import Unsupported, out_struct, round_up, tpu_sublane
from pallas_kernels.targets import Target, current_target

__all__ = ["MonarchTpuConfig", "monarch_matmul_tpu", "plan_monarch_tpu"]

TPU_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_LANE = 128
_MAX_TN = 512
_MAX_KB = 8  # matmul pairs unrolled per grid step


@dataclasses.dataclass(frozen=True)
class MonarchTpuConfig:
    """Tiles of the TPU Monarch kernel.

    Attributes:
      s, p: output- and input-block rows after padding (multiples of the dtype's
        sublane tile: 8 for float32, 16 for bfloat16).
      g: the block rank (unpadded).
      kb: input blocks per grid step (divides ``nb``).
      tn: columns of ``x`` per tile (a multiple of 128); ``x`` at most ``tn`` wide is
        one full-width tile.

    Raises (at construction):
      ValueError: a non-positive size.
      Unsupported: ``tn`` not a multiple of 128.

    Example:
      >>> from pallas_kernels.monarch import MonarchTpuConfig
      >>> cfg = MonarchTpuConfig(s=16, p=16, g=4, kb=2, tn=256)
      >>> cfg.width_tile(3), cfg.width_tile(600)
      ((3, 3), (256, 768))
    """

    s: int
    p: int
    g: int
    kb: int
    tn: int

    def __post_init__(self):
        for name in ("s", "p", "g", "kb", "tn"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.tn % _LANE:
            raise Unsupported(
                f"the TPU Monarch kernel needs tn a multiple of {_LANE}, got {self.tn}"
            )

    def width_tile(self, width: int) -> tuple[int, int]:
        """``(tile, padded width)`` for ``x`` ``width`` columns wide."""
        if width <= self.tn:
            return max(width, 1), max(width, 1)
        return self.tn, round_up(width, self.tn)

    def vmem_bytes(self, width: int, itemsize: int) -> int:
        """Estimated VMEM: double-buffered blocks (padded to (sublane, 128) tiles),
        the accumulator and the middle products."""
        sub = 8 * (4 // itemsize)
        w = round_up(self.width_tile(width)[0], _LANE)
        g_rows, g_lanes = round_up(self.g, sub), round_up(self.g, _LANE)
        blocks = self.kb * (self.s * g_lanes + g_rows * round_up(self.p, _LANE) + self.p * w)
        out = self.s * w
        return 2 * (blocks + out) * itemsize + (2 * self.s + g_rows) * w * 4


def _check_dtype(dtype) -> None:
    if jnp.dtype(dtype) not in TPU_DTYPES:
        names = ", ".join(t.name for t in TPU_DTYPES)
        raise Unsupported(
            f"the TPU Monarch kernel supports only {names}; got {jnp.dtype(dtype).name}"
        )


def plan_monarch_tpu(
    left_shape, right_shape, width: int, dtype, *, target: Target | None = None
) -> MonarchTpuConfig:
    """Default TPU tiles for factors of these shapes and ``width`` dense columns.

    Args:
      left_shape: ``(nb, s, q)``.
      right_shape: ``(nb, q, p)``.
      width: columns of the dense operand.
      dtype: the compute dtype.
      target: the chip; default :func:`~pallas_kernels.targets.current_target`.

    Returns:
      The default :class:`MonarchTpuConfig`: ``kb`` the largest divisor of ``nb`` up
      to 8 (and ``kb * p`` up to 2048 rows), ``tn = 512``, shrunk (``tn``, then
      ``kb``) until the VMEM estimate fits the budget (3/4 of the target's scoped
      VMEM: 12 MiB on v5e, 24 MiB on v6e).

    Raises:
      ValueError: factor shapes that do not match.
      Unsupported: a dtype other than float32/bfloat16, bfloat16 on a chip without
        bfloat16 matmuls (v2/v3), or blocks too large for the VMEM budget even at
        the smallest tiles (the message names both).

    Example:
      >>> from pallas_kernels.monarch import plan_monarch_tpu
      >>> cfg = plan_monarch_tpu((4, 12, 8), (4, 8, 20), 3, "float32")
      >>> cfg.s, cfg.p, cfg.g, cfg.kb
      (16, 24, 2, 4)
      >>> plan_monarch_tpu((4, 12, 8), (4, 8, 20), 3, "float16")
      Traceback (most recent call last):
      ...
      pallas_kernels.common.Unsupported: the TPU Monarch kernel supports only float32, ...
    """
    nb, s, q = left_shape
    if len(right_shape) != 3 or tuple(right_shape[:2]) != (nb, q) or q % nb:
        raise ValueError(f"Monarch factors do not match: left {left_shape}, right {right_shape}")
    _check_dtype(dtype)
    target = target or current_target("tpu")
    if jnp.dtype(dtype) == jnp.bfloat16 and not target.bf16_matmul:
        raise Unsupported(f"the TPU Monarch kernel has no bfloat16 matmul on {target.name}")
    budget = target.vmem_bytes * 3 // 4
    itemsize = jnp.dtype(dtype).itemsize
    sub = tpu_sublane(dtype)
    s_p, p_p, g = round_up(s, sub), round_up(right_shape[2], sub), q // nb
    kb = max(
        d for d in range(1, min(nb, _MAX_KB) + 1) if nb % d == 0 and (d == 1 or d * p_p <= 2048)
    )
    tn = _MAX_TN
    while True:
        cfg = MonarchTpuConfig(s_p, p_p, g, kb, tn)
        need = cfg.vmem_bytes(width, itemsize)
        if need <= budget:
            return cfg
        if tn > _LANE and width > _LANE:
            tn //= 2
        elif kb > 1:
            kb = max(d for d in range(1, kb) if nb % d == 0)
        else:
            raise Unsupported(
                f"the TPU Monarch kernel needs about {need} bytes of VMEM for blocks "
                f"{s} x {g} and {g} x {right_shape[2]} at its smallest tiles; the budget on "
                f"{target.name} is {budget} (3/4 of {target.vmem_bytes})"
            )


def _kernel(l_ref, r_ref, x_ref, o_ref, acc_ref, *, cfg: MonarchTpuConfig):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc = acc_ref[...]
    for i in range(cfg.kb):  # a batch of block pairs (k, l), k = step * kb + i
        xk = x_ref[i * cfg.p : (i + 1) * cfg.p, :]  # (p, tn)
        mid = jnp.dot(r_ref[i, 0], xk, preferred_element_type=jnp.float32)  # (g, tn)
        lk = l_ref[0, i]  # (s, g)
        acc = acc + jnp.dot(lk, mid.astype(lk.dtype), preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(step == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def monarch_matmul_tpu(left, right, x, *, config=None, interpret=False):
    """``M @ x`` for the Monarch factors ``left (nb, s, q)``, ``right (nb, q, p)``, as a
    Mosaic kernel.

    Args:
      left: ``(nb, s, q)`` the second factor's blocks.
      right: ``(nb, q, p)`` the first factor's blocks (``q = nb * g``).
      x: dense ``(nb * p, N)``.
      config: tiles; default :func:`plan_monarch_tpu`.
      interpret: run the kernel in the Pallas interpreter (any platform, e.g. CPU).

    Returns:
      ``(nb * s, N)`` in ``x.dtype`` (float32 accumulation).

    Raises:
      ValueError: inconsistent shapes or a config for other shapes.
      Unsupported: a dtype or block size the kernel cannot handle.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels.monarch import monarch_matmul_reference, monarch_matmul_tpu
      >>> kl, kr, kx = jax.random.split(jax.random.key(0), 3)
      >>> left, right = jax.random.normal(kl, (2, 4, 4)), jax.random.normal(kr, (2, 4, 3))
      >>> x = jax.random.normal(kx, (6, 5))
      >>> y = monarch_matmul_tpu(left, right, x, interpret=True)
      >>> y.shape, bool(jnp.allclose(y, monarch_matmul_reference(left, right, x), atol=1e-5))
      ((8, 5), True)
    """
    nb, s, q = left.shape
    if right.ndim != 3 or right.shape[:2] != (nb, q) or q % nb:
        raise ValueError(f"Monarch factors do not match: left {left.shape}, right {right.shape}")
    p, g = right.shape[2], q // nb
    if x.ndim != 2 or x.shape[0] != nb * p:
        raise ValueError(f"monarch_matmul_tpu: x must be ({nb * p}, N), got {x.shape}")
    n = x.shape[1]
    dtype = jnp.promote_types(jnp.result_type(left, right), x.dtype)
    cfg = config or plan_monarch_tpu(left.shape, right.shape, n, dtype)
    _check_dtype(dtype)
    if cfg.g != g or cfg.s < s or cfg.p < p or nb % cfg.kb:
        raise ValueError(f"config {cfg} does not match factors {left.shape}, {right.shape}")
    if n == 0:
        return jnp.zeros((nb * s, 0), x.dtype)
    # [l, u, (k, e)] -> [l, k, u, e] (a copy of the small factor); [k, (l, e), t] -> [k, l, e, t]
    l4 = left.astype(dtype).reshape(nb, s, nb, g).transpose(0, 2, 1, 3)
    l4 = jnp.pad(l4, ((0, 0), (0, 0), (0, cfg.s - s), (0, 0)))
    r4 = right.astype(dtype).reshape(nb, nb, g, p)
    r4 = jnp.pad(r4, ((0, 0), (0, 0), (0, 0), (0, cfg.p - p)))
    wb, width = cfg.width_tile(n)
    xp = x.astype(dtype)
    if cfg.p != p or width != n:
        xp = jnp.pad(xp.reshape(nb, p, n), ((0, 0), (0, cfg.p - p), (0, width - n)))
        xp = xp.reshape(nb * cfg.p, width)
    kb = cfg.kb
    y = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(nb, width // wb, nb // kb),
        in_specs=[
            pl.BlockSpec((1, kb, cfg.s, g), lambda lb, j, kk: (lb, kk, 0, 0)),
            pl.BlockSpec((kb, 1, g, cfg.p), lambda lb, j, kk: (kk, lb, 0, 0)),
            pl.BlockSpec((kb * cfg.p, wb), lambda lb, j, kk: (kk, j)),
        ],
        out_specs=pl.BlockSpec((cfg.s, wb), lambda lb, j, kk: (lb, j)),
        out_shape=out_struct((nb * cfg.s, width), x.dtype),
        scratch_shapes=[pltpu.VMEM((cfg.s, wb), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="monarch_matmul_tpu",
    )(l4, r4, xp)
    return y.reshape(nb, cfg.s, width)[:, :s, :n].reshape(nb * s, n)
