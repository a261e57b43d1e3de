"""Monarch Pallas kernels: ``M @ X`` for the block-diagonal factors in one fused kernel,
for GPU (Triton, :mod:`~pallas_kernels.monarch.matmul`) and TPU (Mosaic,
:mod:`~pallas_kernels.monarch.tpu`)."""

from pallas_kernels.monarch.matmul import (
    MonarchConfig,
    monarch_matmul,
    monarch_matmul_reference,
    plan_monarch,
)
from pallas_kernels.monarch.tpu import MonarchTpuConfig, monarch_matmul_tpu, plan_monarch_tpu

__all__ = [
    "MonarchConfig",
    "MonarchTpuConfig",
    "monarch_matmul",
    "monarch_matmul_reference",
    "monarch_matmul_tpu",
    "plan_monarch",
    "plan_monarch_tpu",
]
