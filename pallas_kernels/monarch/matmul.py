"""Monarch matrix times dense in one Pallas kernel (GPU/Triton, and the interpreter).

``M = blockdiag(left) @ P @ blockdiag(right)`` with ``left (nb, s, q)``, ``right
(nb, q, p)``, ``q = nb * g`` (the jsparse ``Monarch`` format):
``M[l*s + u, k*p + t] = sum_e left[l, u, k*g + e] * right[k, l*g + e, t]``.

One program computes output block ``l`` for one tile of ``N`` columns:

    y_l = sum_k left[l][:, k*g:(k+1)*g] @ (right[k][l*g:(l+1)*g] @ x_k)

Both block-diagonal multiplies and the shuffle ``P`` happen in one kernel: the
shuffle is only the choice of the ``g``-row slice of ``right[k]`` and the
``g``-column slice of ``left[l]``; the middle product never goes to memory, and
every ``(k, l)`` pair is computed exactly once. The transpose ``M.T`` is the
Monarch ``(right^T blocks, left^T blocks)`` (same kernel).

Triton tiles are powers of two: the wrapper zero-pads ``s``, ``p`` and ``g`` up to
powers of two when needed (a copy of the small factors). Dots need every side
``>= 16``; smaller Monarch blocks multiply with a broadcast and a reduction.
With ``backend="tpu"``, :func:`monarch_matmul` and :func:`plan_monarch` hand over to
the Mosaic kernel of :mod:`pallas_kernels.monarch.tpu`. Accumulation is float32, the
output has ``x``'s dtype.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
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
)
from pallas_kernels.monarch.tpu import MonarchTpuConfig, monarch_matmul_tpu, plan_monarch_tpu
from pallas_kernels.targets import current_target

__all__ = ["MonarchConfig", "monarch_matmul", "monarch_matmul_reference", "plan_monarch"]

_KERNELS = "Pallas Monarch kernels"
# Output rows of one block held by a program (s after padding).
_MAX_BLOCK_ROWS = 256


@dataclasses.dataclass(frozen=True)
class MonarchConfig:
    """Tiles of the Monarch kernel (all after padding to powers of two).

    Attributes:
      s, p, g: padded output-block rows, input-block rows and block rank.
      tp: input-block rows per step (divides ``p``).
      tn: columns of ``x`` per program.
      ts: output-block rows per program (divides ``s``; ``None``: all ``s``):
        :func:`plan_monarch` tiles tall blocks to fit the target's shared memory.

    Raises (at construction):
      ValueError: a non-positive tile, or ``tp`` not dividing ``p``.
      Unsupported: tiles Triton cannot use (not powers of two) or ``ts > 256``.

    Example:
      >>> from pallas_kernels.monarch import MonarchConfig
      >>> MonarchConfig(s=16, p=16, g=16, tp=16, tn=16).use_dot  # every side >= 16
      True
      >>> MonarchConfig(s=512, p=16, g=1, tp=16, tn=16)
      Traceback (most recent call last):
      ...
      pallas_kernels.common.Unsupported: the Monarch kernel holds a whole output block ...
    """

    s: int
    p: int
    g: int
    tp: int
    tn: int
    num_warps: int = 4
    num_stages: int = 2
    ts: int | None = None

    def __post_init__(self):
        if self.ts is None:
            object.__setattr__(self, "ts", self.s)
        for name in ("s", "p", "g", "tp", "tn", "ts"):
            v = getattr(self, name)
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
            if not is_pow2(v):
                raise Unsupported(f"the Triton Monarch kernel needs powers of two; {name}={v}")
        if self.p % self.tp:
            raise ValueError(f"tp={self.tp} must divide p={self.p}")
        if self.s % self.ts:
            raise ValueError(f"ts={self.ts} must divide s={self.s}")
        if self.ts > _MAX_BLOCK_ROWS:
            raise Unsupported(
                f"the Monarch kernel holds a whole output block per program unless tiled; "
                f"ts={self.ts} > {_MAX_BLOCK_ROWS}"
            )

    def onchip_bytes(self, dtype) -> int:
        """Estimated shared memory of one program: the dot operands of each pipeline
        stage (``right`` and ``x`` tiles) plus the ``left`` slice and the middle product."""
        isz = jnp.dtype(dtype).itemsize
        staged = max(self.num_stages, 1) * (self.g * self.tp + self.tp * self.tn)
        return (staged + self.ts * self.g + self.g * self.tn) * isz

    @property
    def use_dot(self) -> bool:
        return min(self.ts, self.g, self.tp, self.tn) >= MIN_DOT


def plan_monarch(
    left_shape, right_shape, width: int, dtype, *, backend: str = "gpu", target=None
) -> MonarchConfig | MonarchTpuConfig:
    """Default tiles for factors of these shapes and ``width`` dense columns.

    Args:
      left_shape: ``(nb, s, q)``.
      right_shape: ``(nb, q, p)``.
      width: columns of the dense operand.
      dtype: the compute dtype.
      backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic: :func:`plan_monarch_tpu`).
      target: the GPU (:class:`~pallas_kernels.targets.Target`) whose shared memory
        the tiles must fit; default :func:`~pallas_kernels.targets.current_target`.

    Returns:
      The default :class:`MonarchConfig` (sizes padded to powers of two; output
      blocks taller than 128 rows tiled), or a
      :class:`MonarchTpuConfig` for ``"tpu"``.

    Raises:
      ValueError: an unknown backend.
      Unsupported: unsupported dtype, or blocks too tall (GPU) or too large for VMEM
        (TPU).

    Example:
      >>> from pallas_kernels.monarch import plan_monarch
      >>> cfg = plan_monarch((4, 12, 8), (4, 8, 20), 3, "float32")
      >>> cfg.s, cfg.p, cfg.g, cfg.tn
      (16, 32, 2, 16)
    """
    check_backend(backend)
    if backend == "tpu":
        return plan_monarch_tpu(left_shape, right_shape, width, dtype, target=target)
    check_dtype(dtype, kernel=_KERNELS)
    nb, s, q = left_shape
    p = right_shape[2]
    s_p, p_p, g_p = next_pow2(s), next_pow2(p), next_pow2(q // nb)
    tn = min(64, max(MIN_DOT, next_pow2(width)))
    target = current_target("gpu") if target is None else target
    # The tallest row tile first (each row tile recomputes the middle product), then
    # the longest steps over the input block.
    tiles = [(ts, tp, t) for ts in _halvings(min(s_p, _MAX_BLOCK_ROWS))
             for tp in _halvings(min(p_p, 64)) for t in _halvings(tn)]  # fmt: skip
    for ts, tp, t in tiles:
        warps = 8 if (ts + g_p) * t >= 128 * 64 else 4
        cfg = MonarchConfig(s_p, p_p, g_p, tp=tp, tn=t, ts=ts, num_warps=warps)
        if cfg.onchip_bytes(dtype) <= target.smem_bytes:
            break
    else:
        raise Unsupported(
            f"the Triton Monarch kernel cannot fit blocks of rank {g_p} (tiles {cfg.ts}x{g_p}, "
            f"{cfg.tp}x{cfg.tn}) in the shared memory of {target.name} ({target.smem_bytes} "
            f"bytes): it needs {cfg.onchip_bytes(dtype)}"
        )
    return cfg


def _halvings(v: int) -> list[int]:
    """``v, v/2, ...`` down to 16 (or ``v`` itself when smaller)."""
    out = [v]
    while out[-1] > 16:
        out.append(out[-1] // 2)
    return out


def _mm(a, b, use_dot: bool):
    if use_dot:
        return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.sum(a.astype(jnp.float32)[:, :, None] * b.astype(jnp.float32)[None, :, :], axis=1)


def _kernel(left_ref, right_ref, x_ref, o_ref, *, cfg: MonarchConfig, nb: int):
    i, j = pl.program_id(0), pl.program_id(1)  # (output block, row tile), N tile
    per = cfg.s // cfg.ts
    lb, rows = i // per, pl.ds(pl.multiple_of((i % per) * cfg.ts, cfg.ts), cfg.ts)
    g, tp, tn = cfg.g, cfg.tp, cfg.tn
    cols = pl.ds(j * tn, tn)

    def block(k, acc):
        def step(t, mid):
            r = right_ref[k, pl.ds(lb * g, g), pl.ds(t * tp, tp)]  # (g, tp)
            xk = x_ref[pl.ds(k * cfg.p + t * tp, tp), cols]  # (tp, tn)
            return mid + _mm(r, xk, cfg.use_dot)

        mid = lax.fori_loop(0, cfg.p // tp, step, jnp.zeros((g, tn), jnp.float32))
        lk = left_ref[lb, rows, pl.ds(k * g, g)]  # (ts, g)
        return acc + _mm(lk, mid.astype(lk.dtype), cfg.use_dot)

    acc = lax.fori_loop(0, nb, block, jnp.zeros((cfg.ts, tn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _pad_factors(left, right, cfg: MonarchConfig):
    """Zero-pad to the config's powers of two: rows of ``left`` blocks (s), the rank
    ``g`` inside the middle dimension, and the columns of ``right`` blocks (p)."""
    nb, s, q = left.shape
    p, g = right.shape[2], q // nb
    if (s, p, g) == (cfg.s, cfg.p, cfg.g):
        return left, right
    lp = left.reshape(nb, s, nb, g)
    lp = jnp.pad(lp, ((0, 0), (0, cfg.s - s), (0, 0), (0, cfg.g - g)))
    rp = right.reshape(nb, nb, g, p)
    rp = jnp.pad(rp, ((0, 0), (0, 0), (0, cfg.g - g), (0, cfg.p - p)))
    return lp.reshape(nb, cfg.s, nb * cfg.g), rp.reshape(nb, nb * cfg.g, cfg.p)


@functools.partial(jax.jit, static_argnames=("backend", "config", "interpret"))
def monarch_matmul(left, right, x, *, backend="gpu", config=None, interpret=False):
    """``M @ x`` for the Monarch factors ``left (nb, s, q)``, ``right (nb, q, p)``.

    Args:
      left: ``(nb, s, q)`` the second factor's blocks.
      right: ``(nb, q, p)`` the first factor's blocks (``q = nb * g``).
      x: dense ``(nb * p, N)``.
      backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic, :func:`monarch_matmul_tpu`).
      config: tiles; default :func:`plan_monarch`.
      interpret: run the kernel in the Pallas interpreter (any platform).

    Returns:
      ``(nb * s, N)`` in ``x.dtype`` (float32 accumulation).

    Raises:
      ValueError: inconsistent shapes.
      Unsupported: a dtype, or blocks the backend's kernel cannot hold.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels.monarch import monarch_matmul, monarch_matmul_reference
      >>> kl, kr, kx = jax.random.split(jax.random.key(0), 3)
      >>> left, right = jax.random.normal(kl, (2, 4, 4)), jax.random.normal(kr, (2, 4, 3))
      >>> x = jax.random.normal(kx, (6, 5))
      >>> y = monarch_matmul(left, right, x, interpret=True)
      >>> y.shape, bool(jnp.allclose(y, monarch_matmul_reference(left, right, x), atol=1e-5))
      ((8, 5), True)
    """
    check_backend(backend)
    if backend == "tpu":
        return monarch_matmul_tpu(left, right, x, config=config, interpret=interpret)
    nb, s, q = left.shape
    if right.ndim != 3 or right.shape[:2] != (nb, q) or q % nb:
        raise ValueError(f"Monarch factors do not match: left {left.shape}, right {right.shape}")
    p = right.shape[2]
    if x.ndim != 2 or x.shape[0] != nb * p:
        raise ValueError(f"monarch_matmul: x must be ({nb * p}, N), got {x.shape}")
    n = x.shape[1]
    dtype = jnp.promote_types(jnp.result_type(left, right), x.dtype)
    cfg = config or plan_monarch(left.shape, right.shape, n, dtype, backend=backend)
    lp, rp = _pad_factors(left.astype(dtype), right.astype(dtype), cfg)
    width = round_up(max(n, 1), cfg.tn)
    xp = x.astype(dtype).reshape(nb, p, n)
    xp = jnp.pad(xp, ((0, 0), (0, cfg.p - p), (0, width - n))).reshape(nb * cfg.p, width)
    y = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, nb=nb),
        grid=(nb * (cfg.s // cfg.ts), width // cfg.tn),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.BlockSpec((cfg.ts, cfg.tn), lambda i, j: (i, j)),
        out_shape=out_struct((nb * cfg.s, width), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="monarch_matmul",
    )(lp, rp, xp)
    return y.reshape(nb, cfg.s, width)[:, :s, :n].reshape(nb * s, n)


def monarch_matmul_reference(left, right, x):
    """Pure-``jnp`` reference: two batched einsums and the block shuffle between them.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.monarch import monarch_matmul_reference
      >>> monarch_matmul_reference(jnp.ones((2, 2, 2)), jnp.ones((2, 2, 3)),
      ...                          jnp.ones((6, 1)))[:, 0].tolist()
      [6.0, 6.0, 6.0, 6.0]
    """
    nb, s, q = left.shape
    p, g, n = right.shape[2], q // nb, x.shape[1]
    z = jnp.einsum("kat,ktn->kan", right, x.reshape(nb, p, n), preferred_element_type=jnp.float32)
    z = z.reshape(nb, nb, g, n).transpose(1, 0, 2, 3).reshape(nb, q, n)
    y = jnp.einsum("luc,lcn->lun", left, z, preferred_element_type=jnp.float32)
    return y.reshape(nb * s, n).astype(x.dtype)
