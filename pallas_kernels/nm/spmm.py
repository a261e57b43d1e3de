"""N:M sparse times dense as Pallas kernels (GPU/Triton, and the Pallas interpreter).

``A`` of shape ``(R, C)`` keeps ``n`` of every ``m`` consecutive entries of each row
(groups along the columns, the contraction axis of ``A @ X``). It is given by
``values (R, C // m * n)`` and ``positions`` (same shape, small unsigned ints: the
position in ``[0, m)`` of each kept entry in its group).

The kernels load the *compressed* tiles and expand them in registers, then use the
tensor-core dot. No gather and no dense copy of ``A`` in memory: with ``G`` groups
per tile, slot ``k`` of every group is the strided slice ``values[:, k::n]``
(``(tm, G)``), and the dense columns at position ``q`` of every group are
``w_q = sum_k where(p_k == q, v_k, 0)``; they multiply the rows ``q::m`` of ``X``:

* :func:`nm_spmm`        ``Y = A @ X``:   ``Y += sum_q w_q @ X[q::m]``,
* :func:`nm_spmm_t`      ``Y = A.T @ X``: ``Y[q::m] += w_q.T @ X`` (strided stores),
* :func:`nm_sampled`     ``(U @ V.T)`` at the kept entries (the ``dA`` of the
  product): ``D_q = U @ V[q::m].T``, slot ``k`` = ``sum_q where(p_k == q, D_q, 0)``.

These are the GPU (Triton) kernels. The TPU has no strided lane access: with
``backend="tpu"`` the entry points and :func:`plan_nm` hand over to the Mosaic kernels
of :mod:`pallas_kernels.nm.tpu`, which expand tiles by one-hot matmuls instead.
Accumulation is float32, outputs have the dense operand's dtype. Arrays in, arrays out.
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
from pallas_kernels.nm.tpu import NMTpuConfig, nm_sampled_tpu, nm_spmm_tpu, plan_nm_tpu

__all__ = [
    "NMConfig",
    "nm_decompress_reference",
    "nm_sampled",
    "nm_sampled_reference",
    "nm_spmm",
    "nm_spmm_reference",
    "nm_spmm_t",
    "plan_nm",
]

_KERNELS = "Pallas N:M kernels"


@dataclasses.dataclass(frozen=True)
class NMConfig:
    """Tiles of the N:M kernels.

    Attributes:
      n, m: the sparsity (``n`` kept of every ``m``).
      tm: rows of ``A`` per tile.
      groups: groups per tile along the grouped axis (``groups * m`` dense columns).
      tn: columns of the dense operand per tile (the contraction tile of
        :func:`nm_sampled`).

    Raises (at construction):
      ValueError: ``not 1 <= n < m`` or a non-positive tile.
      Unsupported: tiles Triton cannot use (not powers of two, or below 16).

    Example:
      >>> from pallas_kernels.nm import NMConfig
      >>> cfg = NMConfig(2, 4, tm=16, groups=16, tn=16)
      >>> cfg.tk, cfg.tkc, cfg.padded(20, 70)
      (64, 32, (32, 128))
    """

    n: int
    m: int
    tm: int
    groups: int
    tn: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if not 1 <= self.n < self.m:
            raise ValueError(f"N:M needs 1 <= n < m, got {self.n}:{self.m}")
        for name in ("tm", "groups", "tn"):
            v = getattr(self, name)
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
            if not is_pow2(v) or v < MIN_DOT:
                raise Unsupported(
                    f"the Triton N:M kernel needs power-of-two tiles >= {MIN_DOT}; {name}={v}"
                )

    @property
    def tk(self) -> int:
        """Dense columns of ``A`` per tile."""
        return self.groups * self.m

    @property
    def tkc(self) -> int:
        """Stored columns of ``A`` per tile."""
        return self.groups * self.n

    def padded(self, rows: int, cols: int) -> tuple[int, int]:
        """``A``'s dense shape rounded up to whole tiles (the wrappers zero-pad)."""
        return round_up(rows, self.tm), round_up(cols, self.tk)


def plan_nm(
    shape: tuple[int, int], n: int, m: int, width: int, dtype, *, backend: str = "gpu"
) -> NMConfig | NMTpuConfig:
    """The default tiles for ``A`` of dense ``shape`` (grouped along axis 1) and a
    dense operand ``width`` columns wide, after every support check.

    Shapes the tiles do not divide are zero-padded by the wrappers (a copy of the
    compressed arrays; choose multiples of ``(16, 16 * m)`` to avoid it).

    Args:
      shape: ``A``'s dense ``(R, C)``.
      n, m: the sparsity.
      width: columns of the dense operand.
      dtype: the compute dtype.
      backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic: :func:`plan_nm_tpu`).

    Returns:
      The default :class:`NMConfig` (an :class:`NMTpuConfig` for ``"tpu"``).

    Raises:
      ValueError: an unknown backend, ``not 1 <= n < m``.
      Unsupported: a dtype or shape the backend's kernels cannot handle.

    Example:
      >>> from pallas_kernels.nm import plan_nm
      >>> cfg = plan_nm((64, 256), 2, 4, 8, "float32")
      >>> cfg.tm, cfg.groups, cfg.tn
      (64, 32, 16)
      >>> type(plan_nm((64, 256), 2, 4, 8, "float32", backend="tpu")).__name__
      'NMTpuConfig'
    """
    check_backend(backend)
    if backend == "tpu":
        return plan_nm_tpu(shape, n, m, width, dtype)
    check_dtype(dtype, kernel=_KERNELS)
    rows, cols = shape
    tm = 64 if rows % 64 == 0 else (32 if rows % 32 == 0 else 16)
    groups = 32 if cols % (32 * m) == 0 and cols >= 64 * m else 16
    tn = min(64, max(MIN_DOT, next_pow2(width)))
    return NMConfig(n, m, tm, groups, tn)


def _expand(v_ref, p_ref, rows, col0, cfg: NMConfig):
    """The dense tile ``A[rows, col0 * m / n ...]`` as ``m`` arrays ``w_q (tm, G)``."""
    g, n, m = cfg.groups, cfg.n, cfg.m
    vs = [v_ref[rows, pl.ds(col0 + k, g, stride=n)] for k in range(n)]
    ps = [p_ref[rows, pl.ds(col0 + k, g, stride=n)].astype(jnp.int32) for k in range(n)]
    zero = jnp.zeros_like(vs[0])
    out = []
    for q in range(m):
        w = zero
        for k in range(n):
            w = jnp.where(ps[k] == q, vs[k], w)  # positions are distinct within a group
        out.append(w)
    return out


def _dot(a, b, dims=((1,), (0,))):
    return lax.dot_general(a, b, (dims, ((), ())), preferred_element_type=jnp.float32)


def _spmm_kernel(v_ref, p_ref, x_ref, o_ref, *, cfg: NMConfig, steps: int):
    i, j = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(i * cfg.tm, cfg.tm)
    cols = pl.ds(j * cfg.tn, cfg.tn)

    def body(t, acc):
        ws = _expand(v_ref, p_ref, rows, t * cfg.tkc, cfg)
        for q, w in enumerate(ws):
            xq = x_ref[pl.ds(t * cfg.tk + q, cfg.groups, stride=cfg.m), cols]
            acc = acc + _dot(w.astype(xq.dtype), xq)
        return acc

    acc = lax.fori_loop(0, steps, body, jnp.zeros((cfg.tm, cfg.tn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _spmm_t_kernel(v_ref, p_ref, x_ref, o_ref, *, cfg: NMConfig, steps: int):
    i, j = pl.program_id(0), pl.program_id(1)  # i: tile of A's columns
    cols = pl.ds(j * cfg.tn, cfg.tn)

    def body(r, accs):
        rows = pl.ds(r * cfg.tm, cfg.tm)
        ws = _expand(v_ref, p_ref, rows, i * cfg.tkc, cfg)
        xr = x_ref[rows, cols]
        return tuple(
            acc + _dot(w.astype(xr.dtype), xr, ((0,), (0,)))
            for acc, w in zip(accs, ws, strict=True)
        )

    zeros = tuple(jnp.zeros((cfg.groups, cfg.tn), jnp.float32) for _ in range(cfg.m))
    accs = lax.fori_loop(0, steps, body, zeros)
    for q, acc in enumerate(accs):
        o_ref[pl.ds(q, cfg.groups, stride=cfg.m), :] = acc.astype(o_ref.dtype)


def _sampled_kernel(p_ref, u_ref, v_ref, o_ref, *, cfg: NMConfig, steps: int):
    i, t = pl.program_id(0), pl.program_id(1)  # i: rows of A, t: tile of A's columns
    rows = pl.ds(i * cfg.tm, cfg.tm)
    g, n, m = cfg.groups, cfg.n, cfg.m

    def body(s, accs):
        js = pl.ds(s * cfg.tn, cfg.tn)
        ut = u_ref[rows, js]
        return tuple(
            acc + _dot(ut, v_ref[pl.ds(t * cfg.tk + q, g, stride=m), js], ((1,), (1,)))
            for q, acc in enumerate(accs)
        )

    zeros = tuple(jnp.zeros((cfg.tm, g), jnp.float32) for _ in range(m))
    ds = lax.fori_loop(0, steps, body, zeros)
    for k in range(n):
        pk = p_ref[rows, pl.ds(t * cfg.tkc + k, g, stride=n)].astype(jnp.int32)
        out = jnp.zeros((cfg.tm, g), jnp.float32)
        for q in range(m):
            out = jnp.where(pk == q, ds[q], out)
        o_ref[:, pl.ds(k, g, stride=n)] = out.astype(o_ref.dtype)


def _pad_to(x, rows, cols):
    if x.shape == (rows, cols):
        return x
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _pad_nm(values, positions, rows_p, cols_p, n, m):
    """Zero-padded compressed arrays of the dense shape ``(rows_p, cols_p)``: padded
    entries hold zero values (their positions do not matter)."""
    stored = cols_p // m * n
    return _pad_to(values, rows_p, stored), _pad_to(positions, rows_p, stored)


def _compiler_params(cfg):
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _check(values, positions, n, m):
    if values.ndim != 2 or values.shape != positions.shape or values.shape[1] % n:
        raise ValueError(
            f"N:M values and positions must be equal 2-D shapes with a multiple of n={n} "
            f"columns, got {values.shape} and {positions.shape}"
        )
    return values.shape[0], values.shape[1] // n * m


def _spmm_call(values, positions, x, *, n, m, transpose, backend, config, interpret):
    """``A @ x`` or ``A.T @ x``: one program per output tile, looping over the
    contraction in steps of a tile (rows of ``A`` when transposed, columns otherwise)."""
    check_backend(backend)
    if backend == "tpu":
        return nm_spmm_tpu(
            values, positions, x, n=n, m=m, transpose=transpose, config=config,
            interpret=interpret,
        )  # fmt: skip
    name = "nm_spmm_t" if transpose else "nm_spmm"
    rows, cols = _check(values, positions, n, m)
    k_in, k_out = (rows, cols) if transpose else (cols, rows)
    if x.shape[0] != k_in:
        raise ValueError(f"{name}: x must have {k_in} rows, got {x.shape}")
    cfg = config or plan_nm((rows, cols), n, m, x.shape[1], x.dtype, backend=backend)
    width = round_up(max(x.shape[1], 1), cfg.tn)
    rows_p, cols_p = cfg.padded(rows, cols)
    in_p, out_p = (rows_p, cols_p) if transpose else (cols_p, rows_p)
    out_tile, step_tile = (cfg.tk, cfg.tm) if transpose else (cfg.tm, cfg.tk)
    kernel = _spmm_t_kernel if transpose else _spmm_kernel
    values, positions = _pad_nm(values.astype(x.dtype), positions, rows_p, cols_p, n, m)
    y = pl.pallas_call(
        functools.partial(kernel, cfg=cfg, steps=in_p // step_tile),
        grid=(out_p // out_tile, width // cfg.tn),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.BlockSpec((out_tile, cfg.tn), lambda i, j: (i, j)),
        out_shape=out_struct((out_p, width), x.dtype),
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name=name,
    )(values, positions, _pad_to(x, in_p, width))
    return y[:k_out, : x.shape[1]]


@functools.partial(jax.jit, static_argnames=("n", "m", "backend", "config", "interpret"))
def nm_spmm(values, positions, x, *, n: int, m: int, backend="gpu", config=None, interpret=False):
    """``A @ x`` for ``A`` grouped along its columns; ``x`` ``(C, N)`` -> ``(R, N)``.

    Args:
      values: ``(R, C // m * n)`` the kept entries, group after group.
      positions: the same shape, small unsigned ints: the position in ``[0, m)`` of
        each kept entry in its group (unpacked).
      x: dense ``(C, N)``.
      n, m: the sparsity.
      backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic, :func:`nm_spmm_tpu`).
      config: tiles; default :func:`plan_nm`.
      interpret: run the kernel in the Pallas interpreter (any platform).

    Returns:
      ``(R, N)`` in ``x.dtype``, accumulated in float32.

    Raises:
      ValueError: inconsistent shapes.
      Unsupported: a dtype or shape the backend's tiles do not handle.

    Example:
      Every row keeps positions 1 and 3 of each group of 4:

      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import nm_spmm, nm_spmm_reference
      >>> values = jnp.ones((16, 32))
      >>> positions = jnp.tile(jnp.array([1, 3], jnp.uint8), (16, 16))
      >>> x = jnp.arange(64.0).reshape(64, 1)
      >>> y = nm_spmm(values, positions, x, n=2, m=4, interpret=True)
      >>> float(y[0, 0]), bool(jnp.allclose(y, nm_spmm_reference(values, positions, x,
      ...                                                             n=2, m=4)))
      (1024.0, True)
    """
    return _spmm_call(
        values,
        positions,
        x,
        n=n,
        m=m,
        transpose=False,
        backend=backend,
        config=config,
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("n", "m", "backend", "config", "interpret"))
def nm_spmm_t(values, positions, x, *, n: int, m: int, backend="gpu", config=None, interpret=False):
    """``A.T @ x`` for ``A`` grouped along its columns; ``x`` ``(R, N)`` -> ``(C, N)``.

    Arguments as in :func:`nm_spmm`; the backward of ``A @ X`` with respect to ``X``.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import nm_spmm_t
      >>> values = jnp.ones((16, 32))
      >>> positions = jnp.tile(jnp.array([1, 3], jnp.uint8), (16, 16))
      >>> y = nm_spmm_t(values, positions, jnp.ones((16, 2)), n=2, m=4, interpret=True)
      >>> y.shape, y[:4, 0].tolist()
      ((64, 2), [0.0, 16.0, 0.0, 16.0])
    """
    return _spmm_call(
        values,
        positions,
        x,
        n=n,
        m=m,
        transpose=True,
        backend=backend,
        config=config,
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("n", "m", "backend", "config", "interpret"))
def nm_sampled(u, v, positions, *, n: int, m: int, backend="gpu", config=None, interpret=False):
    """``(u @ v.T)`` at the kept entries: ``u (R, J)``, ``v (C, J)`` -> values-shaped.

    The backward of ``A @ X`` with respect to ``A``'s values; other arguments as in
    :func:`nm_spmm`.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import nm_sampled
      >>> positions = jnp.tile(jnp.array([1, 3], jnp.uint8), (16, 16))
      >>> out = nm_sampled(jnp.ones((16, 8)), jnp.ones((64, 8)), positions, n=2, m=4,
      ...                  interpret=True)
      >>> out.shape, float(out[0, 0])
      ((16, 32), 8.0)
    """
    check_backend(backend)
    if backend == "tpu":
        return nm_sampled_tpu(u, v, positions, n=n, m=m, config=config, interpret=interpret)
    rows, cols = _check(positions, positions, n, m)
    if u.shape[0] != rows or v.shape[0] != cols or u.shape[1] != v.shape[1]:
        raise ValueError(f"nm_sampled: u {u.shape}, v {v.shape} do not match A {(rows, cols)}")
    cfg = config or plan_nm((rows, cols), n, m, u.shape[1], u.dtype, backend=backend)
    width = round_up(max(u.shape[1], 1), cfg.tn)
    dtype = jnp.promote_types(u.dtype, v.dtype)
    rows_p, cols_p = cfg.padded(rows, cols)
    _, positions_p = _pad_nm(positions, positions, rows_p, cols_p, n, m)
    out = pl.pallas_call(
        functools.partial(_sampled_kernel, cfg=cfg, steps=width // cfg.tn),
        grid=(rows_p // cfg.tm, cols_p // cfg.tk),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.BlockSpec((cfg.tm, cfg.tkc), lambda i, t: (i, t)),
        out_shape=out_struct(positions_p.shape, u.dtype),
        compiler_params=_compiler_params(cfg),
        interpret=interpret,
        name="nm_sampled",
    )(
        positions_p,
        _pad_to(u.astype(dtype), rows_p, width),
        _pad_to(v.astype(dtype), cols_p, width),
    )
    return out[: positions.shape[0], : positions.shape[1]]


# ------------------------------------------------------------------ references
def nm_decompress_reference(values, positions, *, n: int, m: int) -> jax.Array:
    """Dense ``A`` (grouped along axis 1) by a one-hot scatter, in ``values.dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import nm_decompress_reference
      >>> nm_decompress_reference(jnp.array([[5.0, 6.0]]), jnp.array([[0, 2]]), n=2,
      ...                         m=4).tolist()
      [[5.0, 0.0, 6.0, 0.0]]
    """
    rows = values.shape[0]
    v = values.reshape(rows, -1, n)
    onehot = positions.reshape(rows, -1, n, 1).astype(jnp.int32) == jnp.arange(m)
    return (
        jnp.sum(jnp.where(onehot, v[..., None], 0), axis=2).reshape(rows, -1).astype(values.dtype)
    )


def nm_spmm_reference(values, positions, x, *, n: int, m: int, transpose: bool = False):
    """Pure-``jnp`` reference of :func:`nm_spmm` / :func:`nm_spmm_t` (dense).

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import nm_spmm_reference
      >>> values, positions = jnp.array([[5.0, 6.0]]), jnp.array([[0, 2]])
      >>> nm_spmm_reference(values, positions, jnp.ones((4, 1)), n=2, m=4).tolist()
      [[11.0]]
      >>> nm_spmm_reference(values, positions, jnp.ones((1, 1)), n=2, m=4,
      ...                   transpose=True)[:, 0].tolist()
      [5.0, 0.0, 6.0, 0.0]
    """
    w = nm_decompress_reference(values, positions, n=n, m=m).astype(jnp.float32)
    w = w.T if transpose else w
    return (w @ x.astype(jnp.float32)).astype(x.dtype)


def nm_sampled_reference(u, v, positions, *, n: int, m: int):
    """Pure-``jnp`` reference of :func:`nm_sampled` (dense product, then gather).

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import nm_sampled_reference
      >>> v = jnp.arange(4.0).reshape(4, 1)  # u @ v.T = [[0, 1, 2, 3]]
      >>> nm_sampled_reference(jnp.ones((1, 1)), v, jnp.array([[1, 3]]), n=2, m=4).tolist()
      [[1.0, 3.0]]
    """
    rows = positions.shape[0]
    dense = (u.astype(jnp.float32) @ v.astype(jnp.float32).T).reshape(rows, -1, m)
    idx = positions.reshape(rows, -1, n).astype(jnp.int32)
    return jnp.take_along_axis(dense, idx, axis=2).reshape(positions.shape).astype(u.dtype)
