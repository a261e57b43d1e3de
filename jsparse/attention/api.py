"""``block_sparse_attention``: attention over the stored blocks of a block mask."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jsparse.attention.block_mask import BlockMask
from jsparse.attention.kernels import OP, AttentionConfig
from jsparse.core.registry import check_impl, run

__all__ = ["DENSE_THRESHOLD", "auto_order", "block_sparse_attention"]

# impl="auto" runs "dense" first when the XLA plan would compute at least this
# fraction of the nq * nk blocks (a nearly full pattern gains nothing from sparsity).
DENSE_THRESHOLD = 0.85


def auto_order(mask: BlockMask) -> dict[str, list[str]]:
    """The candidates ``impl="auto"`` tries, per platform (static: from shapes).

    Example:
      >>> import jsparse.attention as ja
      >>> m = ja.BlockMask.from_fn(ja.local(3), 64, 64, block_size=(4, 4))
      >>> ja.auto_order(m)["cpu"], ja.auto_order(m)["cuda"]
      (['xla'], ['pallas', 'xla'])
      >>> ja.auto_order(ja.BlockMask.from_fn(ja.full(), 8, 8, block_size=(4, 4)))["cpu"]
      ['dense', 'xla']
    """
    front = ["dense"] if mask.scheduled_fraction() >= DENSE_THRESHOLD else []
    accel = [*front, "pallas", "xla"]
    return {"cuda": accel, "tpu": accel, "default": [*front, "xla"], "cpu": [*front, "xla"]}


def _check_array(x, name, ndim):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions (B, L, H, D), got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got {x.dtype}")


def _segments(segment_ids, b, L, S):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, tuple | list):
        if len(segment_ids) != 2:
            raise ValueError("segment_ids must be an array (B, L) or a pair (q_ids, kv_ids)")
        q_ids, kv_ids = (jnp.asarray(x) for x in segment_ids)
    else:
        if L != S:
            raise ValueError(
                f"one segment_ids array needs q_len == kv_len, got {L} and {S}: pass a pair "
                "(q_segment_ids, kv_segment_ids)"
            )
        q_ids = kv_ids = jnp.asarray(segment_ids)
    for ids, n, what in ((q_ids, L, "query"), (kv_ids, S, "key")):
        if ids.shape != (b, n):
            raise ValueError(f"{what} segment ids must have shape {(b, n)}, got {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"segment ids must be integers, got {ids.dtype}")
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: BlockMask,
    *,
    scale: float | None = None,
    segment_ids=None,
    logits_soft_cap: float | None = None,
    return_lse: bool = False,
    impl: str = "auto",
):
    """Attention over the blocks stored in ``mask`` (never an ``L x S`` score matrix).

    Same layout as :func:`jax.nn.dot_product_attention`. Online softmax over the
    stored key blocks of each query block, float32 accumulation, the input dtype
    out. Rows that attend to nothing return zeros (never NaN). Differentiable in
    ``q, k, v`` in reverse mode (``jax.grad``: a sparse backward, ``dq`` from the
    mask's rows and ``dk, dv`` from its transposed view, scores recomputed from the
    saved log-sum-exp) and in forward mode (``jax.jvp``); ``jax.vmap`` works.

    Args:
      q: queries ``(B, L, H, D)``.
      k, v: keys and values ``(B, S, H_kv, D)``; ``H_kv`` divides ``H`` (grouped-query
        / multi-query attention: query head ``h`` uses key head ``h // (H // H_kv)``).
      mask: a :class:`BlockMask` with ``q_len == L``, ``kv_len == S`` and 1 or ``H``
        heads.
      scale: multiplies ``q . k`` (default ``1 / sqrt(D)``).
      segment_ids: None, an integer array ``(B, L)`` (needs ``L == S``) or a pair
        ``(q_ids (B, L), kv_ids (B, S))``: position ``i`` attends to ``j`` only if their
        ids are equal (on top of ``mask``; for packed batches whose documents differ
        per example).
      logits_soft_cap: ``c``: logits become ``c * tanh(logits / c)``.
      return_lse: also return the log-sum-exp of the logits, ``(B, H, L)`` float32
        (``-inf`` for rows that attend to nothing).
      impl: ``"auto"``, ``"xla"``, ``"dense"`` or a registered name (``"pallas"``).

    Returns:
      ``out`` ``(B, L, H, D)`` in ``q.dtype``, or ``(out, lse)`` with ``return_lse``.

    Raises:
      ValueError: mismatched shapes or head counts, a mask for other lengths or head
        counts, bad segment ids or an unknown ``impl``.
      TypeError: non-floating inputs or mismatched dtypes.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse.attention as ja
      >>> q = jax.random.normal(jax.random.key(0), (1, 16, 2, 8))
      >>> mask = ja.BlockMask.from_fn(ja.causal() & ja.local(7), 16, 16, block_size=(4, 4))
      >>> out = ja.block_sparse_attention(q, q, q, mask)
      >>> out.shape
      (1, 16, 2, 8)
      >>> dense = jax.nn.dot_product_attention(q, q, q, mask=mask.to_dense()[None])
      >>> bool(jnp.allclose(out, dense, atol=1e-5))
      True
    """
    check_impl(impl)
    _check_array(q, "q", 4)
    _check_array(k, "k", 4)
    _check_array(v, "v", 4)
    if not isinstance(mask, BlockMask):
        raise TypeError(f"mask must be a BlockMask, got {type(mask).__name__}")
    b, L, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape} and {v.shape}")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"k must be (B={b}, S, H_kv, D={d}) like q (B, L, H, D), got k {k.shape}, q {q.shape}"
        )
    S, hkv = k.shape[1], k.shape[2]
    if hkv < 1 or h % hkv:
        raise ValueError(
            f"the number of key/value heads ({hkv}) must divide the number of query heads ({h})"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (mask.q_len, mask.kv_len) != (L, S):
        raise ValueError(
            f"the mask was built for q_len={mask.q_len}, kv_len={mask.kv_len}, but q has length "
            f"{L} and k {S}"
        )
    if mask.num_heads not in (1, h):
        raise ValueError(
            f"the mask has {mask.num_heads} heads; it must have 1 (shared) or H={h} (one per "
            "query head)"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if logits_soft_cap is not None and not logits_soft_cap > 0:
        raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
    q_ids, kv_ids = _segments(segment_ids, b, L, S)
    bq, bk = mask.block_size
    nq, nk = mask.num_blocks
    lp, sp = nq * bq, nk * bk
    config = AttentionConfig(
        scale=float(scale),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        q_len=L,
        kv_len=S,
        block_size=(bq, bk),
        num_heads=h,
        num_kv_heads=hkv,
    )

    def pad(x, n):
        return x if x.shape[1] == n else jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * 2)

    def pad_ids(x, n):
        return (
            x
            if x is None or x.shape[1] == n
            else jnp.pad(x, [(0, 0), (0, n - x.shape[1])], constant_values=-1)
        )

    out, lse = run(
        OP, BlockMask, impl, auto_order(mask),
        pad(q, lp), pad(k, sp), pad(v, sp), mask, pad_ids(q_ids, lp), pad_ids(kv_ids, sp),
        config=config,
    )  # fmt: skip
    out = out[:, :L]
    if return_lse:
        return out, lse[:, :, :L].astype(jnp.promote_types(q.dtype, jnp.float32))
    return out
