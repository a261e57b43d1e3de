"""N:M sparse times dense as TPU (Mosaic) Pallas kernels.

``A`` of shape ``(R, C)`` keeps ``n`` of every ``m`` consecutive entries of each row,
given by ``values (R, C // m * n)`` and ``positions`` (same shape, the position in
``[0, m)`` of each kept entry in its group), as for the GPU kernels
(:mod:`pallas_kernels.nm.spmm`). Three kernels:

* :func:`nm_spmm_tpu`    ``Y = A @ X`` (``transpose=True``: ``Y = A.T @ X``),
* :func:`nm_sampled_tpu` ``(U @ V.T)`` at the kept entries (the ``dA`` of ``A @ X``).

The TPU has no strided or gathered *lane* access, so the Triton kernels' slices
``values[:, k::n]`` do not exist here. Two ways around it:

* **Strided sublanes** (``A @ X`` and ``A.T @ X`` with ``tm <= 128``, the default):
  the stored tile is transposed in VMEM, so slot ``k`` of every group is the strided
  *sublane* slice ``[k::n]`` of ``(G, tm)`` rows; the rows of ``A.T`` at position
  ``q`` are ``where(p_k == q, v_k, 0)`` (VPU) and multiply the rows ``q::m`` of
  ``X`` on the MXU (transposed: accumulate into the output rows ``q::m``). The MXU
  does exactly the dense tile's work. Mosaic's strided access is 32-bit and within
  one 128-lane tile, hence float32 VMEM copies and 128-column chunks of ``X``.
* **One-hot matmuls** (the sampled product, and row tiles over 128): for a tile of
  ``G`` groups the 0/1 *slot matrix* ``B_k (G * n, G * m)`` (built from ``iota``)
  copies slot ``k`` of each group to all ``m`` dense columns of that group:
  ``values @ B_k`` broadcasts the values, ``positions @ B_k`` the positions, a
  compare against ``c % m`` selects. The sampled product accumulates the dense tile
  ``D = U @ V.T`` in VMEM and compresses it with the transposed slot matrices. Exact
  (one nonzero term; float32 operands in the MXU's full-precision mode), with
  non-finite values carried as small codes beside the positions so that ``inf * 0``
  cannot smear NaN over a row; but it spends about ``2n * G * n`` extra MXU
  multiply-adds per dense entry, so the sampled product (the ``dA`` of training) is
  MXU-bound for skinny ``N``.

Grids: ``(output row tile, N tile, contraction tile)``, the contraction innermost
(``"arbitrary"``) with a float32 accumulator in VMEM scratch; no index array steers
the grid (the structure is regular), so there is no scalar prefetch. The wrappers
zero-pad ``A`` to whole tiles (a copy of the compressed arrays when the shape is not
a multiple of ``(tm, G * m)``) and the dense operand to whole ``N`` tiles when it is
wider than one. Positions travel as ``int8``. Outputs have the dense operand's dtype.
References: :func:`~pallas_kernels.nm.nm_spmm_reference`,
:func:`~pallas_kernels.nm.nm_sampled_reference`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import Unsupported, out_struct, round_up
from pallas_kernels.targets import Target, current_target

__all__ = ["NMTpuConfig", "nm_sampled_tpu", "nm_spmm_tpu", "plan_nm_tpu"]

# dtypes the TPU kernels accept (no float16 arithmetic on the TPU's vector unit).
TPU_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Largest m: positions plus 4 * m non-finite codes must be exact small integers in
# bfloat16 (< 256).
MAX_M = 64
_LANE = 128
STRIDED = True  # A @ X and A.T @ X by strided sublane slices (else one-hot expansion)
_POS_ROWS = 32  # sublane tile of the int8 positions
_MAX_TN = 512


@dataclasses.dataclass(frozen=True)
class NMTpuConfig:
    """Tiles of the TPU N:M kernels.

    Attributes:
      n, m: the sparsity (``n`` kept of every ``m``).
      tm: rows of ``A`` per tile (a multiple of 32, the ``int8`` positions' tile;
        ``A @ X`` and ``A.T @ X`` use the strided kernel up to 128, the one-hot
        expansion above).
      groups: groups per tile; ``groups * n`` stored columns (a multiple of 128, one
        lane width) and ``groups * m`` dense columns.
      tn: columns of the dense operand per tile (a multiple of 128); a dense operand
        at most 128 wide is one full-width tile, one up to ``tn`` wide is one tile
        padded to whole lanes.

    Raises (at construction):
      ValueError: ``not 1 <= n < m`` or a non-positive tile.
      Unsupported: tiles Mosaic cannot use, or ``m > 64``.

    Example:
      >>> from pallas_kernels.nm import NMTpuConfig
      >>> cfg = NMTpuConfig(2, 4, tm=64, groups=64, tn=256)
      >>> cfg.tkc, cfg.tk, cfg.padded(70, 300), cfg.width_tile(20), cfg.width_tile(600)
      (128, 256, (128, 512), (20, 20), (256, 768))
      >>> NMTpuConfig(2, 4, tm=64, groups=16, tn=256)
      Traceback (most recent call last):
      ...
      pallas_kernels.common.Unsupported: the TPU N:M kernel needs groups * n a multiple of 128 ...
    """

    n: int
    m: int
    tm: int
    groups: int
    tn: int

    def __post_init__(self):
        if not 1 <= self.n < self.m:
            raise ValueError(f"N:M needs 1 <= n < m, got {self.n}:{self.m}")
        for name in ("tm", "groups", "tn"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.m > MAX_M:
            raise Unsupported(f"the TPU N:M kernel handles m <= {MAX_M}, got m={self.m}")
        if self.tm % _POS_ROWS:
            raise Unsupported(
                f"the TPU N:M kernel needs tm a multiple of {_POS_ROWS}, got {self.tm}"
            )
        if self.tkc % _LANE:
            raise Unsupported(
                f"the TPU N:M kernel needs groups * n a multiple of {_LANE} (whole lanes), "
                f"got {self.groups} * {self.n}"
            )
        if self.tn % _LANE:
            raise Unsupported(f"the TPU N:M kernel needs tn a multiple of {_LANE}, got {self.tn}")

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
        return round_up(max(rows, 1), self.tm), round_up(max(cols, 1), self.tk)

    def width_tile(self, width: int) -> tuple[int, int]:
        """``(tile, padded width)`` of a dense operand ``width`` columns wide: one
        full-width tile up to 128, one lane-padded tile up to ``tn``, else ``tn``
        tiles."""
        if width <= _LANE:
            return max(width, 1), max(width, 1)
        if width <= self.tn:
            return round_up(width, _LANE), round_up(width, _LANE)
        return self.tn, round_up(width, self.tn)

    def vmem_bytes(self, width: int, itemsize: int) -> int:
        """Estimated VMEM of the most demanding of the three kernels (double-buffered
        blocks, accumulator, slot matrices and the dense-tile temporaries)."""
        w = round_up(self.width_tile(width)[0], _LANE)
        vt = self.tm * self.tkc
        out = 2 * itemsize + 4  # output blocks and accumulator, per element
        spmm = 2 * (vt * (itemsize + 1) + self.tk * w * itemsize) + self.tm * w * out
        spmm_t = 2 * (vt * (itemsize + 1) + self.tm * w * itemsize) + self.tk * w * out
        sampled = 2 * (vt * (1 + itemsize) + (self.tm + self.tk) * w * itemsize)
        sampled += self.tm * self.tk * 4
        temps = 2 * self.tkc * self.tk * 4 + 6 * self.tm * self.tk * 4
        temps += 2 * self.tkc * self.tm * 4 + self.tk * w * 4  # the strided kernel's scratch
        return max(spmm, spmm_t, sampled) + temps


def _check_dtype(dtype) -> None:
    if jnp.dtype(dtype) not in TPU_DTYPES:
        names = ", ".join(t.name for t in TPU_DTYPES)
        raise Unsupported(f"the TPU N:M kernels support only {names}; got {jnp.dtype(dtype).name}")


def plan_nm_tpu(
    shape: tuple[int, int], n: int, m: int, width: int, dtype, *, target: Target | None = None
) -> NMTpuConfig:
    """The default TPU tiles for ``A`` of dense ``shape`` (grouped along axis 1) and a
    dense operand ``width`` columns wide, after every support check.

    One config serves the three kernels (``A @ X``, ``A.T @ X`` and the sampled
    product); the tiles are shrunk until the largest of them fits the VMEM budget:
    3/4 of the target's scoped VMEM (12 MiB on v5e, 24 MiB on v6e).

    Args:
      shape: ``A``'s dense ``(R, C)``.
      n, m: the sparsity.
      width: columns of the dense operand (the contraction of the sampled product).
      dtype: the compute dtype.
      target: the chip; default :func:`~pallas_kernels.targets.current_target`.

    Returns:
      The default :class:`NMTpuConfig`.

    Raises:
      ValueError: ``not 1 <= n < m``.
      Unsupported: a dtype other than float32/bfloat16, ``m > 64``, a chip without
        bfloat16 matmuls (v2/v3: the expansion multiplies bfloat16 one-hot
        matrices), or no tiling fits the VMEM budget (the message names the budget
        and the request).

    Example:
      >>> from pallas_kernels.nm import plan_nm_tpu
      >>> cfg = plan_nm_tpu((1024, 1024), 2, 4, 64, "bfloat16")
      >>> cfg.tm, cfg.tkc, cfg.tk, cfg.width_tile(64)
      (128, 256, 512, (64, 64))
      >>> plan_nm_tpu((64, 64), 2, 4, 8, "float16")
      Traceback (most recent call last):
      ...
      pallas_kernels.common.Unsupported: the TPU N:M kernels support only float32, bfloat16; ...
    """
    if not 1 <= n < m:
        raise ValueError(f"N:M needs 1 <= n < m, got {n}:{m}")
    _check_dtype(dtype)
    if m > MAX_M:
        raise Unsupported(f"the TPU N:M kernel handles m <= {MAX_M}, got m={m}")
    target = target or current_target("tpu")
    if not target.bf16_matmul:
        raise Unsupported(
            f"the TPU N:M kernel expands tiles with bfloat16 one-hot matmuls, which "
            f"{target.name} does not have"
        )
    budget = target.vmem_bytes * 3 // 4
    rows, cols = shape
    itemsize = jnp.dtype(dtype).itemsize
    g0 = _LANE // math.gcd(n, _LANE)  # fewest groups filling whole lanes
    groups_max = max(1, -(-max(cols, 1) // (g0 * m)))  # g0-multiples covering C
    mult = max(1, min(512 // (g0 * m), groups_max))  # about 512 dense columns per tile
    tm = min(_LANE, round_up(max(rows, 1), _POS_ROWS))  # the strided kernel's limit
    tn = _MAX_TN
    while True:
        cfg = NMTpuConfig(n, m, tm, g0 * mult, tn)
        need = cfg.vmem_bytes(width, itemsize)
        if need <= budget:
            return cfg
        if tn > _LANE and width > _LANE:
            tn //= 2
        elif mult > 1:
            mult //= 2
        elif tm > _POS_ROWS:
            tm = round_up(tm // 2, _POS_ROWS)
        else:
            raise Unsupported(
                f"the TPU N:M kernel needs about {need} bytes of VMEM for {n}:{m} at its "
                f"smallest tiles (tm={tm}, {cfg.tk} dense columns, width {width}); the "
                f"budget on {target.name} is {budget} (3/4 of {target.vmem_bytes})"
            )


# ------------------------------------------------------------------ tile algebra
def _slot_matrix(cfg: NMTpuConfig, k: int) -> jax.Array:
    """``(tkc, tk)`` float32 0/1: dense column ``c`` takes stored column
    ``(c // m) * n + k`` (slot ``k`` of its group)."""
    shape = (cfg.tkc, cfg.tk)
    src = lax.broadcasted_iota(jnp.int32, shape, 0)
    col = lax.broadcasted_iota(jnp.int32, shape, 1)
    return jnp.where(src == lax.div(col, cfg.m) * cfg.n + k, 1.0, 0.0).astype(jnp.float32)


def _codes(x):
    """float32 codes of the non-finite entries: 0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return jnp.where(
        x != x, 1.0, jnp.where(x == jnp.inf, 2.0, jnp.where(x == -jnp.inf, 3.0, 0.0))
    ).astype(jnp.float32)


def _finite(x, codes):
    return jnp.where(codes == 0.0, x, 0.0)


def _decode(values, codes):
    """``values`` where the code is 0, else the non-finite value the code names."""
    special = jnp.where(codes == 1.0, jnp.nan, jnp.where(codes == 2.0, jnp.inf, -jnp.inf))
    return jnp.where(codes == 0.0, values, special.astype(values.dtype))


def _onehot_dot(a, b, dims, dtype):
    """``a @ b`` (contracting ``dims``) of a one-hot ``b``: exact in float32."""
    prec = lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return lax.dot_general(
        a.astype(dtype), b.astype(dtype), (dims, ((), ())),
        precision=prec, preferred_element_type=jnp.float32,
    )  # fmt: skip


def _expand(values, positions, cfg: NMTpuConfig, dtype):
    """The dense ``(tm, tk)`` tile in ``dtype`` from a stored ``(tm, tkc)`` tile."""
    v = values.astype(jnp.float32)
    codes = _codes(v)
    # positions and codes in one small integer, exact in bfloat16: pos + m * code
    pc = positions.astype(jnp.int32).astype(jnp.float32) + cfg.m * codes
    v = _finite(v, codes)
    col = lax.broadcasted_iota(jnp.int32, (cfg.tm, cfg.tk), 1)
    q = lax.rem(col, cfg.m).astype(jnp.float32)  # position of each dense column in its group
    out = jnp.zeros((cfg.tm, cfg.tk), jnp.float32)
    for k in range(cfg.n):
        b = _slot_matrix(cfg, k)
        pcb = _onehot_dot(pc, b, ((1,), (0,)), jnp.bfloat16)
        vb = _onehot_dot(v, b, ((1,), (0,)), dtype)
        code = jnp.floor((pcb + 0.5) * (1.0 / cfg.m))
        out = jnp.where(pcb - cfg.m * code == q, _decode(vb, code), out)
    return out.astype(dtype)


def _compress(dense, positions, cfg: NMTpuConfig, dtype):
    """The stored ``(tm, tkc)`` entries of a dense float32 ``(tm, tk)`` tile."""
    codes = _codes(dense)
    d = _finite(dense, codes)
    p = positions.astype(jnp.int32).astype(jnp.float32)
    col = lax.broadcasted_iota(jnp.int32, (cfg.tm, cfg.tk), 1)
    q = lax.rem(col, cfg.m).astype(jnp.float32)
    slot = lax.rem(lax.broadcasted_iota(jnp.int32, (cfg.tm, cfg.tkc), 1), cfg.n)
    out = jnp.zeros((cfg.tm, cfg.tkc), jnp.float32)
    nt = ((1,), (1,))  # contract the dense columns with the slot matrix's
    for k in range(cfg.n):
        b = _slot_matrix(cfg, k)
        hit = _onehot_dot(p, b, ((1,), (0,)), jnp.bfloat16) == q  # slot k's entry
        vals = _onehot_dot(jnp.where(hit, d, 0.0), b, nt, dtype)
        code = _onehot_dot(jnp.where(hit, codes, 0.0), b, nt, jnp.bfloat16)
        out = jnp.where(slot == k, _decode(vals, code), out)
    return out.astype(dtype)


# ------------------------------------------------------------------ kernels
def _spmm_kernel(v_ref, p_ref, x_ref, o_ref, acc_ref, *, cfg: NMTpuConfig, transpose: bool):
    t = pl.program_id(2)

    @pl.when(t == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...]
    w = _expand(v_ref[...], p_ref[...], cfg, x.dtype)
    dims = ((0,), (0,)) if transpose else ((1,), (0,))
    acc_ref[...] += lax.dot_general(w, x, (dims, ((), ())), preferred_element_type=jnp.float32)

    @pl.when(t == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _spmm_strided_kernel(
    v_ref, p_ref, x_ref, o_ref, vt_ref, pt_ref, *chunk_refs, cfg: NMTpuConfig, transpose,
    mxu_dtype, lanes: int,
):  # fmt: skip
    """``A @ X`` / ``A.T @ X`` without one-hot products: the stored tile is transposed
    in VMEM so that slot ``k`` of every group is the strided *sublane* slice
    ``[k::n]`` (``(G, tm)``); the dense rows at position ``q`` are selected on the
    VPU and multiply the rows ``q::m`` of ``X`` (or, transposed, accumulate into the
    output rows ``q::m``). Mosaic's strided access is 32-bit only and within one
    128-lane tile, hence float32 scratch split in ``lanes``-wide chunks."""
    t = pl.program_id(2)
    chunks = x_ref.shape[1] // lanes
    # transposed: one (tk, lanes) accumulator per lane chunk; else the (tm, width)
    # accumulator and one (tk, lanes) float32 copy of X per lane chunk
    accs, xs_refs = (chunk_refs, None) if transpose else (chunk_refs[:1], chunk_refs[1:])

    @pl.when(t == 0)
    def _():
        for acc_ref in accs:
            acc_ref[...] = jnp.zeros_like(acc_ref)

    g, n, m = cfg.groups, cfg.n, cfg.m
    dtype = mxu_dtype or x_ref.dtype
    vt_ref[...] = v_ref[...].astype(jnp.float32).T
    pt_ref[...] = p_ref[...].astype(jnp.int32).T
    vs = [vt_ref[pl.ds(k, g, stride=n), :] for k in range(n)]
    ps = [pt_ref[pl.ds(k, g, stride=n), :] for k in range(n)]

    def rows_at(q):  # (G, tm): A.T's rows at position q of every group
        w = jnp.zeros_like(vs[0])
        for k in range(n):
            w = jnp.where(ps[k] == q, vs[k], w)  # positions are distinct within a group
        return w.astype(dtype)

    def lane_chunk(c):
        return slice(c * lanes, (c + 1) * lanes)

    tn_dims = (((0,), (0,)), ((), ()))
    if transpose:
        xs = [x_ref[:, lane_chunk(c)].astype(dtype) for c in range(chunks)]
        for q in range(m):
            w, rows = rows_at(q), pl.ds(q, g, stride=m)
            for acc_ref, xc in zip(accs, xs, strict=True):
                acc_ref[rows, :] += jnp.dot(w, xc, preferred_element_type=jnp.float32)
    else:
        (acc_ref,) = accs
        for c, xs_ref in enumerate(xs_refs):
            xs_ref[...] = x_ref[:, lane_chunk(c)].astype(jnp.float32)
        for q in range(m):
            w = rows_at(q)
            for c, xs_ref in enumerate(xs_refs):
                xq = xs_ref[pl.ds(q, g, stride=m), :].astype(dtype)
                acc_ref[:, lane_chunk(c)] += lax.dot_general(
                    w, xq, tn_dims, preferred_element_type=jnp.float32
                )

    @pl.when(t == pl.num_programs(2) - 1)
    def _():
        if transpose:
            for c, acc_ref in enumerate(accs):
                o_ref[:, lane_chunk(c)] = acc_ref[...].astype(o_ref.dtype)
        else:
            o_ref[...] = accs[0][...].astype(o_ref.dtype)


def _sampled_kernel(p_ref, u_ref, v_ref, o_ref, acc_ref, *, cfg: NMTpuConfig):
    s = pl.program_id(2)

    @pl.when(s == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    nt = (((1,), (1,)), ((), ()))
    acc_ref[...] += lax.dot_general(u_ref[...], v_ref[...], nt, preferred_element_type=jnp.float32)

    @pl.when(s == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = _compress(acc_ref[...], p_ref[...], cfg, o_ref.dtype)


# ------------------------------------------------------------------ wrappers
def _pad_to(x, rows, cols):
    if x.shape == (rows, cols):
        return x
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _check(values, positions, n, m):
    if values.ndim != 2 or values.shape != positions.shape or values.shape[1] % n:
        raise ValueError(
            f"N:M values and positions must be equal 2-D shapes with a multiple of n={n} "
            f"columns, got {values.shape} and {positions.shape}"
        )
    return values.shape[0], values.shape[1] // n * m


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


@functools.partial(jax.jit, static_argnames=("n", "m", "transpose", "config", "interpret"))
def nm_spmm_tpu(
    values, positions, x, *, n: int, m: int, transpose=False, config=None, interpret=False
):
    """``A @ x`` (or ``A.T @ x``) for ``A`` grouped along its columns, as a Mosaic kernel.

    Args:
      values: ``(R, C // m * n)`` the kept entries, group after group.
      positions: the same shape, integers in ``[0, m)`` (unpacked).
      x: dense ``(C, N)`` (``(R, N)`` when ``transpose``).
      n, m: the sparsity.
      transpose: multiply by ``A.T``.
      config: tiles; default :func:`plan_nm_tpu`.
      interpret: run the kernel in the Pallas interpreter (any platform, e.g. CPU).

    Returns:
      ``(R, N)`` (``(C, N)`` when transposed) in ``x.dtype``, accumulated in float32.

    Raises:
      ValueError: inconsistent shapes.
      Unsupported: a dtype or sparsity the TPU kernel cannot handle.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import nm_spmm_reference, nm_spmm_tpu
      >>> values = jnp.ones((16, 32))
      >>> positions = jnp.tile(jnp.array([1, 3], jnp.uint8), (16, 16))
      >>> x = jnp.arange(64.0).reshape(64, 1)
      >>> y = nm_spmm_tpu(values, positions, x, n=2, m=4, interpret=True)
      >>> float(y[0, 0]), bool(jnp.allclose(y, nm_spmm_reference(values, positions, x,
      ...                                                             n=2, m=4)))
      (1024.0, True)
      >>> nm_spmm_tpu(values, positions, jnp.ones((16, 1)), n=2, m=4, transpose=True,
      ...             interpret=True)[:4, 0].tolist()
      [0.0, 16.0, 0.0, 16.0]
    """
    name = "nm_spmm_t_tpu" if transpose else "nm_spmm_tpu"
    rows, cols = _check(values, positions, n, m)
    k_in, k_out = (rows, cols) if transpose else (cols, rows)
    if x.ndim != 2 or x.shape[0] != k_in:
        raise ValueError(f"{name}: x must be ({k_in}, N), got {x.shape}")
    width = x.shape[1]
    dtype = jnp.promote_types(values.dtype, x.dtype)
    cfg = config or plan_nm_tpu((rows, cols), n, m, width, dtype)
    if (cfg.n, cfg.m) != (n, m):
        raise ValueError(f"config {cfg} is not for {n}:{m}")
    _check_dtype(dtype)
    if width == 0 or rows == 0 or cols == 0:
        return jnp.zeros((k_out, width), x.dtype)
    rows_p, cols_p = cfg.padded(rows, cols)
    stored_p = cols_p // m * n
    wb, width_p = cfg.width_tile(width)
    v = _pad_to(values.astype(dtype), rows_p, stored_p)
    p = _pad_to(positions.astype(jnp.int8), rows_p, stored_p)
    if transpose:  # grid: (tile of A's columns, N tile, tile of A's rows)
        grid = (cols_p // cfg.tk, width_p // wb, rows_p // cfg.tm)
        stored = pl.BlockSpec((cfg.tm, cfg.tkc), lambda i, j, t: (t, i))
        x_spec = pl.BlockSpec((cfg.tm, wb), lambda i, j, t: (t, j))
        out_rows, out_tile = cols_p, cfg.tk
    else:  # grid: (tile of A's rows, N tile, tile of A's columns)
        grid = (rows_p // cfg.tm, width_p // wb, cols_p // cfg.tk)
        stored = pl.BlockSpec((cfg.tm, cfg.tkc), lambda i, j, t: (i, t))
        x_spec = pl.BlockSpec((cfg.tk, wb), lambda i, j, t: (t, j))
        out_rows, out_tile = rows_p, cfg.tm
    xp = _pad_to(x.astype(dtype), cols_p if not transpose else rows_p, width_p)
    lanes = min(wb, _LANE)
    if STRIDED and cfg.tm <= _LANE and wb % lanes == 0:
        # The interpreter multiplies in float32 (XLA:CPU has no bfloat16 dot with a
        # transposed operand inside the grid loop); bfloat16 products are exact in
        # float32, so only the summation order differs from the MXU.
        mxu_dtype = jnp.float32 if interpret else None
        kernel = functools.partial(_spmm_strided_kernel, mxu_dtype=mxu_dtype, lanes=lanes)
        chunk = pltpu.VMEM((cfg.tk, lanes), jnp.float32)
        scratch = [pltpu.VMEM((cfg.tkc, cfg.tm), jnp.float32)]
        scratch += [pltpu.VMEM((cfg.tkc, cfg.tm), jnp.int32)]
        if not transpose:
            scratch += [pltpu.VMEM((cfg.tm, wb), jnp.float32)]
        scratch += [chunk] * (wb // lanes)
    else:
        kernel = _spmm_kernel
        scratch = [pltpu.VMEM((out_tile, wb), jnp.float32)]
    y = pl.pallas_call(
        functools.partial(kernel, cfg=cfg, transpose=transpose),
        grid=grid,
        in_specs=[stored, stored, x_spec],
        out_specs=pl.BlockSpec((out_tile, wb), lambda i, j, t: (i, j)),
        out_shape=out_struct((out_rows, width_p), x.dtype),
        scratch_shapes=scratch,
        compiler_params=_params(),
        interpret=interpret,
        name=name,
    )(v, p, xp)
    return y[:k_out, :width]


@functools.partial(jax.jit, static_argnames=("n", "m", "config", "interpret"))
def nm_sampled_tpu(u, v, positions, *, n: int, m: int, config=None, interpret=False):
    """``(u @ v.T)`` at the kept entries as a Mosaic kernel: ``u (R, J)``, ``v (C, J)``
    -> values-shaped ``(R, C // m * n)`` in ``u.dtype``.

    The backward of ``A @ X`` with respect to ``A``'s values; other arguments as in
    :func:`nm_spmm_tpu` (the config's ``tn`` tiles ``J``).

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.nm import nm_sampled_tpu
      >>> positions = jnp.tile(jnp.array([1, 3], jnp.uint8), (16, 16))
      >>> v = jnp.tile(jnp.arange(4.0), 16)[:, None]  # (u @ v.T)[r, c] = c % 4
      >>> out = nm_sampled_tpu(jnp.ones((16, 1)), v, positions, n=2, m=4, interpret=True)
      >>> out.shape, out[0, :4].tolist()
      ((16, 32), [1.0, 3.0, 1.0, 3.0])
    """
    rows, cols = _check(positions, positions, n, m)
    if u.ndim != 2 or v.ndim != 2 or u.shape[0] != rows or v.shape[0] != cols:
        raise ValueError(f"nm_sampled_tpu: u {u.shape}, v {v.shape} do not match A {(rows, cols)}")
    if u.shape[1] != v.shape[1]:
        raise ValueError(f"nm_sampled_tpu: u {u.shape} and v {v.shape} differ in width")
    width = u.shape[1]
    dtype = jnp.promote_types(u.dtype, v.dtype)
    cfg = config or plan_nm_tpu((rows, cols), n, m, width, dtype)
    if (cfg.n, cfg.m) != (n, m):
        raise ValueError(f"config {cfg} is not for {n}:{m}")
    _check_dtype(dtype)
    if rows == 0 or cols == 0 or width == 0:
        return jnp.zeros(positions.shape, u.dtype)
    rows_p, cols_p = cfg.padded(rows, cols)
    stored_p = cols_p // m * n
    wb, width_p = cfg.width_tile(width)
    out = pl.pallas_call(
        functools.partial(_sampled_kernel, cfg=cfg),
        grid=(rows_p // cfg.tm, cols_p // cfg.tk, width_p // wb),
        in_specs=[
            pl.BlockSpec((cfg.tm, cfg.tkc), lambda i, t, s: (i, t)),
            pl.BlockSpec((cfg.tm, wb), lambda i, t, s: (i, s)),
            pl.BlockSpec((cfg.tk, wb), lambda i, t, s: (t, s)),
        ],
        out_specs=pl.BlockSpec((cfg.tm, cfg.tkc), lambda i, t, s: (i, t)),
        out_shape=out_struct((rows_p, stored_p), u.dtype),
        scratch_shapes=[pltpu.VMEM((cfg.tm, cfg.tk), jnp.float32)],
        compiler_params=_params(),
        interpret=interpret,
        name="nm_sampled_tpu",
    )(
        _pad_to(positions.astype(jnp.int8), rows_p, stored_p),
        _pad_to(u.astype(dtype), rows_p, width_p),
        _pad_to(v.astype(dtype), cols_p, width_p),
    )
    return out[:rows, : positions.shape[1]]
