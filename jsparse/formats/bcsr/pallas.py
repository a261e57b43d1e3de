"""BCSR's ``"pallas"`` implementation: the Pallas kernels behind the registry.

The kernels (``pallas_kernels/bcsr``) know nothing of formats or autodiff; this
module adapts them to :class:`~jsparse.core.ProductKernels`, so the shared sparse
derivatives run Pallas kernels forward *and* backward (``A @ X``, ``dX = A.T @ dY``
through the pattern's CSC view, ``dA = sddmm(dY, X)``), and registers them per
platform:

* ``cuda``: the Triton kernels; ``tpu``: the Mosaic kernels with scalar prefetch;
* every other platform: the GPU-style kernels in the Pallas interpreter, so that
  ``impl="pallas"`` is testable on CPU (``impl="auto"`` never picks it there).

The ``supports`` check asks the kernels' planners whether every kernel the op and
its backward need handles the configuration; the planners' reason
(``pallas_kernels.common.Unsupported``) becomes the registry's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jsparse.core import product
from jsparse.core.checks import symbolic_width_reason
from jsparse.core.product import ProductKernels
from jsparse.core.registry import on_platform, register_impl
from jsparse.formats.bcsr.matrix import BCSR
from jsparse.formats.bcsr.pattern import BlockPattern
from jsparse.formats.bcsr.xla import XLA_KERNELS
from pallas_kernels.bcsr import bcsr_sddmm, bcsr_spmm, plan_sddmm, plan_spmm
from pallas_kernels.common import Unsupported

__all__ = ["kernels", "unsupported_reason"]


def _spmm(data, pattern: BlockPattern, x, *, config, transpose, backend, interpret):
    shape, _ = config
    if transpose:  # walk the CSC view: block-columns become the output rows
        ptr, perm, src = pattern.col_ptr, pattern.col_order, pattern.row_ids[pattern.col_order]
    else:
        ptr, perm, src = pattern.indptr, None, pattern.indices
    return bcsr_spmm(
        data, ptr, src, x, perm=perm, shape=shape, transpose=transpose,
        backend=backend, interpret=interpret,
    )  # fmt: skip


def _sample(u, v, pattern: BlockPattern, *, config, backend, interpret):
    _, block_shape = config
    return bcsr_sddmm(
        u, v, pattern.row_ids, pattern.indices,
        block_shape=block_shape, backend=backend, interpret=interpret,
    )  # fmt: skip


@functools.cache
def kernels(backend: str, interpret: bool) -> ProductKernels:
    """The BCSR kernel bundle of one Pallas backend (``"gpu"`` or ``"tpu"``); compiled
    kernels are marked as code for their platform only (``on_platform``), so a
    multi-platform export does not lower them for the others."""
    spmm = functools.partial(_spmm, backend=backend, interpret=interpret)
    sample = functools.partial(_sample, backend=backend, interpret=interpret)
    if not interpret:
        platform = "cuda" if backend == "gpu" else "tpu"
        # Triton kernels have no export compatibility guarantee (JAX refuses to
        # serialize them): an export for CUDA runs the XLA kernels instead.
        xla = XLA_KERNELS if platform == "cuda" else ProductKernels(None, None)
        spmm = on_platform(platform, spmm, export_fallback=xla.spmm, shapes_like=XLA_KERNELS.spmm)
        sample = on_platform(
            platform, sample, export_fallback=xla.sample, shapes_like=XLA_KERNELS.sample
        )
    return ProductKernels(spmm=spmm, sample=sample)


def unsupported_reason(block_shape, n: int, dtype, backend: str) -> str | None:
    """``None`` if the SpMM (both orientations) and SDDMM kernels of ``backend`` handle
    these shapes (``n``: the dense operand's width), else the planner's reason."""
    dtype = jnp.dtype(dtype)
    try:
        plan_spmm(block_shape, n, dtype, backend=backend, transpose=False)
        plan_spmm(block_shape, n, dtype, backend=backend, transpose=True)
        plan_sddmm(block_shape, n, dtype, backend=backend)
    except Unsupported as e:
        return str(e)
    return None


def _register(platform: str | None, backend: str, interpret: bool) -> None:
    bundle = kernels(backend, interpret)

    def matmul(a: BCSR, x: jax.Array, *, transpose: bool) -> jax.Array:
        return product.spmm(bundle, a.kernel_config, transpose, a.data, a.pattern, x)

    def matmul_supports(a: BCSR, x: jax.Array, *, transpose: bool) -> str | None:
        del transpose
        return symbolic_width_reason(x) or unsupported_reason(
            a.block_shape, x.shape[1], jnp.result_type(a.dtype, x.dtype), backend
        )

    def sddmm(pattern: BCSR, x: jax.Array, y: jax.Array) -> BCSR:
        data = product.sample(bundle, pattern.kernel_config, pattern.pattern, x, y.T)
        return pattern._replace(data=data)

    def sddmm_supports(pattern: BCSR, x: jax.Array, y: jax.Array) -> str | None:
        return symbolic_width_reason(x) or unsupported_reason(
            pattern.block_shape, x.shape[1], jnp.result_type(x, y), backend
        )

    register_impl("matmul", BCSR, "pallas", matmul, supports=matmul_supports, platform=platform)
    register_impl("sddmm", BCSR, "pallas", sddmm, supports=sddmm_supports, platform=platform)


_register(None, "gpu", interpret=True)
_register("cuda", "gpu", interpret=False)
_register("tpu", "tpu", interpret=False)
