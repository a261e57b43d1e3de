"""Monarch's ``"pallas"`` implementation: the fused two-factor kernel behind the registry.

The forward and ``dX = M.T @ dY`` run the fused kernel (``pallas_kernels/monarch``);
the factor gradients are einsums over the middle activations. The product is a
primitive with JVP, transpose and batching rules, so forward mode works too.
Registered per platform: the Triton kernel on ``cuda``, the Mosaic kernel (batched
block matmuls on the MXU, the shuffle in its index maps) on ``tpu``, the GPU-style
kernel in the interpreter elsewhere (testable on CPU; :func:`product` runs either
backend's kernel in the interpreter).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import PartitionSpec as P

from jsparse.core import meshes
from jsparse.core.checks import symbolic_width_reason
from jsparse.core.registry import on_platform, register_impl
from jsparse.formats.monarch import xla
from jsparse.formats.monarch.matrix import Monarch
from pallas_kernels.common import Unsupported
from pallas_kernels.monarch import monarch_matmul, plan_monarch

__all__ = ["product"]


@functools.cache
def _kernel(mode):
    """The kernel: ``mode`` is ``("interpret", backend)`` (that backend's kernel in the
    interpreter) or the platform the compiled kernel is for (marked ``on_platform``,
    so a multi-platform export does not lower it for the others)."""
    if isinstance(mode, tuple):
        return functools.partial(monarch_matmul, backend=mode[1], interpret=True)
    backend = "tpu" if mode == "tpu" else "gpu"
    # Triton kernels have no export compatibility guarantee (JAX refuses to serialize
    # them): an export for CUDA runs the XLA product instead (Mosaic kernels export).
    fallback = xla.matmul if mode == "cuda" else None
    return on_platform(
        mode,
        functools.partial(monarch_matmul, backend=backend, interpret=False),
        export_fallback=fallback,
        shapes_like=xla.matmul,
    )


# ``M @ x`` through the kernel is a primitive, trilinear in (left, right, x), with the
# rules of core/product.py's sparse products (see that module's docstring for why a
# primitive rather than a custom_vjp): a JVP of three kernel products, transposes
# (dx: the kernel on M.T; dleft, dright: einsums over the middle activations), a
# batching rule (x alone: folded into columns; otherwise lax.map) and the kernel as
# the lowering. ``mode`` (``("interpret", backend)`` or a platform) is a static parameter.
_monarch_p = Primitive("jsparse_monarch_matmul")


def _monarch_mm(mode, left, right, x):
    # Sharded operands: see jsparse.core.meshes (the result keeps x's column sharding).
    args = meshes.vary_alike((left, right, x))
    out_spec = P(None, meshes.spec_of(x)[1])
    return meshes.on_auto_axes(lambda *a: _monarch_p.bind(*a, mode=mode), args, out_spec)


def product(left, right, x, *, backend: str = "gpu", interpret: bool = True) -> jax.Array:
    """``M @ x`` for the factors ``left (nb, s, q)``, ``right (nb, q, p)`` through the
    Pallas kernel primitive (differentiable in all three, ``vmap``-able): the
    ``backend``'s kernel (``"gpu"`` or ``"tpu"``) in the interpreter, or compiled for
    the platform of that backend with ``interpret=False``.

    Example:
      The TPU kernel in the interpreter, and its gradient:

      >>> import jax, jax.numpy as jnp, jsparse
      >>> from jsparse.formats.monarch.pallas import product
      >>> a = jsparse.Monarch.init(jax.random.key(0), (8, 8), nblocks=2)
      >>> x = jnp.ones((8, 3))
      >>> y = product(a.left, a.right, x, backend="tpu")
      >>> bool(jnp.allclose(y, a.todense() @ x, atol=1e-5))
      True
      >>> gx = jax.grad(lambda x: product(a.left, a.right, x, backend="tpu").sum())(x)
      >>> bool(jnp.allclose(gx, a.todense().T @ jnp.ones((8, 3)), atol=1e-5))
      True
    """
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"backend must be 'gpu' or 'tpu', got {backend!r}")
    mode = ("interpret", backend) if interpret else ("cuda" if backend == "gpu" else "tpu")
    return _monarch_mm(mode, left, right, x)


def _mm_impl(left, right, x, *, mode):
    return _kernel(mode)(left, right, x)


def _mm_abstract(left, right, x, *, mode):
    del mode
    shape = (left.shape[0] * left.shape[1], x.shape[1])
    return meshes.varying_result(shape, x.dtype, (left, right, x))


def _mm_jvp(primals, tangents, *, mode):
    y = _monarch_p.bind(*primals, mode=mode)
    terms = []
    for i, t in enumerate(tangents):
        if type(t) is not ad.Zero:
            args = list(primals)
            args[i] = t
            terms.append(_monarch_p.bind(*args, mode=mode))
    if not terms:
        return y, ad.Zero(jax.core.get_aval(y).to_tangent_aval())
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return y, total.astype(y.dtype)


def _dleft(right, x, dy, s):
    nb, q, p = right.shape
    g, n = q // nb, x.shape[1]
    acc = jnp.float32
    z = jnp.einsum("kat,ktn->kan", right, x.reshape(nb, p, n), preferred_element_type=acc)
    z = z.reshape(nb, nb, g, n).transpose(1, 0, 2, 3).reshape(nb, q, n)
    return jnp.einsum("lun,lcn->luc", dy.reshape(nb, s, n).astype(acc), z)


def _dright(left, x, dy):
    nb, s, q = left.shape
    p, g, n = x.shape[0] // nb, q // nb, x.shape[1]
    acc = jnp.float32
    h = jnp.einsum("luc,lun->lcn", left, dy.reshape(nb, s, n), preferred_element_type=acc)
    h = h.reshape(nb, nb, g, n).transpose(1, 0, 2, 3).reshape(nb, q, n)
    return jnp.einsum("kan,ktn->kat", h, x.reshape(nb, p, n).astype(acc))


def _mm_transpose(dy, left, right, x, *, mode):
    undefined = [ad.is_undefined_primal(v) for v in (left, right, x)]
    if sum(undefined) != 1:
        raise ValueError("the Monarch product is transposable in one operand at a time")
    if type(dy) is ad.Zero:
        return [None, None, None]
    if undefined[2]:  # dx = M.T @ dy, and M.T is the Monarch (right^T, left^T): the kernel
        dx = _monarch_p.bind(jnp.swapaxes(right, 1, 2), jnp.swapaxes(left, 1, 2), dy, mode=mode)
        return [None, None, dx.astype(x.aval.dtype)]
    if undefined[0]:
        s = left.aval.shape[1]
        return [_dleft(right, x, dy, s).astype(left.aval.dtype), None, None]
    return [None, _dright(left, x, dy).astype(right.aval.dtype), None]


def _mm_batch(args, dims, *, mode):
    if dims[0] is None and dims[1] is None:  # only x: fold the batch into the columns
        x = jnp.moveaxis(args[2], dims[2], 1)
        k, b, n = x.shape
        y = _monarch_p.bind(args[0], args[1], x.reshape(k, b * n), mode=mode)
        return y.reshape(y.shape[0], b, n), 1
    mapped = [i for i, d in enumerate(dims) if d is not None]

    def one(sliced):
        full = list(args)
        for i, v in zip(mapped, sliced, strict=True):
            full[i] = v
        return _monarch_p.bind(*full, mode=mode)

    return lax.map(one, [jnp.moveaxis(args[i], dims[i], 0) for i in mapped]), 0


_monarch_p.def_impl(_mm_impl)
_monarch_p.def_abstract_eval(_mm_abstract)
mlir.register_lowering(_monarch_p, meshes.invariant_lowering(_mm_impl))
ad.primitive_jvps[_monarch_p] = _mm_jvp
ad.primitive_transposes[_monarch_p] = _mm_transpose
batching.primitive_batchers[_monarch_p] = _mm_batch


def _oriented(a: Monarch, x: jax.Array, transpose: bool):
    dtype = jnp.result_type(a.dtype, x.dtype)
    left, right = a.left.astype(dtype), a.right.astype(dtype)
    if transpose:  # M.T is the Monarch (right^T blocks, left^T blocks)
        left, right = jnp.swapaxes(right, 1, 2), jnp.swapaxes(left, 1, 2)
    return left, right, dtype


def _register(platform: str | None, backend: str, interpret: bool) -> None:
    def matmul(a: Monarch, x: jax.Array, *, transpose: bool) -> jax.Array:
        left, right, dtype = _oriented(a, x, transpose)
        mode = ("interpret", backend) if interpret else platform
        return _monarch_mm(mode, left, right, x.astype(dtype)).astype(x.dtype)

    def supports(a: Monarch, x: jax.Array, *, transpose: bool) -> str | None:
        if symbolic_width_reason(x):
            return symbolic_width_reason(x)
        nb, s, q = a.left.shape
        p = a.right.shape[2]
        if transpose:
            s, p = p, s
        dtype = jnp.result_type(a.dtype, x.dtype)
        try:
            plan_monarch((nb, s, q), (nb, q, p), x.shape[1], dtype, backend=backend)
            # the backward runs the transposed product, whose blocks are p rows tall
            plan_monarch((nb, p, q), (nb, q, s), x.shape[1], dtype, backend=backend)
        except Unsupported as e:
            return str(e)
        return None

    register_impl("matmul", Monarch, "pallas", matmul, supports=supports, platform=platform)


_register(None, "gpu", interpret=True)
_register("cuda", "gpu", interpret=False)
_register("tpu", "tpu", interpret=False)
