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
There is no TPU variant (the planner raises
:class:`~pallas_kernels.common.Unsupported`). Accumulation is float32, the
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
    round_up,
)

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

    Raises (at construction):
      ValueError: a non-positive tile, or ``tp`` not dividing ``p``.
      Unsupported: tiles Triton cannot use (not powers of two) or ``s > 256``.

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

    def __post_init__(self):
        for name in ("s", "p", "g", "tp", "tn"):
            v = getattr(self, name)
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
            if not is_pow2(v):
                raise Unsupported(f"the Triton Monarch kernel needs powers of two; {name}={v}")
        if self.p % self.tp:
            raise ValueError(f"tp={self.tp} must divide p={self.p}")
        if self.s > _MAX_BLOCK_ROWS:
            raise Unsupported(
                f"the Monarch kernel holds a whole output block per program; s={self.s} > "
                f"{_MAX_BLOCK_ROWS}"
            )

    @property
    def use_dot(self) -> bool:
        return min(self.s, self.g, self.tp, self.tn) >= MIN_DOT


def plan_monarch(left_shape, right_shape, width: int, dtype, *, backend: str = "gpu"):
    """Default tiles for factors of these shapes and ``width`` dense columns.

    Args:
      left_shape: ``(nb, s, q)``.
      right_shape: ``(nb, q, p)``.
      width: columns of the dense operand.
      dtype: the compute dtype.
      backend: ``"gpu"`` (the only variant).

    Returns:
      The default :class:`MonarchConfig` (sizes padded to powers of two).

    Raises:
      ValueError: an unknown backend.
      Unsupported: TPU backend, unsupported dtype, or blocks too tall.

    Example:
      >>> from pallas_kernels.monarch import plan_monarch
      >>> cfg = plan_monarch((4, 12, 8), (4, 8, 20), 3, "float32")
      >>> cfg.s, cfg.p, cfg.g, cfg.tn
      (16, 32, 2, 16)
    """
    check_backend(backend)
    if backend != "gpu":
        raise Unsupported(f"the Monarch Pallas kernel has only a 'gpu' variant; got {backend!r}")
    check_dtype(dtype, kernel=_KERNELS)
    nb, s, q = left_shape
    p = right_shape[2]
    s_p, p_p, g_p = next_pow2(s), next_pow2(p), next_pow2(q // nb)
    tn = min(64, max(MIN_DOT, next_pow2(width)))
    return MonarchConfig(s_p, p_p, g_p, tp=min(p_p, 64), tn=tn)


def _mm(a, b, use_dot: bool):
    if use_dot:
        return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return jnp.sum(a.astype(jnp.float32)[:, :, None] * b.astype(jnp.float32)[None, :, :], axis=1)


def _kernel(left_ref, right_ref, x_ref, o_ref, *, cfg: MonarchConfig, nb: int):
    lb, j = pl.program_id(0), pl.program_id(1)  # output block, N tile
    g, tp, tn = cfg.g, cfg.tp, cfg.tn
    cols = pl.ds(j * tn, tn)

    def block(k, acc):
        def step(t, mid):
            r = right_ref[k, pl.ds(lb * g, g), pl.ds(t * tp, tp)]  # (g, tp)
            xk = x_ref[pl.ds(k * cfg.p + t * tp, tp), cols]  # (tp, tn)
            return mid + _mm(r, xk, cfg.use_dot)

        mid = lax.fori_loop(0, cfg.p // tp, step, jnp.zeros((g, tn), jnp.float32))
        lk = left_ref[lb, :, pl.ds(k * g, g)]  # (s, g)
        return acc + _mm(lk, mid.astype(lk.dtype), cfg.use_dot)

    acc = lax.fori_loop(0, nb, block, jnp.zeros((cfg.s, tn), jnp.float32))
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
      backend: ``"gpu"``.
      config: tiles; default :func:`plan_monarch`.
      interpret: run the kernel in the Pallas interpreter (any platform).

    Returns:
      ``(nb * s, N)`` in ``x.dtype`` (float32 accumulation).

    Raises:
      ValueError: inconsistent shapes.
      Unsupported: TPU backend, dtype, or blocks taller than 256 rows.

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
        grid=(nb, width // cfg.tn),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.BlockSpec((cfg.s, cfg.tn), lambda lb, j: (lb, j)),
        out_shape=jax.ShapeDtypeStruct((nb * cfg.s, width), x.dtype),
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
