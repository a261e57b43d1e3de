"""BCSR Pallas kernels: block-sparse times dense (:func:`bcsr_spmm`) and the
block-sampled dense-dense product (:func:`bcsr_sddmm`)."""

from pallas_kernels.bcsr.sddmm import SddmmConfig, bcsr_sddmm, bcsr_sddmm_reference, plan_sddmm
from pallas_kernels.bcsr.spmm import (
    SpmmConfig,
    bcsr_spmm,
    bcsr_spmm_reference,
    csc_view,
    plan_spmm,
    row_ids_from_pointer,
    row_pointer,
)

__all__ = [
    "SddmmConfig",
    "SpmmConfig",
    "bcsr_sddmm",
    "bcsr_sddmm_reference",
    "bcsr_spmm",
    "bcsr_spmm_reference",
    "csc_view",
    "plan_sddmm",
    "plan_spmm",
    "row_ids_from_pointer",
    "row_pointer",
]
