"""Block-sparse flash attention, backward, as Pallas kernels: ``dq`` over the row view,
``dk`` and ``dv`` over the transposed view.

Given the forward's output ``o`` and log-sum-exp ``lse`` and the cotangents ``do``
and ``d_lse``, the probabilities are recomputed block by block (``p = exp(logits -
lse)``; no ``L x S`` residual) and, with ``delta = rowsum(do * o) - d_lse``,

* ``d_logits = p * (do @ v.T - delta)`` (times ``1 - tanh^2`` under a soft cap),
* ``dq = scale * d_logits @ k`` (summed over the key blocks of a query block),
* ``dk = scale * d_logits.T @ q`` and ``dv = p.T @ do`` (summed over the query blocks
  of a key block).

Two kernels per backend, each walking one view of the block mask (the layout of
:mod:`pallas_kernels.attention.forward`; the transposed view lists, for each key
block, its query blocks: ``full_q``/``full_q_count``, ``partial_q``/``partial_q_count``/
``partial_q_mask``, whose element masks are the same ``[query row, key column]``
tiles). GPU (Triton): a program per (batch, head, block) loops over its lists; TPU
(Mosaic): the lists are scalar prefetch and the grid's last axis walks them, the index
maps fetching the listed blocks. ``dk``/``dv`` are computed per query head in float32
and summed over the heads that share a key head by the wrapper.

Arrays in, arrays out: nothing here knows about autodiff or jsparse's block masks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.attention.forward import (
    AttentionConfig,
    block_sparse_attention_reference,
    plan_attention,
)
from pallas_kernels.common import check_dtype

__all__ = ["block_sparse_attention_bwd", "block_sparse_attention_bwd_reference"]

_KERNELS = "Pallas attention kernels"


# ------------------------------------------------------------------ shared math
def _dot(a, b, contract):
    return lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _grad_block(q, k, v, do, lse, delta, keep, *, scale, cap):
    """``(d_logits_scaled, p)`` of one ``(bq, bk)`` block, float32; ``lse``/``delta``
    are ``(bq, 1)``."""
    s = _dot(q, k, ((1,), (1,))) * scale
    if cap is not None:
        t = jnp.tanh(s / cap)
        s = cap * t
    ok = lse > -jnp.inf
    if keep is not None:
        ok = jnp.logical_and(ok, keep)
    p = jnp.where(ok, jnp.exp(s - jnp.where(lse > -jnp.inf, lse, 0.0)), 0.0)
    dp = _dot(do, v, ((1,), (1,)))
    ds = p * (dp - delta)
    if cap is not None:
        ds = ds * (1.0 - t * t)
    return ds * scale, p


def _keep(mask_block, q_seg, kv_seg):
    keep = None if mask_block is None else mask_block != 0
    if q_seg is not None:
        same = q_seg == kv_seg
        keep = same if keep is None else jnp.logical_and(keep, same)
    return keep


# ------------------------------------------------------------------ GPU kernels
def _gpu_dq_kernel(*refs, nqb, fw, pw, shared, groups, bk, scale, cap, has_seg):
    fkv, fcnt, pkv, pcnt, pmsk, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, blk = refs[:12]
    qs_ref, ks_ref = refs[12:14] if has_seg else (None, None)
    dq_ref = refs[-1]
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hk = lax.div(h, groups)
    row = i if shared else h * nqb + i
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], dl_ref[...][:, None]
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    def step(j, mask_block, acc):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[b, pl.ds(start, bk), hk, :]  # sequence-major (B, S, H_kv, D)
        v = v_ref[b, pl.ds(start, bk), hk, :]
        kv_seg = None if ks_ref is None else ks_ref[b, pl.ds(start, bk)][None, :]
        ds, _ = _grad_block(q, k, v, do, lse, delta, _keep(mask_block, q_seg, kv_seg),
                            scale=scale, cap=cap)  # fmt: skip
        return acc + _dot(ds.astype(k.dtype), k, ((1,), (0,)))

    acc = jnp.zeros(dq_ref.shape, jnp.float32)
    acc = lax.fori_loop(0, fcnt[row], lambda t, a: step(fkv[row * fw + t], None, a), acc)
    acc = lax.fori_loop(
        0, pcnt[row], lambda t, a: step(pkv[row * pw + t], blk[pmsk[row * pw + t]], a), acc
    )
    dq_ref[...] = acc.astype(dq_ref.dtype)


def _gpu_dkv_kernel(*refs, nkb, fw, pw, shared, groups, bq, scale, cap, has_seg):
    fq, fcnt, pq, pcnt, pmsk, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, blk = refs[:12]
    qs_ref, ks_ref = refs[12:14] if has_seg else (None, None)
    dk_ref, dv_ref = refs[-2:]
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    del groups  # k and v arrive as this head's key head (BlockSpec)
    col = j if shared else h * nkb + j
    k, v = k_ref[...], v_ref[...]
    kv_seg = None if ks_ref is None else ks_ref[...][None, :]

    def step(i, mask_block, carry):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        q = q_ref[b, pl.ds(start, bq), h, :]  # sequence-major (B, L, H, D)
        do = do_ref[b, pl.ds(start, bq), h, :]
        lse = lse_ref[b, h, pl.ds(start, bq)][:, None]
        delta = dl_ref[b, h, pl.ds(start, bq)][:, None]
        q_seg = None if qs_ref is None else qs_ref[b, pl.ds(start, bq)][:, None]
        ds, p = _grad_block(q, k, v, do, lse, delta, _keep(mask_block, q_seg, kv_seg),
                            scale=scale, cap=cap)  # fmt: skip
        dk = dk + _dot(ds.astype(q.dtype), q, ((0,), (0,)))
        dv = dv + _dot(p.astype(do.dtype), do, ((0,), (0,)))
        return dk, dv

    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    carry = lax.fori_loop(0, fcnt[col], lambda t, c: step(fq[col * fw + t], None, c),
                          (zeros, zeros))  # fmt: skip
    dk, dv = lax.fori_loop(
        0, pcnt[col], lambda t, c: step(pq[col * pw + t], blk[pmsk[col * pw + t]], c), carry
    )
    dk_ref[...] = dk
    dv_ref[...] = dv


def _gpu_calls(cfg, q, k, v, do, lse, delta, rows, cols, blocks, q_seg, kv_seg, *, shared,
               scale, cap, interpret):  # fmt: skip
    """The Triton backward on sequence-major arrays (q, do (B, L, H, D), k, v (B, S,
    H_kv, D)); dk, dv per query head (B, S, H, D) in float32."""
    bsz, lq, nh, d = q.shape
    lk = k.shape[1]
    bq, bk = cfg.block_size
    nqb, nkb = lq // bq, lk // bk
    groups = nh // k.shape[2]
    has_seg = q_seg is not None
    params = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.bwd_num_stages)
    seg_ops = [q_seg, kv_seg] if has_seg else []
    any_spec = pl.no_block_spec

    q_spec = pl.BlockSpec((None, bq, None, d), lambda b, h, i: (b, i, h, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(
            _gpu_dq_kernel, nqb=nqb, fw=rows[0].shape[-1], pw=rows[2].shape[-1],
            shared=shared, groups=groups, bk=bk, scale=scale, cap=cap, has_seg=has_seg,
        ),
        grid=(bsz, nh, nqb),
        in_specs=[any_spec] * 5 + [q_spec, any_spec, any_spec, q_spec, row_spec, row_spec,
                                   any_spec]
        + ([pl.BlockSpec((None, bq), lambda b, h, i: (b, i)), any_spec] if has_seg else []),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dq",
    )(*[x.reshape(-1) for x in rows], q, k, v, do, lse, delta, blocks, *seg_ops)  # fmt: skip

    kv_spec = pl.BlockSpec((None, bk, None, d), lambda b, h, j: (b, j, lax.div(h, groups), 0))
    out_spec = pl.BlockSpec((None, bk, None, d), lambda b, h, j: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(
            _gpu_dkv_kernel, nkb=nkb, fw=cols[0].shape[-1], pw=cols[2].shape[-1],
            shared=shared, groups=groups, bq=bq, scale=scale, cap=cap, has_seg=has_seg,
        ),
        grid=(bsz, nh, nkb),
        in_specs=[any_spec] * 5 + [any_spec, kv_spec, kv_spec, any_spec, any_spec, any_spec,
                                   any_spec]
        + ([any_spec, pl.BlockSpec((None, bk), lambda b, h, j: (b, j))] if has_seg else []),
        out_specs=[out_spec, out_spec],
        out_shape=[jax.ShapeDtypeStruct((bsz, lk, nh, d), jnp.float32)] * 2,
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dkv",
    )(*[x.reshape(-1) for x in cols], q, k, v, do, lse, delta, blocks, *seg_ops)  # fmt: skip
    return dq, dk, dv


# ------------------------------------------------------------------ TPU kernels
def _tpu_dq_kernel(*refs, nqb, fw, pw, shared, scale, cap, has_seg):
    fcnt, pcnt = refs[1], refs[3]
    q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, blk = refs[5:12]
    qs_ref, ks_ref = refs[12:14] if has_seg else (None, None)
    dq_ref, acc_ref = refs[-2:]
    h, i, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    row = i if shared else h * nqb + i

    @pl.when(t == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def step(masked):
        q_seg = None if qs_ref is None else qs_ref[...]
        kv_seg = None if ks_ref is None else ks_ref[...]
        k = k_ref[...]
        ds, _ = _grad_block(
            q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], dl_ref[...],
            _keep(blk[...] if masked else None, q_seg, kv_seg), scale=scale, cap=cap,
        )  # fmt: skip
        acc_ref[...] += _dot(ds.astype(k.dtype), k, ((1,), (0,)))

    @pl.when(t < fcnt[row])
    def _():
        step(False)

    @pl.when(jnp.logical_and(t >= fw, t - fw < pcnt[row]))
    def _():
        step(True)

    @pl.when(t == fw + pw - 1)
    def _():
        dq_ref[...] = acc_ref[...]


def _tpu_dkv_kernel(*refs, nkb, fw, pw, shared, scale, cap, has_seg):
    fcnt, pcnt = refs[1], refs[3]
    q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, blk = refs[5:12]
    qs_ref, ks_ref = refs[12:14] if has_seg else (None, None)
    dk_ref, dv_ref, dk_acc, dv_acc = refs[-4:]
    h, j, t = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    col = j if shared else h * nkb + j

    @pl.when(t == 0)
    def _():
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    def step(masked):
        q_seg = None if qs_ref is None else qs_ref[...]
        kv_seg = None if ks_ref is None else ks_ref[...]
        q, do = q_ref[...], do_ref[...]
        ds, p = _grad_block(
            q, k_ref[...], v_ref[...], do, lse_ref[...], dl_ref[...],
            _keep(blk[...] if masked else None, q_seg, kv_seg), scale=scale, cap=cap,
        )  # fmt: skip
        dk_acc[...] += _dot(ds.T.astype(q.dtype), q, ((1,), (0,)))
        dv_acc[...] += _dot(p.T.astype(do.dtype), do, ((1,), (0,)))

    @pl.when(t < fcnt[col])
    def _():
        step(False)

    @pl.when(jnp.logical_and(t >= fw, t - fw < pcnt[col]))
    def _():
        step(True)

    @pl.when(t == fw + pw - 1)
    def _():
        dk_ref[...] = dk_acc[...]
        dv_ref[...] = dv_acc[...]


def _listed(fw, pw, n, shared):
    """The block at step ``t`` of the (full, then partial) lists of owner ``o``."""

    def block(h, o, t, f_ids, p_ids):
        owner = o if shared else h * n + o
        tf, tp = jnp.minimum(t, fw - 1), jnp.clip(t - fw, 0, pw - 1)
        return jnp.where(t < fw, f_ids[owner * fw + tf], p_ids[owner * pw + tp])

    def mask_id(h, o, t, p_mask):
        owner = o if shared else h * n + o
        return p_mask[owner * pw + jnp.clip(t - fw, 0, pw - 1)]

    return block, mask_id


def _tpu_operand_specs(bq, bk, d, q_side, kv_side, mask_side):
    """BlockSpecs of ``(q, k, v, d_out, lse, delta, element masks)`` for one TPU
    backward kernel: the query-side operands follow ``q_side``, ``k`` and ``v``
    ``kv_side`` and the element mask ``mask_side`` (index maps of the grid)."""
    row_in = pl.BlockSpec((None, None, bq, 1), q_side)
    return [
        pl.BlockSpec((None, None, bq, d), q_side),
        pl.BlockSpec((None, None, bk, d), kv_side),
        pl.BlockSpec((None, None, bk, d), kv_side),
        pl.BlockSpec((None, None, bq, d), q_side),
        row_in,
        row_in,
        pl.BlockSpec((None, bq, bk), mask_side),
    ]


def _tpu_calls(cfg, q, k, v, do, lse, delta, rows, cols, blocks, q_seg, kv_seg, *, shared,
               scale, cap, interpret):  # fmt: skip
    bsz, nh, lq, d = q.shape
    lk = k.shape[2]
    bq, bk = cfg.block_size
    nqb, nkb = lq // bq, lk // bk
    groups = nh // k.shape[1]
    has_seg = q_seg is not None
    lse4, delta4 = lse[..., None], delta[..., None]
    blocks = blocks.astype(jnp.int32)
    seg_ops = [q_seg[:, :, None], kv_seg.reshape(bsz, -1, 1, bk)] if has_seg else []
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    )

    # dq: owner = query block i, steps walk its key blocks
    fw, pw = rows[0].shape[-1], rows[2].shape[-1]
    kv_of, mask_of = _listed(fw, pw, nqb, shared)

    def q_map(b, h, i, t, *_):
        return b, h, i, 0

    def kv_map(b, h, i, t, f, fc, p, pc, pm):
        return b, lax.div(h, jnp.int32(groups)), kv_of(h, i, t, f, p), 0

    def mask_map(b, h, i, t, f, fc, p, pc, pm):
        return mask_of(h, i, t, pm), 0, 0

    def kv_seg_map(b, h, i, t, f, fc, p, pc, pm):
        return b, kv_of(h, i, t, f, p), 0, 0

    specs = _tpu_operand_specs(bq, bk, d, q_map, kv_map, mask_map)
    if has_seg:
        specs += [
            pl.BlockSpec((None, bq, 1), lambda b, h, i, t, *_: (b, i, 0)),
            pl.BlockSpec((None, None, 1, bk), kv_seg_map),
        ]
    dq = pl.pallas_call(
        functools.partial(
            _tpu_dq_kernel,
            nqb=nqb,
            fw=fw,
            pw=pw,
            shared=shared,
            scale=scale,
            cap=cap,
            has_seg=has_seg,
        ),  # fmt: skip
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(bsz, nh, nqb, fw + pw),
            in_specs=specs,
            out_specs=pl.BlockSpec((None, None, bq, d), q_map),
            scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dq_tpu",
    )(*[x.reshape(-1) for x in rows], q, k, v, do, lse4, delta4, blocks, *seg_ops)

    # dk, dv: owner = key block j, steps walk its query blocks
    fw, pw = cols[0].shape[-1], cols[2].shape[-1]
    q_of, mask_of = _listed(fw, pw, nkb, shared)

    def qside_map(b, h, j, t, f, fc, p, pc, pm):
        return b, h, q_of(h, j, t, f, p), 0

    def own_kv_map(b, h, j, t, *_):
        return b, lax.div(h, jnp.int32(groups)), j, 0

    def out_map(b, h, j, t, *_):
        return b, h, j, 0

    def cmask_map(b, h, j, t, f, fc, p, pc, pm):
        return mask_of(h, j, t, pm), 0, 0

    def q_seg_map(b, h, j, t, f, fc, p, pc, pm):
        return b, q_of(h, j, t, f, p), 0

    def own_seg_map(b, h, j, t, *_):
        return b, j, 0, 0

    specs = _tpu_operand_specs(bq, bk, d, qside_map, own_kv_map, cmask_map)
    if has_seg:
        specs += [
            pl.BlockSpec((None, bq, 1), q_seg_map),
            pl.BlockSpec((None, None, 1, bk), own_seg_map),
        ]
    out = pl.BlockSpec((None, None, bk, d), out_map)
    dk, dv = pl.pallas_call(
        functools.partial(
            _tpu_dkv_kernel,
            nkb=nkb,
            fw=fw,
            pw=pw,
            shared=shared,
            scale=scale,
            cap=cap,
            has_seg=has_seg,
        ),  # fmt: skip
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(bsz, nh, nkb, fw + pw),
            in_specs=specs,
            out_specs=[out, out],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32)] * 2,
        ),
        out_shape=[jax.ShapeDtypeStruct((bsz, nh, lk, d), jnp.float32)] * 2,
        compiler_params=params,
        interpret=interpret,
        name="block_sparse_attention_dkv_tpu",
    )(*[x.reshape(-1) for x in cols], q, k, v, do, lse4, delta4, blocks, *seg_ops)
    return dq, dk, dv


# ------------------------------------------------------------------ wrapper
@functools.partial(
    jax.jit,
    static_argnames=(
        "block_size", "scale", "logits_soft_cap", "layout", "backend", "config", "interpret"
    ),
)  # fmt: skip
def block_sparse_attention_bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    d_out: jax.Array,
    d_lse: jax.Array | None,
    row_lists: tuple[jax.Array, ...],
    col_lists: tuple[jax.Array, ...],
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
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients ``(dq, dk, dv)`` of block-sparse attention, from the forward's
    ``out`` and ``lse`` and the cotangents ``d_out`` (and ``d_lse``).

    Args:
      q, k, v, out, lse: as :func:`~pallas_kernels.attention.block_sparse_attention_fwd`
        takes and returns them (``(B, H, L, D)``, ``(B, H_kv, S, D)``, ``lse (B, H, L)``).
      d_out: ``(B, H, L, D)``; d_lse: ``(B, H, L)`` or None (zeros).
      row_lists: ``(full_kv, full_count, partial_kv, partial_count, partial_mask)``,
        the row view (query block -> key blocks).
      col_lists: ``(full_q, full_q_count, partial_q, partial_q_count,
        partial_q_mask)``, the transposed view (key block -> query blocks), whose mask
        ids index the same ``[query row, key column]`` tiles of ``mask_blocks``.
      mask_blocks, block_size, q_segment_ids, kv_segment_ids, scale,
        logits_soft_cap, layout, backend, config, interpret: as for the forward
        (``"BLHD"``: ``q``, ``out``, ``d_out`` and ``dq`` are ``(B, L, H, D)``,
        ``k``, ``v``, ``dk``, ``dv`` ``(B, S, H_kv, D)``).

    Returns:
      ``dq`` in ``q.dtype``; ``dk``, ``dv`` in ``k.dtype`` (summed over the query
      heads that share a key head).

    Raises:
      ValueError: inconsistent shapes. Unsupported: as for the forward.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from pallas_kernels.attention import (block_sparse_attention_bwd,
      ...     block_sparse_attention_bwd_reference, block_sparse_attention_fwd)
      >>> q = jax.random.normal(jax.random.key(0), (1, 1, 32, 16))
      >>> ids = jnp.array([[[0], [0]]]); counts = jnp.array([[1, 1]])
      >>> rows = (ids, counts, ids, 0 * counts, 0 * ids)   # both query blocks -> key 0
      >>> cols = (jnp.array([[[0, 1], [0, 0]]]), jnp.array([[2, 0]]), jnp.zeros((1, 2, 1), int),
      ...         jnp.array([[0, 0]]), jnp.zeros((1, 2, 1), int))
      >>> blocks = jnp.ones((1, 16, 16), bool)
      >>> out, lse = block_sparse_attention_fwd(q, q, q, *rows, blocks, block_size=(16, 16),
      ...                                       interpret=True)
      >>> dq, dk, dv = block_sparse_attention_bwd(q, q, q, out, lse, out, None, rows, cols,
      ...                                         blocks, block_size=(16, 16), interpret=True)
      >>> ref = block_sparse_attention_bwd_reference(q, q, q, out, None, rows, blocks)
      >>> bool(jnp.allclose(dq, ref[0], atol=1e-5)), bool(jnp.allclose(dv, ref[2], atol=1e-5))
      (True, True)
    """
    block_size = tuple(int(b) for b in block_size)
    if layout not in ("BHLD", "BLHD"):
        raise ValueError(f"layout must be 'BHLD' or 'BLHD', got {layout!r}")
    seq_major = layout == "BLHD"
    if seq_major:
        bsz, lq, nh, d = q.shape
    else:
        bsz, nh, lq, d = q.shape
    if out.shape != q.shape or d_out.shape != q.shape or lse.shape != (bsz, nh, lq):
        raise ValueError(
            f"out and d_out must be like q {q.shape} and lse (B, H, L), got {out.shape}, "
            f"{d_out.shape}, {lse.shape}"
        )
    if len(row_lists) != 5 or len(col_lists) != 5:
        raise ValueError("row_lists and col_lists must each hold the five index arrays")
    hkv, lk = (k.shape[2], k.shape[1]) if seq_major else (k.shape[1], k.shape[2])
    nkb = lk // block_size[1]
    if col_lists[1].shape != (row_lists[1].shape[0], nkb):
        raise ValueError(
            f"col_lists must be the transposed view: counts (Hm, S // bk = {nkb}), got "
            f"{col_lists[1].shape}"
        )
    if config is None:
        config = plan_attention(block_size, d, q.dtype, backend=backend)
    else:
        check_dtype(q.dtype, k.dtype, v.dtype, kernel=_KERNELS)
    scale = float(d**-0.5 if scale is None else scale)
    cap = None if logits_soft_cap is None else float(logits_soft_cap)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    if seq_major:
        delta = jnp.swapaxes(delta, 1, 2)  # (B, L, H) -> (B, H, L)
    if d_lse is not None:
        delta = delta - d_lse.astype(jnp.float32)
    lse = lse.astype(jnp.float32)
    dtype = jnp.result_type(q.dtype, k.dtype, v.dtype)
    ops = [x.astype(dtype) for x in (q, k, v, d_out)]
    if config.head_dim != d:
        pad = ((0, 0), (0, 0), (0, 0), (0, config.head_dim - d))
        ops = [jnp.pad(x, pad) for x in ops]
    # Triton reads sequence-major arrays, Mosaic heads-first ones.
    native = config.backend == "gpu"
    if seq_major != native:
        ops = [jnp.swapaxes(x, 1, 2) for x in ops]
    if q_segment_ids is not None:
        q_segment_ids = q_segment_ids.astype(jnp.int32)
        kv_segment_ids = kv_segment_ids.astype(jnp.int32)
    rows = tuple(x.astype(jnp.int32) for x in row_lists)
    cols = tuple(x.astype(jnp.int32) for x in col_lists)
    blocks = mask_blocks.astype(jnp.int8) if mask_blocks.dtype == jnp.bool_ else mask_blocks
    calls = _gpu_calls if native else _tpu_calls
    dq, dk, dv = calls(
        config, *ops, lse, delta, rows, cols, blocks, q_segment_ids, kv_segment_ids,
        shared=rows[0].shape[0] == 1, scale=scale, cap=cap, interpret=interpret,
    )  # fmt: skip
    groups = nh // hkv
    if native:  # (B, S, H, D) per query head -> (B, S, H_kv, D)
        dk = dk.reshape(bsz, lk, hkv, groups, -1).sum(axis=3)
        dv = dv.reshape(bsz, lk, hkv, groups, -1).sum(axis=3)
    else:  # (B, H, S, D) -> (B, H_kv, S, D)
        dk = dk.reshape(bsz, hkv, groups, lk, -1).sum(axis=2)
        dv = dv.reshape(bsz, hkv, groups, lk, -1).sum(axis=2)
    if seq_major != native:
        dq, dk, dv = (jnp.swapaxes(x, 1, 2) for x in (dq, dk, dv))
    return dq[..., :d].astype(q.dtype), dk[..., :d].astype(k.dtype), dv[..., :d].astype(v.dtype)


def block_sparse_attention_bwd_reference(
    q, k, v, d_out, d_lse, row_lists, mask_blocks, *, q_segment_ids=None, kv_segment_ids=None,
    scale=None, logits_soft_cap=None,
):  # fmt: skip
    """Pure-``jnp`` reference of :func:`block_sparse_attention_bwd`: JAX's autodiff of
    the dense reference forward (``L x S``), pulled back from ``(d_out, d_lse)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.attention import block_sparse_attention_bwd_reference
      >>> x = jnp.ones((1, 1, 2, 2))
      >>> one = jnp.zeros((1, 1, 1), int)
      >>> rows = (one, jnp.ones((1, 1), int), one, jnp.zeros((1, 1), int), one)
      >>> dq, dk, dv = block_sparse_attention_bwd_reference(
      ...     x, x, x, x, None, rows, jnp.ones((1, 2, 2), bool))
      >>> dv[0, 0].tolist()  # each key gets half of each query's d_out
      [[1.0, 1.0], [1.0, 1.0]]
    """

    def fwd(q, k, v):
        return block_sparse_attention_reference(
            q, k, v, *row_lists, mask_blocks, q_segment_ids=q_segment_ids,
            kv_segment_ids=kv_segment_ids, scale=scale, logits_soft_cap=logits_soft_cap,
        )  # fmt: skip

    (out, lse), pullback = jax.vjp(fwd, q, k, v)
    d_lse = jnp.zeros_like(lse) if d_lse is None else jnp.where(lse > -jnp.inf, d_lse, 0.0)
    return pullback((d_out.astype(out.dtype), d_lse))
