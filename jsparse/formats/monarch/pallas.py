"""Monarch's ``"pallas"`` implementation: the fused two-factor kernel behind the registry.

The forward and ``dX = M.T @ dY`` run the fused kernel (``pallas_kernels/monarch``);
the factor gradients are einsums over the middle activations. Registered per
platform: the Triton kernel on ``cuda``, the interpreter elsewhere (testable on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jsparse.core.registry import register_impl
from jsparse.formats.monarch.matrix import Monarch
from pallas_kernels.common import Unsupported
from pallas_kernels.monarch import monarch_matmul, plan_monarch

__all__: list[str] = []


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _monarch_mm(interpret: bool, left, right, x):
    return monarch_matmul(left, right, x, interpret=interpret)


def _monarch_mm_fwd(interpret, left, right, x):
    return _monarch_mm(interpret, left, right, x), (left, right, x)


def _monarch_mm_bwd(interpret, res, dy):
    left, right, x = res
    nb, s, q = left.shape
    p, g, n = right.shape[2], q // nb, x.shape[1]
    # dx = M.T @ dy, and M.T is the Monarch (right^T blocks, left^T blocks): the kernel.
    dx = monarch_matmul(
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


def _oriented(a: Monarch, x: jax.Array, transpose: bool):
    dtype = jnp.result_type(a.dtype, x.dtype)
    left, right = a.left.astype(dtype), a.right.astype(dtype)
    if transpose:  # M.T is the Monarch (right^T blocks, left^T blocks)
        left, right = jnp.swapaxes(right, 1, 2), jnp.swapaxes(left, 1, 2)
    return left, right, dtype


def _register(platform: str | None, backend: str, interpret: bool) -> None:
    def matmul(a: Monarch, x: jax.Array, *, transpose: bool) -> jax.Array:
        left, right, dtype = _oriented(a, x, transpose)
        return _monarch_mm(interpret, left, right, x.astype(dtype)).astype(x.dtype)

    def supports(a: Monarch, x: jax.Array, *, transpose: bool) -> str | None:
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
# No TPU kernel yet: the TPU planner says so, so impl="pallas" has no TPU branch.
_register("tpu", "tpu", interpret=False)
