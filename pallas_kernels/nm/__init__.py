"""N:M Pallas kernels: ``A @ X``, ``A.T @ X`` and ``U @ V.T`` at the kept entries,
reading the compressed values and positions; GPU (Triton, :mod:`~pallas_kernels.nm.spmm`)
and TPU (Mosaic, :mod:`~pallas_kernels.nm.tpu`)."""

from pallas_kernels.nm.spmm import (
    NMConfig,
    nm_decompress_reference,
    nm_sampled,
    nm_sampled_reference,
    nm_spmm,
    nm_spmm_reference,
    nm_spmm_t,
    plan_nm,
)
from pallas_kernels.nm.tpu import NMTpuConfig, nm_sampled_tpu, nm_spmm_tpu, plan_nm_tpu

__all__ = [
    "NMConfig",
    "NMTpuConfig",
    "nm_decompress_reference",
    "nm_sampled",
    "nm_sampled_reference",
    "nm_sampled_tpu",
    "nm_spmm",
    "nm_spmm_reference",
    "nm_spmm_t",
    "nm_spmm_tpu",
    "plan_nm",
    "plan_nm_tpu",
]
