"""N:M's ``"pallas"`` implementation: the Pallas kernels behind the registry.

Adapts ``pallas_kernels/nm`` to :class:`~jsparse.core.ProductKernels` (forward,
``dX`` and ``dA`` all run Pallas kernels) and registers them per platform: the
Triton kernels on ``cuda``, the Mosaic kernels (one-hot tile expansion on the MXU)
on ``tpu``, the GPU-style kernels in the interpreter elsewhere (so ``impl="pallas"``
is testable on CPU; ``kernels(True, backend="tpu")`` runs the TPU kernels there).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jsparse.core import product as core_product
from jsparse.core.checks import symbolic_width_reason
from jsparse.core.nonfinite import stored_only
from jsparse.core.product import ProductKernels
from jsparse.core.registry import on_platform, register_impl
from jsparse.formats.nm.matrix import NM
from jsparse.formats.nm.packing import decompress, unpack_positions
from jsparse.formats.nm.xla import XLA_KERNELS, values_length
from pallas_kernels.common import Unsupported
from pallas_kernels.nm import nm_sampled, nm_spmm, nm_spmm_t, plan_nm

__all__ = ["kernels"]


def _spmm(values, packed, x, *, config, transpose, backend, interpret):
    n, m, axis = config
    positions = unpack_positions(packed, m=m, length=values.shape[1])
    if axis == 0:  # A grouped along rows is the transpose of one grouped along columns
        values, positions, transpose = values.T, positions.T, not transpose
    fn = nm_spmm_t if transpose else nm_spmm

    def dense():  # the kernels decompress tiles (unstored zeros meet NaN): correct them
        w = decompress(values, positions, n=n, m=m, axis=1)
        mask = decompress(jnp.ones(values.shape, jnp.bool_), positions, n=n, m=m, axis=1)
        return (w.T, mask.T) if transpose else (w, mask)

    def product(x):
        return fn(values, positions, x, n=n, m=m, backend=backend, interpret=interpret)

    return stored_only(product, dense, x)


def _sample(u, v, packed, *, config, backend, interpret):
    n, m, axis = config
    positions = unpack_positions(packed, m=m, length=values_length(v.shape[0], n, m, axis))
    kw = dict(n=n, m=m, backend=backend, interpret=interpret)
    if axis == 0:
        return nm_sampled(v, u, positions.T, **kw).T
    return nm_sampled(u, v, positions, **kw)


@functools.cache
def kernels(interpret: bool, platform: str | None = None, backend: str = "gpu") -> ProductKernels:
    """The N:M kernel bundle of one Pallas ``backend`` (``"gpu"``: Triton, ``"tpu"``:
    Mosaic), compiled or in the interpreter; compiled kernels are marked as code for
    ``platform`` only, so a multi-platform export does not lower them for the others.

    Example:
      The TPU kernels in the interpreter, forward and gradient:

      >>> import jax, jax.numpy as jnp, jsparse
      >>> from jsparse.core.product import spmm
      >>> from jsparse.formats.nm.pallas import kernels
      >>> a = jsparse.NM.fromdense(jnp.eye(4), n=2, m=4)
      >>> bundle = kernels(True, backend="tpu")
      >>> y = spmm(bundle, a.kernel_config, False, a.values, a.positions, jnp.ones((4, 1)))
      >>> y[:, 0].tolist()
      [1.0, 1.0, 1.0, 1.0]
      >>> g = jax.grad(lambda x: spmm(bundle, a.kernel_config, True, a.values, a.positions,
      ...                             x).sum())(jnp.ones((4, 1)))
      >>> g[:, 0].tolist()
      [1.0, 1.0, 1.0, 1.0]
    """
    spmm = functools.partial(_spmm, backend=backend, interpret=interpret)
    sample = functools.partial(_sample, backend=backend, interpret=interpret)
    if platform is not None:
        # Triton kernels have no export compatibility guarantee (JAX refuses to
        # serialize them): an export for CUDA runs the XLA kernels instead (Mosaic
        # kernels export as they are).
        xla = XLA_KERNELS if platform == "cuda" else ProductKernels(None, None)
        spmm = on_platform(platform, spmm, export_fallback=xla.spmm, shapes_like=XLA_KERNELS.spmm)
        sample = on_platform(
            platform, sample, export_fallback=xla.sample, shapes_like=XLA_KERNELS.sample
        )
    return ProductKernels(spmm=spmm, sample=sample)


def _register(platform: str | None, backend: str, interpret: bool) -> None:
    bundle = kernels(interpret, None if interpret else platform, backend)

    def matmul(a: NM, x: jax.Array, *, transpose: bool) -> jax.Array:
        return core_product.spmm(bundle, a.kernel_config, transpose, a.values, a.positions, x)

    def supports(a: NM, x: jax.Array, *, transpose: bool) -> str | None:
        del transpose
        if symbolic_width_reason(x):
            return symbolic_width_reason(x)
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
