"""BCSR's ``"cpu"`` implementation: native C++ kernels behind XLA's FFI.

The kernels (``jsparse_native``, built by ``pip install``) compute ``A @ X``,
``A.T @ X`` (walking the pattern's CSC view) and the SDDMM of the gradient in
register-blocked micro-kernels for AVX-512, AVX2 + FMA or a portable baseline (chosen
at run time), on XLA's intra-op threads, in float32 or bfloat16 with float32
accumulation. This module adapts them to :class:`~jsparse.core.ProductKernels`, so
``jit``, ``vmap``, ``grad`` and ``jvp`` hold as for ``"xla"``, and a new pattern with
the same number of blocks does not recompile (the index arrays are operands).

* **Bounds**: the kernels check every index they read (the CSR pointer, the block
  columns, the CSC view and its agreement with the columns); a corrupted pattern that
  reaches them under ``jit`` raises an error from the call, it is never read out of
  bounds.
* **Dtypes**: float32 and bfloat16 (both operands cast to their common type); other
  dtypes run the ``"xla"`` kernels (``supports`` declines them, so ``auto`` picks
  ``"xla"``).
* **Platforms**: the kernels are code for CPU only (``on_platform``); an export runs
  the ``"xla"`` kernels (custom calls have no export compatibility guarantee).
* **No extension** (a platform without a compiler): the ``"xla"`` kernels run instead,
  after one warning.

Example:
  >>> import jax, jax.numpy as jnp, jsparse
  >>> a = jsparse.BCSR.random(jax.random.key(0), (64, 64), density=0.25, block_shape=(16, 16))
  >>> x = jnp.ones((64, 8))
  >>> bool(jnp.allclose(jsparse.matmul(a, x, impl="cpu"), a.todense() @ x, atol=1e-4))
  True
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

import jsparse_native
from jsparse.core import product
from jsparse.core.checks import symbolic_width_reason
from jsparse.core.product import ProductKernels
from jsparse.core.registry import on_platform, register_impl
from jsparse.formats.bcsr.matrix import BCSR
from jsparse.formats.bcsr.pattern import BlockPattern
from jsparse.formats.bcsr.xla import XLA_KERNELS

__all__ = ["CPU_KERNELS", "native_dtype", "native_ready", "unsupported_reason"]

_NATIVE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def native_dtype(*dtypes) -> jnp.dtype | None:
    """The dtype the native kernels compute operands of ``dtypes`` in, or ``None``
    when they do not handle it (only float32 and bfloat16 are native).

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.formats.bcsr.cpu import native_dtype
      >>> native_dtype(jnp.bfloat16, jnp.bfloat16), native_dtype(jnp.float16)
      (dtype(bfloat16), None)
    """
    dtype = jnp.dtype(functools.reduce(jnp.promote_types, dtypes))
    return dtype if dtype in _NATIVE_DTYPES else None


_WARNED = False  # the fallback warning is given once per process


def native_ready() -> bool:
    """Whether the native library is loaded; the first time it is not, one warning
    (the callers then run the ``"xla"`` kernels).

    Example:
      >>> from jsparse.formats.bcsr.cpu import native_ready
      >>> isinstance(native_ready(), bool)
      True
    """
    global _WARNED
    if jsparse_native.available():
        return True
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            f"jsparse's native CPU kernels are unavailable ({jsparse_native.load_error()}); "
            'impl="cpu" runs the "xla" kernels instead',
            RuntimeWarning,
            stacklevel=2,
        )
    return False


def _index(a: jax.Array) -> jax.Array:
    return a.astype(jnp.int32)


_NO_INDEX = jnp.zeros((0,), jnp.int32)


def _spmm(data, pattern: BlockPattern, x, *, config, transpose):
    dtype = native_dtype(data.dtype, x.dtype)
    if dtype is None or not native_ready():
        return XLA_KERNELS.spmm(data, pattern, x, config=config, transpose=transpose)
    shape, _ = config
    rows = shape[1] if transpose else shape[0]
    if transpose:  # output block-columns: the CSC view, checked against the columns
        index = (pattern.col_ptr, pattern.col_order, pattern.row_ids, pattern.indices)
    else:
        index = (pattern.indptr, _NO_INDEX, pattern.indices, _NO_INDEX)
    call = jax.ffi.ffi_call("jsparse_bcsr_spmm", jax.ShapeDtypeStruct((rows, x.shape[1]), dtype))
    y = call(data.astype(dtype), *map(_index, index), x.astype(dtype), transpose=transpose)
    return y.astype(x.dtype)


def _sample(u, v, pattern: BlockPattern, *, config):
    dtype = native_dtype(u.dtype, v.dtype)
    if dtype is None or not native_ready():
        return XLA_KERNELS.sample(u, v, pattern, config=config)
    _, (bm, bn) = config
    nse = pattern.indices.shape[0]
    call = jax.ffi.ffi_call("jsparse_bcsr_sddmm", jax.ShapeDtypeStruct((nse, bm, bn), dtype))
    out = call(u.astype(dtype), v.astype(dtype), _index(pattern.row_ids), _index(pattern.indices))
    return out.astype(u.dtype)


# Code for CPU only; an export (no compatibility guarantee for custom calls) and the
# other platforms of a multi-platform lowering get the XLA kernels / a placeholder.
CPU_KERNELS = ProductKernels(
    spmm=on_platform("cpu", _spmm, export_fallback=XLA_KERNELS.spmm),
    sample=on_platform("cpu", _sample, export_fallback=XLA_KERNELS.sample),
)


def unsupported_reason(dtype) -> str | None:
    """``None`` if the native kernels handle operands of ``dtype``, else why not.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.formats.bcsr.cpu import unsupported_reason
      >>> unsupported_reason(jnp.float32) is None, unsupported_reason(jnp.float16)
      (True, 'the native CPU kernels take float32 or bfloat16, got float16')
    """
    if native_dtype(dtype) is None:
        return f"the native CPU kernels take float32 or bfloat16, got {jnp.dtype(dtype).name}"
    return None


def _matmul_supports(a: BCSR, x: jax.Array, *, transpose: bool) -> str | None:
    del transpose
    return symbolic_width_reason(x) or unsupported_reason(jnp.result_type(a.dtype, x.dtype))


def _sddmm_supports(pattern: BCSR, x: jax.Array, y: jax.Array) -> str | None:
    return symbolic_width_reason(x) or unsupported_reason(jnp.result_type(x, y))


@register_impl("matmul", BCSR, "cpu", supports=_matmul_supports)
def _matmul(a: BCSR, x: jax.Array, *, transpose: bool) -> jax.Array:
    return product.spmm(CPU_KERNELS, a.kernel_config, transpose, a.data, a.pattern, x)


@register_impl("sddmm", BCSR, "cpu", supports=_sddmm_supports)
def _sddmm(pattern: BCSR, x: jax.Array, y: jax.Array) -> BCSR:
    data = product.sample(CPU_KERNELS, pattern.kernel_config, pattern.pattern, x, y.T)
    return pattern._replace(data=data)
