"""N:M's ``"pallas"`` implementation: the Pallas kernels behind the registry.

Adapts ``pallas_kernels/nm`` to :class:`~jsparse.core.ProductKernels` (forward,
``dX`` and ``dA`` all run Pallas kernels) and registers them per platform: the
Triton kernels on ``cuda``, the interpreter elsewhere (so ``impl="pallas"`` is
testable on CPU). There is no TPU kernel yet: the TPU planner says so, so the TPU
version never supports a configuration and ``impl="pallas"`` has no TPU branch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jsparse.core import product as core_product
from jsparse.core.product import ProductKernels
from jsparse.core.registry import register_impl
from jsparse.formats.nm.matrix import NM
from jsparse.formats.nm.packing import unpack_positions
from jsparse.formats.nm.xla import values_length
from pallas_kernels.common import Unsupported
from pallas_kernels.nm import nm_sampled, nm_spmm, nm_spmm_t, plan_nm

__all__ = ["kernels"]


def _spmm(values, packed, x, *, config, transpose, interpret):
    n, m, axis = config
    positions = unpack_positions(packed, m=m, length=values.shape[1])
    if axis == 0:  # A grouped along rows is the transpose of one grouped along columns
        values, positions, transpose = values.T, positions.T, not transpose
    fn = nm_spmm_t if transpose else nm_spmm
    return fn(values, positions, x, n=n, m=m, interpret=interpret)


def _sample(u, v, packed, *, config, interpret):
    n, m, axis = config
    positions = unpack_positions(packed, m=m, length=values_length(v.shape[0], n, m, axis))
    if axis == 0:
        return nm_sampled(v, u, positions.T, n=n, m=m, interpret=interpret).T
    return nm_sampled(u, v, positions, n=n, m=m, interpret=interpret)


@functools.cache
def kernels(interpret: bool) -> ProductKernels:
    """The N:M kernel bundle (Triton kernels, or the interpreter)."""
    return ProductKernels(
        spmm=functools.partial(_spmm, interpret=interpret),
        sample=functools.partial(_sample, interpret=interpret),
    )


def _register(platform: str | None, backend: str, interpret: bool) -> None:
    bundle = kernels(interpret)

    def matmul(a: NM, x: jax.Array, *, transpose: bool) -> jax.Array:
        return core_product.spmm(bundle, a.kernel_config, transpose, a.values, a.positions, x)

    def supports(a: NM, x: jax.Array, *, transpose: bool) -> str | None:
        del transpose
        shape = a.shape if a.axis == 1 else a.shape[::-1]
        dtype = jnp.result_type(a.dtype, x.dtype)
        try:
            plan_nm(shape, a.n, a.m, x.shape[1], dtype, backend=backend)
        except Unsupported as e:
            return str(e)
        return None

    register_impl("matmul", NM, "pallas", matmul, supports=supports, platform=platform)


_register(None, "gpu", interpret=True)
_register("cuda", "gpu", interpret=False)
_register("tpu", "tpu", interpret=False)
