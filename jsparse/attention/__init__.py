"""Block-sparse attention: masks as block-sparse patterns, a sparse backward.

The score matrix of attention is cut into ``bq x bk`` blocks; a :class:`BlockMask`
(a pytree whose index arrays are leaves) lists, for every query block, the key blocks
it attends to, split into **full** blocks (no element mask) and **partial** blocks
(with a stored element mask), plus the transposed view (for every key block, its
query blocks) that the backward pass walks for ``dk, dv``. Masks are built

* from mask functions, block by block, without forming ``L x S``
  (:meth:`BlockMask.from_fn`): :func:`causal`, :func:`local`, :func:`strided`,
  :func:`global_tokens`, :func:`segments`, :func:`prefix_lm`, combined with ``&``,
  ``|`` and ``~``, or any ``f(q_idx, kv_idx) -> bool`` on broadcasting integer arrays;
* from a dense boolean ``(L, S)`` or ``(H, L, S)`` array (:meth:`BlockMask.from_dense`).

:func:`block_sparse_attention` computes attention over the stored blocks only, with
``jax.nn.dot_product_attention``'s layout (``q (B, L, H, D)``, ``k, v (B, S, H_kv, D)``,
GQA/MQA), differentiable in both modes and batchable. Implementations: ``"xla"``
(``lax.scan`` over the stored blocks; the CPU path), ``"dense"`` (the mask
materialised) and kernels registered with
:func:`~jsparse.attention.kernels.register_attention_impl` (``"pallas"``).

The full layout (array names, shapes, padding) is in
:mod:`jsparse.attention.block_mask`; the kernel contract in
:mod:`jsparse.attention.kernels`.

Example:
  >>> import jax, jax.numpy as jnp, jsparse.attention as ja
  >>> mask = ja.BlockMask.from_fn(ja.causal() & (ja.local(63) | ja.global_tokens(8)),
  ...                             256, 256, block_size=(32, 32))
  >>> round(mask.density(), 2)
  0.41
  >>> q = jax.random.normal(jax.random.key(0), (2, 256, 4, 16))
  >>> ja.block_sparse_attention(q, q, q, mask).shape
  (2, 256, 4, 16)
"""

# pallas registers impl="pallas" (its module belongs with the Pallas kernels).
from jsparse.attention import kernels, masks, pallas, xla  # noqa: F401
from jsparse.attention.api import DENSE_THRESHOLD, auto_order, block_sparse_attention
from jsparse.attention.block_mask import BlockMask, XlaPlan
from jsparse.attention.kernels import AttentionConfig, AttentionKernels, register_attention_impl
from jsparse.attention.masks import (
    MaskFn,
    as_mask_fn,
    causal,
    full,
    global_tokens,
    local,
    prefix_lm,
    segments,
    strided,
)

__all__ = [
    "DENSE_THRESHOLD",
    "AttentionConfig",
    "AttentionKernels",
    "BlockMask",
    "MaskFn",
    "XlaPlan",
    "as_mask_fn",
    "auto_order",
    "block_sparse_attention",
    "causal",
    "full",
    "global_tokens",
    "local",
    "prefix_lm",
    "register_attention_impl",
    "segments",
    "strided",
]
