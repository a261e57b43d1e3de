"""Block-sparse attention's ``"pallas"`` implementation: the Pallas kernels of
:mod:`pallas_kernels.attention` behind the attention registry.

The kernels read a :class:`~jsparse.attention.BlockMask`'s row view as it is stored
(``full_kv``, ``full_count``, ``partial_kv``, ``partial_count``, ``partial_mask``,
``mask_blocks``): nothing is converted per call. The arrays keep
``jax.nn.dot_product_attention``'s layout (``layout="BLHD"``): the Triton kernels
read it directly; for the Mosaic kernels (heads first) the kernel wrapper transposes
``q``, ``k``, ``v`` and the results.

Registered per platform, as for the sparse products:

* ``cuda``: the Triton forward kernel (a ``fori_loop`` over each query block's
  stored key blocks, indices read inside the kernel);
* ``tpu``: the Mosaic forward kernel (the key-block ids as scalar prefetch, read by
  the ``k``/``v`` index maps);
* every other platform: the GPU-style kernels in the Pallas interpreter, so that
  ``impl="pallas"`` is testable on CPU (``impl="auto"`` never picks it there).

**Backward**: Pallas kernels too (:func:`pallas_kernels.attention.block_sparse_attention_bwd`):
``dq`` over the row view, ``dk``/``dv`` over the mask's transposed view (``full_q``,
``partial_q`` ...), probabilities recomputed from the saved log-sum-exp. The
forward-mode tangent is the XLA one (as for every implementation).

The ``supports`` check asks the kernel's planner
(:func:`pallas_kernels.attention.plan_attention`) and declines symbolic shapes
(``jax.export``); its reason becomes the registry's.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from jsparse.attention import xla
from jsparse.attention.kernels import AttentionKernels, register_attention_impl
from jsparse.core.checks import is_static_dim
from jsparse.core.registry import on_platform
from pallas_kernels.attention import (
    block_sparse_attention_bwd,
    block_sparse_attention_fwd,
    plan_attention,
)
from pallas_kernels.common import Unsupported

__all__ = ["kernels", "unsupported_reason"]


def _forward(q, k, v, mask, q_seg, kv_seg, *, config, backend, interpret):
    return block_sparse_attention_fwd(
        q, k, v,
        mask.full_kv, mask.full_count, mask.partial_kv, mask.partial_count,
        mask.partial_mask, mask.mask_blocks,
        block_size=config.block_size, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        scale=config.scale, logits_soft_cap=config.logits_soft_cap,
        layout="BLHD", backend=backend, interpret=interpret,
    )  # fmt: skip


def _backward(q, k, v, out, lse, d_out, d_lse, mask, q_seg, kv_seg, *, config, backend,
              interpret):  # fmt: skip
    rows = (mask.full_kv, mask.full_count, mask.partial_kv, mask.partial_count,
            mask.partial_mask)  # fmt: skip
    cols = (mask.full_q, mask.full_q_count, mask.partial_q, mask.partial_q_count,
            mask.partial_q_mask)  # fmt: skip
    return block_sparse_attention_bwd(
        q, k, v, out, lse, d_out, d_lse, rows, cols, mask.mask_blocks,
        block_size=config.block_size, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        scale=config.scale, logits_soft_cap=config.logits_soft_cap,
        layout="BLHD", backend=backend, interpret=interpret,
    )  # fmt: skip


@functools.cache
def kernels(backend: str, interpret: bool) -> AttentionKernels:
    """The attention bundle of one Pallas backend (``"gpu"`` or ``"tpu"``).

    Compiled kernels are marked as code for their platform only (``on_platform``), so
    a multi-platform export does not lower them for the others; Triton kernels cannot
    be serialized, so an export for CUDA runs the XLA kernels instead.

    Example:
      >>> from jsparse.attention.pallas import kernels
      >>> kernels("gpu", True).backward.func.__name__
      '_backward'
    """
    forward = functools.partial(_forward, backend=backend, interpret=interpret)
    backward = functools.partial(_backward, backend=backend, interpret=interpret)
    if not interpret:
        platform = "cuda" if backend == "gpu" else "tpu"
        cuda = platform == "cuda"
        forward = on_platform(platform, forward, export_fallback=xla.forward if cuda else None)
        backward = on_platform(platform, backward, export_fallback=xla.backward if cuda else None)
    return AttentionKernels(forward=forward, backward=backward)


def unsupported_reason(q, k, v, mask, q_seg, kv_seg, *, config, backend: str) -> str | None:
    """``None`` if the ``backend`` kernel handles this call (padded arguments, as the
    registry passes them), else the reason.

    Example:
      >>> import jax.numpy as jnp, jsparse.attention as ja
      >>> from jsparse.attention.kernels import AttentionConfig
      >>> from jsparse.attention.pallas import unsupported_reason
      >>> m = ja.BlockMask.from_fn(ja.causal(), 64, 64, block_size=(32, 32))
      >>> q = jnp.ones((1, 64, 2, 16))
      >>> c = AttentionConfig(0.25, None, 64, 64, (32, 32), 2, 2)
      >>> unsupported_reason(q, q, q, m, None, None, config=c, backend="gpu") is None
      True
      >>> print(unsupported_reason(q, q, q, m, None, None, config=c, backend="tpu"))
      the TPU attention kernel needs bq a multiple of 8 and bk a multiple of 128, got ...
    """
    del mask, q_seg, kv_seg
    for name, x in (("q", q), ("k", k)):
        if not all(is_static_dim(d) for d in x.shape):
            return (
                f"{name} has a symbolic shape {x.shape} (jax.export shape polymorphism); the "
                "Pallas attention kernels need static shapes"
            )
    try:
        plan_attention(config.block_size, q.shape[-1], jnp.result_type(q, k, v), backend=backend)
    except Unsupported as e:
        return str(e)
    return None


def _register(platform: str | None, backend: str, interpret: bool) -> None:
    supports = functools.partial(unsupported_reason, backend=backend)
    register_attention_impl(
        "pallas", kernels(backend, interpret), supports=supports, platform=platform
    )


_register(None, "gpu", interpret=True)
_register("cuda", "gpu", interpret=False)
_register("tpu", "tpu", interpret=False)
