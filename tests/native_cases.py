"""Shared pieces of the native-kernel tests (tests/test_native*.py)."""

from __future__ import annotations

import jax

from jsparse.core import product
from jsparse.formats.bcsr.cpu import CPU_KERNELS


def corrupted_bcsr_product(field: str):
    """A jitted native BCSR call ``f(a, x, bad)`` whose pattern field ``field`` is
    replaced by ``bad`` inside the trace, where construction-time validation cannot see
    it: ``A.T @ X`` for the CSC view (``col_ptr``, ``col_order``), the SDDMM for
    ``row_ids``, else ``A @ X``."""

    def run(a, x, bad):
        pat = a.pattern._replace(**{field: bad})
        cfg = a.kernel_config
        if field in ("col_ptr", "col_order"):
            return product.spmm(CPU_KERNELS, cfg, True, a.data, pat, x)
        if field == "row_ids":
            return product.sample(CPU_KERNELS, cfg, pat, x, x)
        return product.spmm(CPU_KERNELS, cfg, False, a.data, pat, x)

    return jax.jit(run)
