"""N:M's ``"cpu"`` implementation: native C++ products behind XLA's FFI.

The kernel (``jsparse_native``) reads the stored values and the *packed* positions
directly ("load as sparse, compute as dense"): it expands a small tile of ``W`` into
a dense float32 tile in L1 (on AVX-512 one masked ``vexpandps`` per 16 lanes, the mask
looked up from the packed byte, for 1:2, 2:4, 1:4, 1:8, 2:8; a vector compare per
position for ``axis=0``; scalar stores otherwise) and multiplies it with a dense
register micro-kernel. One column (a matrix-vector product) streams the expanded
vectors straight into a dot or an axpy. A narrow ``X`` (2 to 64 columns) runs kernels
chosen by its width inside the call: for a contraction along the groups, only the
stored entries' FMAs (each entry's value and row of ``X`` decoded into L1, a vector of
positions at a time), or for 2 to 8 columns each expanded row vector meeting every
column of ``X`` (for ``W.T @ X``: added into each column's accumulators); across the
groups, 2 to 8 columns expand each group's rows once for all columns
(docs/native.md). ``W @ X`` and ``W.T @ X``, either grouped
axis, any ``n < m``; float32 and bfloat16 (float32 accumulation); AVX-512 / AVX2 /
portable paths chosen at run time; XLA's threads. When ``X`` holds a NaN or an
infinity, only stored entries are multiplied (an unstored zero never meets it), as in
the other implementations.

The gradient's ``dW`` (an SDDMM, ``(dY @ X.T)`` at the stored positions, also
``jsparse.sddmm(pattern, x, y, impl="cpu")``) is native too: one dot over the
contraction per *stored* entry (``n / m`` of the dense product's FMAs), with the
contraction chunked so that the selected rows stay in cache; one column is an outer
product at the stored positions. ``dX`` is the native product of the other
orientation. A corrupted position (``>= m``, or not strictly increasing within its
group) that reaches a kernel under ``jit`` raises an error from the call.

Example:
  >>> import jax, jax.numpy as jnp, jsparse
  >>> a = jsparse.NM.random(jax.random.key(0), (8, 16), n=2, m=4)
  >>> x = jnp.ones((16, 3))
  >>> bool(jnp.allclose(jsparse.matmul(a, x, impl="cpu"), a.todense() @ x, atol=1e-5))
  True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jsparse.core import product
from jsparse.core.checks import symbolic_width_reason
from jsparse.core.product import ProductKernels
from jsparse.core.registry import on_platform, register_impl
from jsparse.formats.bcsr.cpu import native_dtype, native_ready, unsupported_reason
from jsparse.formats.nm import xla
from jsparse.formats.nm.matrix import NM
from jsparse.formats.nm.packing import packed_length
from jsparse.formats.nm.xla import XLA_KERNELS, values_length

__all__ = ["CPU_KERNELS", "MAX_PRUNE_M"]

# The native pruning ranks a group's entries pairwise, in registers: m up to 16 (the
# 4-bit positions); larger groups take the XLA path (lax.top_k).
MAX_PRUNE_M = 16


def _spmm(values, packed, x, *, config, transpose):
    dtype = native_dtype(values.dtype, x.dtype)
    if dtype is None or not native_ready():
        return XLA_KERNELS.spmm(values, packed, x, config=config, transpose=transpose)
    n, m, axis = config
    vr, vc = values.shape
    rows, cols = (vr, vc // n * m) if axis == 1 else (vr // n * m, vc)
    out = jax.ShapeDtypeStruct((cols if transpose else rows, x.shape[1]), dtype)
    y = jax.ffi.ffi_call("jsparse_nm_spmm", out)(
        values.astype(dtype), packed.astype(jnp.uint8), x.astype(dtype),
        n=n, m=m, axis=axis, transpose=transpose,
    )  # fmt: skip
    return y.astype(x.dtype)


def _sample(u, v, packed, *, config):
    dtype = native_dtype(u.dtype, v.dtype)
    if dtype is None or not native_ready():
        return XLA_KERNELS.sample(u, v, packed, config=config)
    n, m, axis = config
    rows, cols = u.shape[0], v.shape[0]
    shape = (rows, values_length(cols, n, m, axis)) if axis == 1 else (rows // m * n, cols)
    out = jax.ffi.ffi_call("jsparse_nm_sddmm", jax.ShapeDtypeStruct(shape, dtype))(
        u.astype(dtype), v.astype(dtype), packed.astype(jnp.uint8), n=n, m=m, axis=axis
    )
    return out.astype(u.dtype)


def _prune(x, *, n, m, axis, with_mask):
    if native_dtype(x.dtype) is None or not native_ready():
        return xla.prune(x, n=n, m=m, axis=axis, with_mask=with_mask)
    rows, cols = x.shape
    shape = (rows // m * n, cols) if axis == 0 else (rows, cols // m * n)
    outs = (
        jax.ShapeDtypeStruct(shape, x.dtype),
        jax.ShapeDtypeStruct((shape[0], packed_length(shape[1], m)), jnp.uint8),
        jax.ShapeDtypeStruct((rows, cols) if with_mask else (0, 0), jnp.bool_),
    )
    call = jax.ffi.ffi_call("jsparse_nm_prune", outs, vmap_method="sequential")
    values, packed, mask = call(x, n=n, m=m, axis=axis)
    return values, packed, mask if with_mask else None


# Code for CPU only (an export runs the XLA kernels).
CPU_KERNELS = ProductKernels(
    spmm=on_platform("cpu", _spmm, export_fallback=XLA_KERNELS.spmm),
    sample=on_platform("cpu", _sample, export_fallback=XLA_KERNELS.sample),
)


_PRUNE = on_platform("cpu", _prune, export_fallback=xla.prune)


def _fromdense_supports(x: jax.Array, *, n: int, m: int, axis: int, with_mask: bool):
    del n, axis, with_mask
    if m > MAX_PRUNE_M:
        return f"the native pruning takes groups of m <= {MAX_PRUNE_M}, got m={m}"
    return unsupported_reason(x.dtype)


@register_impl("fromdense", NM, "cpu", supports=_fromdense_supports)
def _fromdense(x: jax.Array, *, n: int, m: int, axis: int, with_mask: bool):
    return _PRUNE(x, n=n, m=m, axis=axis, with_mask=with_mask)


def _matmul_supports(a: NM, x: jax.Array, *, transpose: bool) -> str | None:
    del transpose
    return symbolic_width_reason(x) or unsupported_reason(jnp.result_type(a.dtype, x.dtype))


@register_impl("matmul", NM, "cpu", supports=_matmul_supports)
def _matmul(a: NM, x: jax.Array, *, transpose: bool) -> jax.Array:
    return product.spmm(CPU_KERNELS, a.kernel_config, transpose, a.values, a.positions, x)


def _sddmm_supports(pattern: NM, x: jax.Array, y: jax.Array) -> str | None:
    return symbolic_width_reason(x) or unsupported_reason(jnp.result_type(x, y))


@register_impl("sddmm", NM, "cpu", supports=_sddmm_supports)
def _sddmm(pattern: NM, x: jax.Array, y: jax.Array) -> NM:
    values = product.sample(CPU_KERNELS, pattern.kernel_config, pattern.positions, x, y.T)
    return pattern._replace(values=values)
