"""Block-sparse attention Pallas kernels: the flash-style forward over the listed key
blocks (output and log-sum-exp), the backward (``dq`` over the row view, ``dk``/``dv``
over the transposed view), a planner and dense references.

See :mod:`pallas_kernels.attention.forward` for the block-list layout.
"""

from pallas_kernels.attention.backward import (
    block_sparse_attention_bwd,
    block_sparse_attention_bwd_reference,
)
from pallas_kernels.attention.forward import (
    AttentionConfig,
    attention_mask_reference,
    block_sparse_attention_fwd,
    block_sparse_attention_reference,
    gpu_shared_memory,
    plan_attention,
)

__all__ = [
    "AttentionConfig",
    "attention_mask_reference",
    "block_sparse_attention_bwd",
    "block_sparse_attention_bwd_reference",
    "block_sparse_attention_fwd",
    "block_sparse_attention_reference",
    "gpu_shared_memory",
    "plan_attention",
]
