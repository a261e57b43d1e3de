"""Block-sparse flash attention, forward, as Pallas kernels: output and log-sum-exp.

The score matrix of one head is cut into ``(bq, bk)`` blocks. Two *block lists*
say, for each query block ``i``, which key blocks it attends to; only those are read:

* ``full_kv (Hm, nqb, F)`` int32 and ``full_count (Hm, nqb)``: the key blocks kept
  whole, ``full_kv[h, i, :full_count[h, i]]``;
* ``partial_kv (Hm, nqb, P)``, ``partial_count (Hm, nqb)`` and ``partial_mask
  (Hm, nqb, P)``: the key blocks kept in part, and for each the index of its
  element mask in ``mask_blocks (M, bq, bk)`` (bool or integer, nonzero = keep,
  ``[row in the query block, column in the key block]``).

Slots past a count are padding (any in-range value; repeating the last valid one
spares the TPU pipeline a copy). ``Hm`` is 1 (one pattern for every head) or the
number of query heads. This is the row view of ``jsparse.attention.BlockMask``,
but the kernels take plain arrays. On top of the lists the kernels apply segment
ids (a query attends to keys of its own segment) and a logit soft cap
(``cap * tanh(logits / cap)``, after ``scale``).

Layout: ``q (B, H, L, D)``, ``k, v (B, H_kv, S, D)`` (heads before length, the
layout both kernels tile), ``L`` and ``S`` multiples of ``bq`` and ``bk`` (the
caller pads). ``H_kv`` divides ``H`` (grouped-query attention): query head ``h``
reads key head ``h // (H // H_kv)``. Softmax runs online over the listed blocks
only (the flash-attention recurrence), in float32; a row that keeps no key gets a
zero output and a log-sum-exp of ``-inf``.

* **GPU** (Triton): grid ``(B, H, nqb)``. Each program reads its counts and block
  ids from the index arrays (ordinary inputs) and runs two ``fori_loop`` with
  data-dependent trip counts, over the full blocks (no element mask) then the
  partial ones, slicing ``k``/``v`` at ``id * bk``.
* **TPU** (Mosaic): ``PrefetchScalarGridSpec`` with the lists as scalar prefetch;
  grid ``(B, H, nqb, F + P)``. The ``k``/``v``/mask index maps read the key block
  of step ``t`` from the prefetched ids (full list, then partial list), so the
  pipeline copies only listed blocks; steps past a count repeat an id (no new
  copy) and compute nothing. The running max, sum and output live in VMEM
  scratch across the steps.

Arrays in, arrays out: nothing here knows about autodiff or jsparse's block masks.
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
    tpu_sublane,
)
from pallas_kernels.targets import Target, current_target

__all__ = [
    "AttentionConfig",
    "attention_mask_reference",
    "block_sparse_attention_fwd",
    "block_sparse_attention_reference",
    "gpu_shared_memory",
    "plan_attention",
]

_KERNELS = "Pallas attention kernels"
# TPU lanes: a key block is one or more full lane rows of the score tile.
_TPU_LANES = 128


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Static configuration of one block-sparse attention launch.

    Attributes:
      block_size: ``(bq, bk)``, the query and key block of the block list.
      head_dim: the head dimension the kernel computes with (the GPU wrapper pads
        ``D`` up to a power of two).
      backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic).
      num_warps, num_stages: Triton launch parameters of the forward (GPU only).
      bwd_num_stages: Triton pipeline stages of the backward kernels (1: their four
        dots already fill shared memory at 128 x 128 x 128).

    Raises (at construction):
      ValueError: a non-positive size or an unknown backend.
      Unsupported: blocks the backend's kernel cannot tile.

    Example:
      >>> from pallas_kernels.attention import AttentionConfig
      >>> AttentionConfig((64, 64), 64).num_warps
      4
      >>> AttentionConfig((64, 48), 64)
      Traceback (most recent call last):
      ...
      pallas_kernels.common.Unsupported: the Triton attention kernel needs power-of-two blocks ...
    """

    block_size: tuple[int, int]
    head_dim: int
    backend: str = "gpu"
    num_warps: int = 4
    num_stages: int = 2
    bwd_num_stages: int = 1

    def __post_init__(self):
        bq, bk = self.block_size
        check_backend(self.backend)
        if min(bq, bk, self.head_dim) <= 0:
            raise ValueError(
                f"block_size and head_dim must be positive, got {self.block_size}, {self.head_dim}"
            )
        if self.backend == "gpu":
            if not (is_pow2(bq) and is_pow2(bk) and is_pow2(self.head_dim)):
                raise Unsupported(
                    "the Triton attention kernel needs power-of-two blocks and head_dim, "
                    f"got block_size={self.block_size}, head_dim={self.head_dim}"
                )
            if min(bq, bk, self.head_dim) < MIN_DOT:
                raise Unsupported(
                    f"the Triton attention kernel needs blocks and head_dim >= {MIN_DOT} "
                    f"(tensor-core dots), got block_size={self.block_size}, "
                    f"head_dim={self.head_dim}"
                )
        else:
            if bq % 8 or bk % _TPU_LANES:
                raise Unsupported(
                    "the TPU attention kernel needs bq a multiple of 8 and bk a multiple of "
                    f"{_TPU_LANES}, got block_size={self.block_size}"
                )

    @classmethod
    def for_shapes(cls, block_size, head_dim: int, *, backend: str = "gpu") -> AttentionConfig:
        """Defaults from the shapes (GPU: ``head_dim`` padded to a power of two, 8
        warps for 128-row tiles or wide heads).

        Example:
          >>> from pallas_kernels.attention import AttentionConfig
          >>> AttentionConfig.for_shapes((64, 64), 80).head_dim
          128
        """
        bq, bk = (int(b) for b in block_size)
        if backend == "gpu":
            d = max(MIN_DOT, next_pow2(head_dim))
            num_warps = 8 if bq * max(bk, d) >= 128 * 128 else 4
            return cls((bq, bk), d, backend, num_warps=num_warps)
        return cls((bq, bk), int(head_dim), backend)


def gpu_shared_memory(block_size, head_dim: int, dtype) -> int:
    """Bytes of shared memory the Triton backward (the larger of the two passes) asks
    for, an upper estimate fitted to ptxas's requests on H100/A100 (one pipeline
    stage: four ``max(bq, bk) x D`` operand tiles and one ``bq x bk`` tile).

    Example:
      >>> from pallas_kernels.attention import gpu_shared_memory
      >>> gpu_shared_memory((128, 128), 128, "bfloat16")
      163840
    """
    bq, bk = (int(b) for b in block_size)
    size = jnp.dtype(dtype).itemsize
    return 4 * max(bq, bk) * max(MIN_DOT, next_pow2(head_dim)) * size + bq * bk * size


def plan_attention(
    block_size, head_dim: int, dtype, *, backend: str, target: Target | None = None
) -> AttentionConfig:
    """The default config for these shapes, after every support check.

    Callers use it to learn *before tracing anything* whether the kernel handles a
    configuration.

    Args:
      block_size: ``(bq, bk)`` of the block list.
      head_dim: ``D`` of ``q``, ``k`` and ``v``.
      dtype: the dtype of ``q``, ``k`` and ``v``.
      backend: ``"gpu"`` or ``"tpu"``.
      target: the chip (:class:`pallas_kernels.targets.Target`); default
        :func:`~pallas_kernels.targets.current_target` (the default device's kind, or
        the smallest budget of the family).

    Returns:
      The default :class:`AttentionConfig`.

    Raises:
      ValueError: an unknown backend or a non-positive size.
      Unsupported: the dtype or the blocks are not supported by ``backend``, or the
        GPU kernels need more shared memory than ``target`` has
        (:func:`gpu_shared_memory`).

    Example:
      >>> from pallas_kernels.attention import plan_attention
      >>> plan_attention((128, 128), 64, "bfloat16", backend="gpu").num_warps
      8
      >>> plan_attention((64, 64), 64, "float32", backend="tpu")
      Traceback (most recent call last):
      ...
      pallas_kernels.common.Unsupported: the TPU attention kernel needs bq a multiple of 8 ...
    """
    check_dtype(dtype, kernel=_KERNELS)
    config = AttentionConfig.for_shapes(block_size, head_dim, backend=backend)
    target = current_target(backend) if target is None else target
    if backend == "tpu":
        if block_size[0] % tpu_sublane(dtype):
            raise Unsupported(
                f"the TPU attention kernel needs {jnp.dtype(dtype)} query blocks in "
                f"multiples of {tpu_sublane(dtype)} rows, got bq={block_size[0]}"
            )
        if jnp.dtype(dtype).itemsize == 2 and not target.bf16_matmul:
            raise Unsupported(
                f"{target.name} has no 16-bit matmuls in Mosaic; the TPU attention kernel "
                f"needs float32 there, got {jnp.dtype(dtype)}"
            )
        return config
    need = gpu_shared_memory(block_size, head_dim, dtype)
    if need > target.smem_bytes:
        raise Unsupported(
            f"the Triton attention kernels need about {need} bytes of shared memory for "
            f"block_size={tuple(block_size)}, head_dim={head_dim}, {jnp.dtype(dtype)}; "
            f"{target.name} has {target.smem_bytes}: use smaller blocks"
        )
    return config


# ------------------------------------------------------------------ shared math
def _keep_mask(mask_block, q_seg, kv_seg):
    """The kept elements of one ``(bq, bk)`` score block (bool), or None for all."""
    keep = None if mask_block is None else mask_block != 0
    if q_seg is not None:
        same = q_seg == kv_seg
        keep = same if keep is None else jnp.logical_and(keep, same)
    return keep


def _online_step(q, k, v, keep, m_prev, l_prev, acc_prev, *, scale, cap):
    """One block of the flash recurrence; ``m``/``l`` are ``(bq, 1)`` float32."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = s * scale
    if cap is not None:
        s = cap * jnp.tanh(s / cap)
    if keep is not None:
        s = jnp.where(keep, s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # A row with nothing kept so far has m = -inf: exponentiate against 0 instead.
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe)
    if keep is not None:
        p = jnp.where(keep, p, 0.0)
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return m_next, l_next, alpha * acc_prev + pv


def _finish(m, total, acc):
    """Normalised output and log-sum-exp; rows that kept nothing give 0 and -inf."""
    empty = total == 0.0
    out = acc / jnp.where(empty, 1.0, total)
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, total)))
    return out, lse


# ------------------------------------------------------------------ GPU kernel
def _gpu_kernel(*refs, nqb, fw, pw, shared_pattern, groups, bk, scale, cap, has_seg):
    fkv_ref, fcnt_ref, pkv_ref, pcnt_ref, pmsk_ref, q_ref, k_ref, v_ref, blk_ref = refs[:9]
    qs_ref, ks_ref = refs[9:11] if has_seg else (None, None)
    o_ref, lse_ref = refs[-2:]
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hk = lax.div(h, groups)  # non-negative: no floor-division fix-up
    row = i if shared_pattern else h * nqb + i
    q = q_ref[...]
    bq = q.shape[0]
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    def step(j, mask_block, carry):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[b, pl.ds(start, bk), hk, :]  # (B, S, H_kv, D): sequence-major
        v = v_ref[b, pl.ds(start, bk), hk, :]
        kv_seg = None if ks_ref is None else ks_ref[b, pl.ds(start, bk)][None, :]
        keep = _keep_mask(mask_block, q_seg, kv_seg)
        return _online_step(q, k, v, keep, *carry, scale=scale, cap=cap)

    def full_body(t, carry):
        return step(fkv_ref[row * fw + t], None, carry)

    def partial_body(t, carry):
        return step(pkv_ref[row * pw + t], blk_ref[pmsk_ref[row * pw + t]], carry)

    d = o_ref.shape[-1]
    carry = (
        jnp.full((bq, 1), -jnp.inf, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, d), jnp.float32),
    )
    carry = lax.fori_loop(0, fcnt_ref[row], full_body, carry)
    carry = lax.fori_loop(0, pcnt_ref[row], partial_body, carry)
    out, lse = _finish(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def _gpu_call(cfg, q, k, v, lists, blocks, q_seg, kv_seg, *, shared, scale, cap, interpret):
    """The Triton forward on sequence-major arrays: q (B, L, H, D), k, v (B, S, H_kv, D)."""
    bsz, lq, nh, d = q.shape
    bq, bk = cfg.block_size
    full_kv, full_count, partial_kv, partial_count, partial_mask = lists
    nqb = lq // bq
    has_seg = q_seg is not None
    kernel = functools.partial(
        _gpu_kernel, nqb=nqb, fw=full_kv.shape[-1], pw=partial_kv.shape[-1],
        shared_pattern=shared, groups=nh // k.shape[2], bk=bk, scale=scale, cap=cap,
        has_seg=has_seg,
    )  # fmt: skip
    q_spec = pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0))
    in_specs = [pl.no_block_spec] * 5 + [q_spec] + [pl.no_block_spec] * 3
    operands = [x.reshape(-1) for x in lists] + [q, k, v, blocks]
    if has_seg:
        in_specs += [pl.BlockSpec((None, bq), lambda b, h, i: (b, i)), pl.no_block_spec]
        operands += [q_seg, kv_seg]
    return pl.pallas_call(
        kernel,
        grid=(bsz, nh, nqb),
        in_specs=in_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((bsz, nh, lq), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="block_sparse_attention_fwd",
    )(*operands)


# ------------------------------------------------------------------ TPU kernel
def _tpu_kernel(*refs, nqb, fw, pw, shared_pattern, scale, cap, has_seg):
    fcnt_ref, pcnt_ref = refs[1], refs[3]
    q_ref, k_ref, v_ref, blk_ref = refs[5:9]
    qs_ref, ks_ref = refs[9:11] if has_seg else (None, None)
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[-5:]
    h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    row = i if shared_pattern else h * nqb + i

    @pl.when(t == 0)
    def _():
        m_ref[...] = jnp.full_like(m_ref, -jnp.inf)
        l_ref[...] = jnp.zeros_like(l_ref)
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def step(masked: bool):
        q_seg = None if qs_ref is None else qs_ref[...]
        kv_seg = None if ks_ref is None else ks_ref[...]
        keep = _keep_mask(blk_ref[...] if masked else None, q_seg, kv_seg)
        m, total, acc = _online_step(
            q_ref[...], k_ref[...], v_ref[...], keep, m_ref[...], l_ref[...], acc_ref[...],
            scale=scale, cap=cap,
        )  # fmt: skip
        m_ref[...], l_ref[...], acc_ref[...] = m, total, acc

    @pl.when(t < fcnt_ref[row])
    def _():
        step(masked=False)

    @pl.when(jnp.logical_and(t >= fw, t - fw < pcnt_ref[row]))
    def _():
        step(masked=True)

    @pl.when(t == fw + pw - 1)
    def _():
        out, lse = _finish(m_ref[...], l_ref[...], acc_ref[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _tpu_call(cfg, q, k, v, lists, blocks, q_seg, kv_seg, *, shared, scale, cap, interpret):
    bsz, nh, lq, d = q.shape
    bq, bk = cfg.block_size
    nqb = lq // bq
    groups = nh // k.shape[1]
    has_seg = q_seg is not None
    full_kv, full_count, partial_kv, partial_count, partial_mask = lists
    fw, pw = full_kv.shape[-1], partial_kv.shape[-1]

    def kv_block(h, i, t, fkv, pkv):
        row = i if shared else h * nqb + i
        # Full steps first, then partial ones; each index is clamped into its list.
        tf, tp = jnp.minimum(t, fw - 1), jnp.clip(t - fw, 0, pw - 1)
        return jnp.where(t < fw, fkv[row * fw + tf], pkv[row * pw + tp])

    def q_map(b, h, i, t, *_):
        return b, h, i, 0

    def kv_map(b, h, i, t, fkv, fcnt, pkv, pcnt, pmsk):
        return b, lax.div(h, jnp.int32(groups)), kv_block(h, i, t, fkv, pkv), 0

    def mask_map(b, h, i, t, fkv, fcnt, pkv, pcnt, pmsk):
        row = i if shared else h * nqb + i
        return pmsk[row * pw + jnp.clip(t - fw, 0, pw - 1)], 0, 0

    def q_seg_map(b, h, i, t, *_):
        return b, i, 0

    def kv_seg_map(b, h, i, t, fkv, fcnt, pkv, pcnt, pmsk):
        return b, kv_block(h, i, t, fkv, pkv), 0, 0

    in_specs = [
        pl.BlockSpec((None, None, bq, d), q_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, None, bk, d), kv_map),
        pl.BlockSpec((None, bq, bk), mask_map),
    ]
    operands = [q, k, v, blocks.astype(jnp.int32)]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, bq, 1), q_seg_map),
            pl.BlockSpec((None, None, 1, bk), kv_seg_map),
        ]
        operands += [q_seg[:, :, None], kv_seg.reshape(bsz, -1, 1, bk)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(bsz, nh, nqb, fw + pw),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, d), q_map),
            pl.BlockSpec((None, None, bq, 1), q_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _tpu_kernel, nqb=nqb, fw=fw, pw=pw, shared_pattern=shared, scale=scale, cap=cap,
        has_seg=has_seg,
    )  # fmt: skip
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((bsz, nh, lq, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="block_sparse_attention_fwd_tpu",
    )(*[x.reshape(-1) for x in lists], *operands)
    return out, lse[..., 0]


# ------------------------------------------------------------------ wrapper
def _check_operands(q, k, v, lists, mask_blocks, block_size, q_segment_ids, kv_segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "q, k and v must be (B, H, L, D), (B, H_kv, S, D), (B, H_kv, S, D); got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    bsz, nh, lq, d = q.shape
    if k.shape != v.shape or k.shape[0] != bsz or k.shape[3] != d:
        raise ValueError(
            f"k and v must be (B={bsz}, H_kv, S, D={d}) and equal, got {k.shape}, {v.shape}"
        )
    if nh % k.shape[1]:
        raise ValueError(f"key heads {k.shape[1]} must divide query heads {nh}")
    bq, bk = block_size
    if lq % bq or k.shape[2] % bk:
        raise ValueError(
            f"block_size {tuple(block_size)} must divide the padded lengths L={lq}, S={k.shape[2]}"
        )
    full_kv, full_count, partial_kv, partial_count, partial_mask = lists
    rows = (full_kv.shape[0], lq // bq)
    for name, arr, ndim in (
        ("full_kv", full_kv, 3), ("full_count", full_count, 2), ("partial_kv", partial_kv, 3),
        ("partial_count", partial_count, 2), ("partial_mask", partial_mask, 3),
    ):  # fmt: skip
        if arr.ndim != ndim or arr.shape[:2] != rows or (ndim == 3 and arr.shape[2] < 1):
            raise ValueError(
                f"{name} must be (Hm, L // bq={rows[1]}{', width >= 1' if ndim == 3 else ''})"
                f" with Hm = {rows[0]}, got {arr.shape}"
            )
    if rows[0] not in (1, nh):
        raise ValueError(f"the block lists must have 1 or H={nh} heads, got {rows[0]}")
    if partial_mask.shape != partial_kv.shape:
        raise ValueError(
            f"partial_mask must be like partial_kv {partial_kv.shape}, got {partial_mask.shape}"
        )
    if mask_blocks.ndim != 3 or mask_blocks.shape[1:] != (bq, bk) or not len(mask_blocks):
        raise ValueError(f"mask_blocks must be (M >= 1, bq={bq}, bk={bk}), got {mask_blocks.shape}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None and (
        q_segment_ids.shape != (bsz, lq) or kv_segment_ids.shape != (bsz, k.shape[2])
    ):
        raise ValueError(
            f"segment ids must be (B, L)={bsz, lq} and (B, S)={bsz, k.shape[2]}, got "
            f"{q_segment_ids.shape}, {kv_segment_ids.shape}"
        )


@functools.partial(
    jax.jit,
    static_argnames=(
        "block_size", "scale", "logits_soft_cap", "layout", "backend", "config", "interpret"
    ),
)  # fmt: skip
def block_sparse_attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    full_kv: jax.Array,
    full_count: jax.Array,
    partial_kv: jax.Array,
    partial_count: jax.Array,
    partial_mask: jax.Array,
    mask_blocks: jax.Array,
    *,
    block_size: tuple[int, int],
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
    layout: str = "BHLD",
    backend: str = "gpu",
    config: AttentionConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Block-sparse attention forward: ``(out, lse)`` over the listed key blocks only.

    Args:
      q: ``(B, H, L, D)``.
      k, v: ``(B, H_kv, S, D)``; ``H_kv`` divides ``H``.
      full_kv, full_count: ``(Hm, L // bq, F)`` key blocks kept whole per query
        block and ``(Hm, L // bq)`` their counts (``Hm``: 1 or ``H``).
      partial_kv, partial_count, partial_mask: ``(Hm, L // bq, P)`` key blocks kept
        in part, ``(Hm, L // bq)`` their counts, ``(Hm, L // bq, P)`` the index of
        each one's element mask in ``mask_blocks``.
      mask_blocks: ``(M >= 1, bq, bk)`` element masks (nonzero = keep).
      block_size: ``(bq, bk)``.
      q_segment_ids, kv_segment_ids: optional ``(B, L)`` / ``(B, S)`` integers.
      scale: multiplies the logits (default ``D ** -0.5``).
      logits_soft_cap: if given, logits become ``cap * tanh(logits / cap)``.
      layout: ``"BHLD"`` (the shapes above) or ``"BLHD"`` (``q (B, L, H, D)``, ``k,
        v (B, S, H_kv, D)``, ``out`` likewise: ``jax.nn.dot_product_attention``'s).
        The Triton kernel reads ``"BLHD"`` and the Mosaic one ``"BHLD"`` directly;
        the other layout is transposed on the way in and out.
      backend: ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic).
      config: launch configuration; default :func:`plan_attention`.
      interpret: run in the Pallas interpreter (any platform, e.g. CPU).

    Returns:
      ``out`` (``(B, H, L, D)``, or ``(B, L, H, D)`` for ``"BLHD"``) in ``q.dtype``
      and ``lse (B, H, L)`` float32 (``-inf`` on rows that keep nothing, whose
      output is 0).

    Raises:
      ValueError: inconsistent shapes.
      Unsupported: a dtype or block size the backend's kernel cannot handle.

    Example:
      One query block attending to key block 1 of 2 (kept whole), in the interpreter:

      >>> import jax.numpy as jnp
      >>> from pallas_kernels.attention import block_sparse_attention_fwd
      >>> q = jnp.ones((1, 1, 16, 16)); k = jnp.ones((1, 1, 32, 16))
      >>> v = jnp.concatenate([jnp.zeros((1, 1, 16, 16)), jnp.ones((1, 1, 16, 16))], 2)
      >>> one, none = jnp.ones((1, 1, 1), int), jnp.zeros((1, 1), int)
      >>> out, lse = block_sparse_attention_fwd(
      ...     q, k, v, one, jnp.ones((1, 1), int), one, none, 0 * one,
      ...     jnp.ones((1, 16, 16), bool), block_size=(16, 16), interpret=True)
      >>> float(out[0, 0, 0, 0]), round(float(lse[0, 0, 0]), 3)  # log(16) + 16 / 4
      (1.0, 6.773)
    """
    block_size = tuple(int(b) for b in block_size)
    lists = (full_kv, full_count, partial_kv, partial_count, partial_mask)
    if layout not in ("BHLD", "BLHD"):
        raise ValueError(f"layout must be 'BHLD' or 'BLHD', got {layout!r}")
    seq_major = layout == "BLHD"
    shapes = [_heads_first_shape(x) if seq_major else x for x in (q, k, v)]
    _check_operands(*shapes, lists, mask_blocks, block_size, q_segment_ids, kv_segment_ids)
    d = q.shape[-1]
    if config is None:
        config = plan_attention(block_size, d, q.dtype, backend=backend)
    else:
        check_dtype(q.dtype, k.dtype, v.dtype, kernel=_KERNELS)
        if config.block_size != block_size or config.backend != backend:
            raise ValueError(f"config {config} does not match {block_size=}, {backend=}")
    scale = float(d**-0.5 if scale is None else scale)
    cap = None if logits_soft_cap is None else float(logits_soft_cap)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if config.head_dim != d:  # zero features change neither scores nor outputs
        if config.head_dim < d:
            raise ValueError(f"config head_dim {config.head_dim} < D={d}")
        pad = ((0, 0), (0, 0), (0, 0), (0, config.head_dim - d))
        q, k, v = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    if q_segment_ids is not None:
        q_segment_ids = q_segment_ids.astype(jnp.int32)
        kv_segment_ids = kv_segment_ids.astype(jnp.int32)
    lists = tuple(x.astype(jnp.int32) for x in lists)
    blocks = mask_blocks.astype(jnp.int8) if mask_blocks.dtype == jnp.bool_ else mask_blocks
    # Triton reads sequence-major arrays, Mosaic heads-first ones.
    native = config.backend == "gpu"
    if seq_major != native:
        q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    call = _gpu_call if native else _tpu_call
    out, lse = call(
        config, q, k, v, lists, blocks, q_segment_ids, kv_segment_ids,
        shared=full_kv.shape[0] == 1, scale=scale, cap=cap, interpret=interpret,
    )  # fmt: skip
    if seq_major != native:
        out = jnp.swapaxes(out, 1, 2)
    return out[..., :d], lse


def _heads_first_shape(x):
    """A shape-only view of a sequence-major array as heads-first (for the checks)."""
    return jax.ShapeDtypeStruct((x.shape[0], x.shape[2], x.shape[1], *x.shape[3:]), x.dtype)


# ------------------------------------------------------------------ reference
def attention_mask_reference(
    full_kv: jax.Array,
    full_count: jax.Array,
    partial_kv: jax.Array,
    partial_count: jax.Array,
    partial_mask: jax.Array,
    mask_blocks: jax.Array,
    *,
    kv_blocks: int,
) -> jax.Array:
    """The dense ``(Hm, L, S)`` boolean mask that block lists describe (for references
    and tests: it *is* the ``L x S`` array the kernels avoid).

    Example:
      Two query blocks of 2: block 0 keeps key block 0 in part (lower triangle),
      block 1 keeps key block 0 whole and key block 1 in part:

      >>> import jax.numpy as jnp
      >>> from pallas_kernels.attention import attention_mask_reference
      >>> tri = jnp.tril(jnp.ones((2, 2), bool))[None]
      >>> m = attention_mask_reference(
      ...     jnp.array([[[0], [0]]]), jnp.array([[0, 1]]), jnp.array([[[0], [1]]]),
      ...     jnp.array([[1, 1]]), jnp.zeros((1, 2, 1), int), tri, kv_blocks=2)
      >>> m[0].astype(int).tolist()
      [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    """
    hm, nqb, _ = full_kv.shape
    _, bq, bk = mask_blocks.shape

    def scatter(ids, count, blocks):  # (Hm, nqb, W), (Hm, nqb), (Hm, nqb, W, bq, bk)
        valid = jnp.arange(ids.shape[-1])[None, None, :] < count[..., None]
        onehot = jax.nn.one_hot(ids, kv_blocks, dtype=jnp.int32) * valid[..., None]
        return jnp.einsum("hiwc,hiwqk->hiqck", onehot, blocks.astype(jnp.int32))

    full = jnp.ones(full_kv.shape + (bq, bk), jnp.int32)
    dense = scatter(full_kv, full_count, full) + scatter(
        partial_kv, partial_count, mask_blocks[partial_mask] != 0
    )
    return dense.reshape(hm, nqb * bq, kv_blocks * bk) > 0


def block_sparse_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    full_kv: jax.Array,
    full_count: jax.Array,
    partial_kv: jax.Array,
    partial_count: jax.Array,
    partial_mask: jax.Array,
    mask_blocks: jax.Array,
    *,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    logits_soft_cap: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pure-``jnp`` reference of :func:`block_sparse_attention_fwd`: the dense mask,
    a masked softmax over all ``L x S`` scores in float32.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.attention import block_sparse_attention_reference
      >>> q = k = v = jnp.ones((1, 1, 2, 2))
      >>> ids, none = jnp.zeros((1, 1, 1), int), jnp.zeros((1, 1), int)
      >>> out, lse = block_sparse_attention_reference(
      ...     q, k, v, ids, none, ids, none, ids, jnp.ones((1, 2, 2), bool))
      >>> out[0, 0].tolist(), lse[0, 0].tolist()  # nothing kept: zeros and -inf
      ([[0.0, 0.0], [0.0, 0.0]], [-inf, -inf])
    """
    nh, lk = q.shape[1], k.shape[2]
    groups = nh // k.shape[1]
    mask = attention_mask_reference(
        full_kv, full_count, partial_kv, partial_count, partial_mask, mask_blocks,
        kv_blocks=lk // mask_blocks.shape[2],
    )[None]  # fmt: skip
    if q_segment_ids is not None:
        mask = mask & (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
    kf = jnp.repeat(k, groups, axis=1).astype(jnp.float32)
    vf = jnp.repeat(v, groups, axis=1).astype(jnp.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32), kf) * scale
    if logits_soft_cap is not None:
        s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.where(mask, jnp.exp(s - m_safe), 0.0)
    total = jnp.sum(p, axis=-1, keepdims=True)
    empty = total == 0
    out = jnp.einsum("bhqk,bhkd->bhqd", p / jnp.where(empty, 1.0, total), vf)
    lse = jnp.where(empty, -jnp.inf, m_safe + jnp.log(jnp.where(empty, 1.0, total)))[..., 0]
    return out.astype(q.dtype), lse
