"""N:M Pallas kernels (GPU/Triton): ``A @ X``, ``A.T @ X`` and ``U @ V.T`` at the
kept entries, reading the compressed values and positions."""

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

__all__ = [
    "NMConfig",
    "nm_decompress_reference",
    "nm_sampled",
    "nm_sampled_reference",
    "nm_spmm",
    "nm_spmm_reference",
    "nm_spmm_t",
    "plan_nm",
]
