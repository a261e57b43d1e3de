"""The ``"pallas"`` implementations: Pallas kernels behind the registry.

The kernels (``pallas_kernels/``) know nothing of autodiff or formats; this module
adapts them to each format's kernel interface so that the sparse custom VJPs run
Pallas kernels forward *and* backward:

* BCSR (:class:`jsparse.bcsr.Kernels`): ``A @ X``, ``dX = A.T @ dY`` through the
  CSC view, ``dA = sddmm(dY, X)``; also the ``sddmm`` op.
* N:M (:class:`jsparse.nm.Kernels`): the three N:M kernels.
* Monarch: a custom VJP here; forward and ``dX`` in the fused kernel.

Kernel sets are registered per platform (see :mod:`jsparse._dispatch`):

* ``cuda``: the Triton kernels (``backend="gpu"``),
* ``tpu``: the Mosaic kernels with scalar prefetch (BCSR only; N:M and Monarch
  register a TPU version whose planner raises, so they get no TPU branch),
* every other platform (CPU): the GPU-style kernels in the Pallas interpreter, so
  ``impl="pallas"`` is testable without an accelerator. ``impl="auto"`` never
  picks the interpreter.

Before anything is traced, the planners (:func:`check_supported` for BCSR) say
whether every kernel the op and its backward need handles the configuration; if
not they raise :class:`NotImplementedError` and the registry drops the platform's
Pallas branch (``auto``: the next candidate runs there). See docs/pallas.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jsparse import bcsr, monarch, nm
from jsparse._dispatch import register_impl
from jsparse.bcsr import BCSR, Kernels, spmm_with
from pallas_kernels import monarch as monarch_kernels
from pallas_kernels import nm_spmm as nm_kernels
from pallas_kernels.bcsr_sddmm import bcsr_sddmm, plan_sddmm
from pallas_kernels.bcsr_spmm import bcsr_spmm, plan_spmm, row_pointer

__all__ = [
    "GPU_KERNELS",
    "INTERPRET_KERNELS",
    "NM_GPU_KERNELS",
    "NM_INTERPRET_KERNELS",
    "TPU_KERNELS",
    "check_supported",
]


def _spmm(data, row_ids, col_ids, x, *, shape, transpose, backend, interpret):
    indptr = row_pointer(row_ids, shape[0] // data.shape[1])
    return bcsr_spmm(
        data, indptr, col_ids, x,
        shape=shape, transpose=transpose, backend=backend, interpret=interpret,
    )  # fmt: skip


def _sddmm(u, v, row_ids, col_ids, *, block_shape, backend, interpret):
    return bcsr_sddmm(
        u, v, row_ids, col_ids, block_shape=block_shape, backend=backend, interpret=interpret
    )


def _kernels(backend: str, interpret: bool) -> Kernels:
    return Kernels(
        spmm=functools.partial(_spmm, backend=backend, interpret=interpret),
        sddmm=functools.partial(_sddmm, backend=backend, interpret=interpret),
    )


GPU_KERNELS = _kernels("gpu", interpret=False)
TPU_KERNELS = _kernels("tpu", interpret=False)
# GPU-style kernels run by the Pallas interpreter (any platform; CPU tests).
INTERPRET_KERNELS = _kernels("gpu", interpret=True)


def check_supported(block_shape, n: int, dtype, backend: str) -> None:
    """NotImplementedError unless the forward and backward kernels of an SpMM or
    SDDMM with these shapes are supported by ``backend`` (``n``: the dense width)."""
    dtype = jnp.dtype(dtype)
    plan_spmm(block_shape, n, dtype, backend=backend, transpose=False)
    plan_spmm(block_shape, n, dtype, backend=backend, transpose=True)
    plan_sddmm(block_shape, n, dtype, backend=backend)


def _matmul(kernels: Kernels, backend: str, a: BCSR, x: jax.Array, *, transpose: bool):
    check_supported(a.block_shape, x.shape[1], jnp.result_type(a.dtype, x.dtype), backend)
    return spmm_with(kernels, a, x, transpose=transpose)


def _sddmm_op(kernels: Kernels, backend: str, pattern: BCSR, x: jax.Array, y: jax.Array):
    check_supported(pattern.block_shape, x.shape[1], jnp.result_type(x.dtype, y.dtype), backend)
    data = bcsr._sddmm(kernels, pattern.block_shape, pattern.row_ids, pattern.indices, x, y.T)
    return pattern._replace(data=data)


for _op, _fn in (("matmul", _matmul), ("sddmm", _sddmm_op)):
    register_impl(_op, BCSR, "pallas")(functools.partial(_fn, INTERPRET_KERNELS, "gpu"))
    register_impl(_op, BCSR, "pallas", platform="cuda")(functools.partial(_fn, GPU_KERNELS, "gpu"))
    register_impl(_op, BCSR, "pallas", platform="tpu")(functools.partial(_fn, TPU_KERNELS, "tpu"))


# ------------------------------------------------------------------ N:M
def _nm_spmm(values, positions, x, *, n, m, axis, transpose, interpret):
    if axis == 0:  # A grouped along rows is the transpose of one grouped along columns
        values, positions, transpose = values.T, positions.T, not transpose
    fn = nm_kernels.nm_spmm_t if transpose else nm_kernels.nm_spmm
    return fn(values, positions, x, n=n, m=m, interpret=interpret)


def _nm_sampled(u, v, positions, *, n, m, axis, interpret):
    if axis == 0:
        return nm_kernels.nm_sampled(v, u, positions.T, n=n, m=m, interpret=interpret).T
    return nm_kernels.nm_sampled(u, v, positions, n=n, m=m, interpret=interpret)


def _nm_kernel_set(interpret: bool) -> nm.Kernels:
    return nm.Kernels(
        spmm=functools.partial(_nm_spmm, interpret=interpret),
        sampled=functools.partial(_nm_sampled, interpret=interpret),
    )


NM_GPU_KERNELS = _nm_kernel_set(interpret=False)
NM_INTERPRET_KERNELS = _nm_kernel_set(interpret=True)


def _nm_matmul(kernels: nm.Kernels, backend: str, a: nm.NM, x: jax.Array, *, transpose: bool):
    shape = a.shape if a.axis == 1 else a.shape[::-1]
    dtype = jnp.result_type(a.dtype, x.dtype)
    nm_kernels.plan_nm(shape, a.n, a.m, x.shape[1], dtype, backend=backend)
    return nm.spmm_with(kernels, a, x, transpose=transpose)


register_impl("matmul", nm.NM, "pallas")(functools.partial(_nm_matmul, NM_INTERPRET_KERNELS, "gpu"))
register_impl("matmul", nm.NM, "pallas", platform="cuda")(
    functools.partial(_nm_matmul, NM_GPU_KERNELS, "gpu")
)
# No TPU kernel: the planner raises, so an explicit impl="pallas" has no TPU branch
# (rather than running the interpreter there).
register_impl("matmul", nm.NM, "pallas", platform="tpu")(
    functools.partial(_nm_matmul, NM_GPU_KERNELS, "tpu")
)


# ------------------------------------------------------------------ Monarch
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _monarch_mm(interpret: bool, left, right, x):
    return monarch_kernels.monarch_matmul(left, right, x, interpret=interpret)


def _monarch_mm_fwd(interpret, left, right, x):
    return _monarch_mm(interpret, left, right, x), (left, right, x)


def _monarch_mm_bwd(interpret, res, dy):
    left, right, x = res
    nb, s, q = left.shape
    p, g, n = right.shape[2], q // nb, x.shape[1]
    # dx = M.T @ dy, and M.T is the Monarch (right^T blocks, left^T blocks): the kernel.
    dx = monarch_kernels.monarch_matmul(
        jnp.swapaxes(right, 1, 2), jnp.swapaxes(left, 1, 2), dy, interpret=interpret
    )
    # dleft, dright: the middle activations, shuffled, against dy and x (XLA einsums).
    acc = jnp.float32
    xs, dys = x.reshape(nb, p, n), dy.reshape(nb, s, n)
    z = jnp.einsum("kat,ktn->kan", right, xs, preferred_element_type=acc)
    z = z.reshape(nb, nb, g, n).transpose(1, 0, 2, 3).reshape(nb, q, n)
    dleft = jnp.einsum("lun,lcn->luc", dys.astype(acc), z)
    h = jnp.einsum("luc,lun->lcn", left, dys, preferred_element_type=acc)
    h = h.reshape(nb, nb, g, n).transpose(1, 0, 2, 3).reshape(nb, q, n)
    dright = jnp.einsum("kan,ktn->kat", h, xs.astype(acc))
    return dleft.astype(left.dtype), dright.astype(right.dtype), dx.astype(x.dtype)


_monarch_mm.defvjp(_monarch_mm_fwd, _monarch_mm_bwd)


def _monarch_matmul(interpret: bool, backend: str, a: monarch.Monarch, x, *, transpose: bool):
    dtype = jnp.result_type(a.dtype, x.dtype)
    left, right = a.left.astype(dtype), a.right.astype(dtype)
    if transpose:  # M.T is the Monarch (right^T blocks, left^T blocks)
        left, right = jnp.swapaxes(right, 1, 2), jnp.swapaxes(left, 1, 2)
    nb, s, q = left.shape
    p = right.shape[2]
    width = x.shape[1]
    monarch_kernels.plan_monarch((nb, s, q), (nb, q, p), width, dtype, backend=backend)
    # the backward runs the transposed product, whose blocks are p rows tall
    monarch_kernels.plan_monarch((nb, p, q), (nb, q, s), width, dtype, backend=backend)
    return _monarch_mm(interpret, left, right, x.astype(dtype)).astype(x.dtype)


register_impl("matmul", monarch.Monarch, "pallas")(functools.partial(_monarch_matmul, True, "gpu"))
register_impl("matmul", monarch.Monarch, "pallas", platform="cuda")(
    functools.partial(_monarch_matmul, False, "gpu")
)
register_impl("matmul", monarch.Monarch, "pallas", platform="tpu")(
    functools.partial(_monarch_matmul, False, "tpu")
)
