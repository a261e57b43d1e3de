"""The sparse products of entrywise formats and their derivatives, defined once.

A format whose stored values are matrix entries (BCSR, N:M) describes one
implementation by a :class:`ProductKernels` bundle of two array-level kernels:

* ``spmm(values, pattern, x, *, config, transpose)``: ``op(A) @ x`` for a 2-D ``x``,
  ``op(A) = A.T`` when ``transpose``; accumulated in float32, in ``x``'s dtype;
* ``sample(u, v, pattern, *, config)``: ``u @ v.T`` at ``A``'s stored positions, in
  the shape of ``values`` (an SDDMM).

``pattern`` is the format's tuple (or NamedTuple) of index arrays, ``config`` its
hashable static description (shape, block shape, n:m ...). :func:`spmm` and
:func:`sample` add the derivatives, the same for every format and implementation.

**Why primitives.** Both products are *bilinear* (in ``values`` and ``x``; in ``u``
and ``v``), so they are JAX primitives (``spmm_p``, ``sample_p``) with the rules
JAX's own linear primitives (``dot_general``) have, rather than a ``custom_vjp``,
which supports reverse mode only:

* **JVP**: ``d(op(A) @ x) = op(dA) @ x + op(A) @ dx`` and ``d sample(u, v) =
  sample(du, v) + sample(u, dv)``, each term the same primitive;
* **transpose** (in one linear argument at a time): for ``Y = op(A) @ X``,
  ``dX = op(A).T @ dY`` (the same kernel, ``transpose`` flipped) and ``dA = dY @ X.T``
  sampled at A's pattern; for the sample, two products with the cotangent as values.
  Reverse mode is JVP + transpose, so the backward is the same sparse computation as
  the former custom VJP (and as fast), and ``jax.jvp``, ``jacfwd``, ``hessian``,
  forward-over-reverse, ``linearize`` and ``linear_transpose`` compose with it;
* **batching**: a batch of ``x`` alone is folded into its columns (one product);
  any other batched operand is a ``lax.map`` over the primitive (so the body stays
  differentiable);
* **abstract eval**: the kernel's own ``eval_shape`` (cached, traced outside any
  mesh); **lowering**: ``mlir.lower_fun`` of the kernel call;
* **meshes** (:mod:`jsparse.core.meshes`): inside ``jax.shard_map`` the operands vary
  alike and the kernel is lowered as code of one device; on explicit mesh axes that
  shard only the dense operand's batch, each device multiplies its own columns (the
  values' cotangent: one all-reduce the size of the stored values); other explicit
  shardings run with the axes made automatic (XLA partitions the kernel).

The transposes call the kernel bundle themselves: Pallas kernels have no autodiff
rules and JAX cannot transpose them. Kernels, config, ``transpose`` and the pattern's
tree structure are static, hashable parameters; the index arrays are operands that
get no (float0) cotangent.

This module is the one place where sparse products meet autodiff.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import PartitionSpec as P

from jsparse.core import meshes

# ``spmm_p`` and ``sample_p`` (the primitives) are importable for JAX-level work.
__all__ = ["ProductKernels", "sample", "spmm"]


@dataclasses.dataclass(frozen=True)
class ProductKernels:
    """The array-level kernels of one implementation of an entrywise format.

    Hashable and static (it is a parameter of the ``spmm_p`` / ``sample_p`` primitives).

    Attributes:
      spmm: ``spmm(values, pattern, x, *, config, transpose) -> op(A) @ x``.
      sample: ``sample(u, v, pattern, *, config) -> values``: ``u @ v.T`` at the
        stored positions.

    Example:
      A diagonal matrix (``values`` is its diagonal, no index arrays) as a bundle;
      :func:`spmm` then gives its product sparse derivatives:

      >>> import jax, jax.numpy as jnp
      >>> from jsparse.core.product import ProductKernels, spmm
      >>> diag = ProductKernels(
      ...     spmm=lambda d, pattern, x, *, config, transpose: d[:, None] * x,
      ...     sample=lambda u, v, pattern, *, config: jnp.sum(u * v, axis=1))
      >>> d, x = jnp.array([1.0, 2.0]), jnp.ones((2, 3))
      >>> spmm(diag, None, False, d, (), x)[:, 0].tolist()
      [1.0, 2.0]
      >>> jax.grad(lambda d: spmm(diag, None, False, d, (), x).sum())(d).tolist()
      [3.0, 3.0]
    """

    spmm: Callable[..., jax.Array]
    sample: Callable[..., Any]


# ------------------------------------------------------------------ the primitives
# ``spmm_p`` binds ``(values, *pattern_leaves, x)`` and ``sample_p`` binds
# ``(u, v, *pattern_leaves)``; the pattern's tree structure, the kernels, the config
# and ``transpose`` are static parameters (all hashable).
spmm_p = Primitive("jsparse_spmm")
sample_p = Primitive("jsparse_sample")


def spmm(
    kernels: ProductKernels, config: Hashable, transpose: bool, values, pattern, x: jax.Array
) -> jax.Array:
    """``op(A) @ x`` through ``kernels``, a linear primitive with sparse derivatives.

    Bilinear in ``values`` and ``x``: its JVP is two products (``op(dA) @ x +
    op(A) @ dx``), its transposes are ``dx = op(A).T @ dy`` (the same kernel,
    ``transpose`` flipped) and ``dvalues = dy @ x.T`` sampled at the pattern; neither
    densifies ``A``. So ``jax.grad``, ``jax.jvp``, ``jax.linearize``,
    ``jax.linear_transpose``, their compositions and ``jax.vmap`` all work.

    Args:
      kernels: the format's bundle of one implementation.
      config: its static configuration (hashable).
      transpose: multiply by ``A.T``.
      values: the stored values (differentiable).
      pattern: the index arrays (a pytree of integer arrays; not differentiated).
      x: dense 2-D operand.

    Returns:
      ``op(A) @ x`` in ``x.dtype``.

    Raises:
      ValueError: from a transpose rule asked to transpose in ``values`` and ``x`` at
        once (the product is bilinear, not linear, in the pair).

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> from jsparse.formats.bcsr.xla import XLA_KERNELS
      >>> a = jsparse.BCSR.random(jax.random.key(0), (8, 8), density=0.5, block_shape=(2, 2))
      >>> x = jnp.ones((8, 3))
      >>> y = spmm(XLA_KERNELS, a.kernel_config, False, a.data, a.pattern, x)
      >>> bool(jnp.allclose(y, a.todense() @ x))
      True
      >>> f = lambda x: spmm(XLA_KERNELS, a.kernel_config, False, a.data, a.pattern, x)
      >>> bool(jnp.allclose(jax.jvp(f, (x,), (x,))[1], y))
      True
    """
    leaves, tree = jax.tree.flatten(pattern)
    params = dict(kernels=kernels, config=config, transpose=transpose, tree=tree)
    args = (values, *leaves, x)
    rows, cols = meshes.spec_of(x)
    mesh = meshes.explicit_mesh(args)
    if mesh is not None and _batch_only(args[:-1], rows, cols):
        # Data parallel: each device multiplies its own columns of x; no collective.
        local = functools.partial(_bind, spmm_p, params=params, out_spec=None)
        specs = [P()] * len(leaves) + [P(), P(None, cols)]
        return meshes.batch_parallel(local, args, mesh, specs, P(None, cols))
    # x's columns (the batch in x @ A) keep their sharding; the rows are A's.
    return _bind(spmm_p, *args, params=params, out_spec=P(None, cols))


def sample(kernels: ProductKernels, config: Hashable, pattern, u: jax.Array, v: jax.Array):
    """``u @ v.T`` at the stored positions of ``pattern`` (values-shaped): an SDDMM, a
    linear primitive with sparse derivatives.

    Bilinear in ``u`` and ``v``: its JVP is two samples, its transposes two products
    with the cotangent as values (``du = G @ v``, ``dv = G.T @ u``, ``G`` the sparse
    matrix holding the cotangent).

    Args:
      kernels: the format's bundle of one implementation.
      config: its static configuration (hashable).
      pattern: the format's index arrays.
      u: dense ``(M, J)``; v: dense ``(K, J)`` (the right factor, transposed).

    Returns:
      An array shaped like the format's values, in ``u.dtype``.

    Raises:
      ValueError: from a transpose rule asked to transpose in ``u`` and ``v`` at once.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> from jsparse.formats.bcsr.xla import XLA_KERNELS
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> blocks = sample(XLA_KERNELS, a.kernel_config, a.pattern, jnp.ones((4, 3)),
      ...                 jnp.ones((4, 3)))
      >>> blocks.shape, float(blocks[0, 0, 0])
      ((2, 2, 2), 3.0)
    """
    leaves, tree = jax.tree.flatten(pattern)
    params = dict(kernels=kernels, config=config, tree=tree)
    args = (u, v, *leaves)
    (u_rows, j), (v_rows, v_j) = meshes.spec_of(u), meshes.spec_of(v)
    mesh = meshes.explicit_mesh(args)
    if mesh is not None and j == v_j and _batch_only(leaves, u_rows, j) and v_rows is None:
        # Data parallel (the values' gradient): each device samples its own columns
        # and one all-reduce, the size of the stored values, sums them.
        def local(*a):
            return jax.lax.psum(_bind(sample_p, *a, params=params, out_spec=None), axes)

        axes = tuple(meshes.axis_names(u))
        specs = [P(None, j), P(None, j)] + [P()] * len(leaves)
        return meshes.batch_parallel(local, args, mesh, specs, P())
    return _bind(sample_p, *args, params=params, out_spec=P())  # values: replicated


# --- meshes (jsparse.core.meshes): operands varying alike inside shard_map; on
# explicit axes the kernels run with those axes automatic. ``op(A) @ x`` keeps the
# sharding of x's columns (the batch of x @ A); a sample (values-shaped) is replicated.
def _bind(prim, *args, params, out_spec):
    args = meshes.vary_alike(args)
    return meshes.on_auto_axes(lambda *a: prim.bind(*a, **params), args, out_spec)


def _batch_only(operands, rows, cols) -> bool:
    """Whether only the batch axis (``cols``) of the dense operand is sharded."""
    return rows is None and cols is not None and not any(map(meshes.axis_names, operands))


# --- implementations (eager, and lowered through the same function)
def _spmm_impl(values, *rest, kernels, config, transpose, tree):
    *leaves, x = rest
    return kernels.spmm(values, tree.unflatten(leaves), x, config=config, transpose=transpose)


def _sample_impl(u, v, *leaves, kernels, config, tree):
    return kernels.sample(u, v, tree.unflatten(leaves), config=config)


def _struct(aval):
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype)


@functools.lru_cache(maxsize=4096)
def _cached_shape(impl, params: tuple, shapes: tuple):
    with meshes.invariant_tracing():  # plain shapes, outside any mesh
        out = jax.eval_shape(functools.partial(impl, **dict(params)), *shapes)
    return out.shape, out.dtype


def _abstract_eval(impl):
    """Abstract evaluation: the kernel's own output shape and dtype (``eval_shape``,
    cached per static parameters and input shapes), varying over the manual axes
    its operands vary over."""

    def rule(*avals, **params):
        key = tuple(sorted(params.items()))
        shapes = tuple(map(_struct, avals))
        try:
            hash((key, shapes))
            shape, dtype = _cached_shape(impl, key, shapes)
        except TypeError:  # an unhashable (e.g. symbolic) shape: no cache
            shape, dtype = _cached_shape.__wrapped__(impl, key, shapes)
        return meshes.varying_result(shape, dtype, avals)

    return rule


spmm_p.def_impl(_spmm_impl)
spmm_p.def_abstract_eval(_abstract_eval(_spmm_impl))
mlir.register_lowering(spmm_p, meshes.invariant_lowering(_spmm_impl))
sample_p.def_impl(_sample_impl)
sample_p.def_abstract_eval(_abstract_eval(_sample_impl))
mlir.register_lowering(sample_p, meshes.invariant_lowering(_sample_impl))


# --- JVPs: bilinear, so the tangent is the sum of two calls of the same primitive
def _is_zero(t) -> bool:
    return type(t) is ad.Zero


def _sum_terms(terms, out):
    if not terms:
        return ad.Zero(jax.core.get_aval(out).to_tangent_aval())
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total.astype(out.dtype)


def _spmm_jvp(primals, tangents, **params):
    values, *leaves, x = primals
    dvalues, *_, dx = tangents
    y = spmm_p.bind(*primals, **params)
    terms = []
    if not _is_zero(dvalues):
        terms.append(spmm_p.bind(dvalues, *leaves, x, **params))
    if not _is_zero(dx):
        terms.append(spmm_p.bind(values, *leaves, dx, **params))
    return y, _sum_terms(terms, y)


def _sample_jvp(primals, tangents, **params):
    u, v, *leaves = primals
    du, dv, *_ = tangents
    out = sample_p.bind(*primals, **params)
    terms = []
    if not _is_zero(du):
        terms.append(sample_p.bind(du, v, *leaves, **params))
    if not _is_zero(dv):
        terms.append(sample_p.bind(u, dv, *leaves, **params))
    return out, _sum_terms(terms, out)


ad.primitive_jvps[spmm_p] = _spmm_jvp
ad.primitive_jvps[sample_p] = _sample_jvp


# --- transposes: the sparse backward, the same kernels
def _undefined(x) -> bool:
    return ad.is_undefined_primal(x)


def _check_linear(name, a, b, leaves):
    if (_undefined(a) and _undefined(b)) or any(map(_undefined, leaves)):
        raise ValueError(
            f"{name} is bilinear: it can be transposed in one dense operand at a time, "
            "never in its index arrays"
        )


def _spmm_transpose(ct, values, *rest, kernels, config, transpose, tree):
    *leaves, x = rest
    _check_linear("spmm", values, x, leaves)
    dvalues = dx = None
    if not _is_zero(ct):
        if _undefined(x):  # dX = op(A).T @ dY: the same kernel, transpose flipped
            dx = spmm_p.bind(
                values, *leaves, ct,
                kernels=kernels, config=config, transpose=not transpose, tree=tree,
            ).astype(x.aval.dtype)  # fmt: skip
        if _undefined(values):  # dA = dY @ X.T at A's pattern
            u, v = (x, ct) if transpose else (ct, x)
            dvalues = sample_p.bind(
                u, v, *leaves, kernels=kernels, config=config, tree=tree
            ).astype(values.aval.dtype)
    return [dvalues, *(None for _ in leaves), dx]


def _sample_transpose(g, u, v, *leaves, kernels, config, tree):
    _check_linear("sample", u, v, leaves)
    du = dv = None
    if not _is_zero(g):
        params = dict(kernels=kernels, config=config, tree=tree)
        # out = (u @ v.T) at the pattern  =>  du = G @ v and dv = G.T @ u, G holding g.
        if _undefined(u):
            du = spmm_p.bind(g, *leaves, v, transpose=False, **params).astype(u.aval.dtype)
        if _undefined(v):
            dv = spmm_p.bind(g, *leaves, u, transpose=True, **params).astype(v.aval.dtype)
    return [du, dv, *(None for _ in leaves)]


ad.primitive_transposes[spmm_p] = _spmm_transpose
ad.primitive_transposes[sample_p] = _sample_transpose


# --- batching
def _loop(prim, args, dims, params):
    """Any batched operand but a lone ``x``: one call per batch element (``lax.map``),
    so that the body stays this primitive (differentiable again, kernels unchanged)."""
    mapped = [i for i, d in enumerate(dims) if d is not None]
    moved = [jnp.moveaxis(args[i], dims[i], 0) for i in mapped]

    def one(sliced):
        full = list(args)
        for i, s in zip(mapped, sliced, strict=True):
            full[i] = s
        return prim.bind(*full, **params)

    return lax.map(one, moved), 0


def _spmm_batch(args, dims, **params):
    *_, xd = dims
    if all(d is None for d in dims[:-1]):
        # Only x is batched: fold the batch into the columns, one product.
        x = jnp.moveaxis(args[-1], xd, 1)
        k, b, n = x.shape
        y = spmm_p.bind(*args[:-1], x.reshape(k, b * n), **params)
        return y.reshape(y.shape[0], b, n), 1
    return _loop(spmm_p, args, dims, params)


def _sample_batch(args, dims, **params):
    return _loop(sample_p, args, dims, params)


batching.primitive_batchers[spmm_p] = _spmm_batch
batching.primitive_batchers[sample_p] = _sample_batch
