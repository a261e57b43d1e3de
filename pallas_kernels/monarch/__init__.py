"""Monarch Pallas kernel (GPU/Triton): ``M @ X`` for the block-diagonal factors in
one fused kernel."""

from pallas_kernels.monarch.matmul import (
    MonarchConfig,
    monarch_matmul,
    monarch_matmul_reference,
    plan_monarch,
)

__all__ = ["MonarchConfig", "monarch_matmul", "monarch_matmul_reference", "plan_monarch"]
