"""Every JAX transformation through every sparse product, against the dense oracle.

Forward mode (``jvp``, ``jacfwd``, ``hessian``, forward-over-reverse), reverse mode
(``jacrev``, ``grad``), ``linearize``, ``linear_transpose`` and ``vmap`` of them, for
every format's representative example (its first: the rules are the format's, and
tests/test_oracle.py runs their kernels on every pattern), every implementation and
orientation (``A @ x`` and ``x @ A``): the same transformation of the same function on
``a.todense()`` is the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsparse

from factories import FORMAT_OF, REPRESENTATIVES
from oracle import assert_close

F32 = jnp.float32


def _impls(fmt):
    # Not "auto": it runs one of these (chosen at trace time), so it adds no rule.
    return list(jsparse.implementations("matmul", fmt))


# One shape per format: every format, implementation and orientation.
CASES = [
    (f, f.shapes[0], impl, left)
    for f in REPRESENTATIVES
    for impl in _impls(FORMAT_OF[f.name])
    if impl != "xla"
    for left in (False, True)
]
IDS = [f"{f.name}-{impl}-{'x@a' if left else 'a@x'}" for f, _, impl, left in CASES]


def _values(a):
    return tuple(getattr(a, f) for f in a._value_fields)


def _sparse_fn(a, impl, left):
    """``(values, x) -> op`` through the sparse product (the format's ``impl``)."""

    def fn(vals, x):
        w = a.with_values(*vals)
        return jsparse.matmul(x, w, impl=impl) if left else jsparse.matmul(w, x, impl=impl)

    return fn


def _dense_fn(a, left):
    """The same function on the dense matrix (the oracle)."""

    def fn(vals, x):
        w = a.with_values(*vals).todense()
        return x @ w if left else w @ x

    return fn


def _transforms(fn, vals, x, dvals, dx, ct, dxs, dvals_batch, xs, full=True):
    """The transformations of ``fn(vals, x)`` the suite checks, as a dict: all of them
    (``full``), or the core ones (forward-over-reverse, the transpose in ``x`` and a
    ``vmap`` of joint JVPs, batched in the values and ``x``), which exercise every rule
    (JVP, transpose, both batching paths) and their compositions."""

    def loss(v, x):
        return jnp.sum(jnp.tanh(fn(v, x)))

    out = {}
    # forward-over-reverse Hessian-vector product, in the values and x at once
    out["hvp"] = jax.jvp(jax.grad(loss, argnums=(0, 1)), (vals, x), (dvals, dx))[1]
    out["linear_transpose_x"] = jax.linear_transpose(lambda x: fn(vals, x), x)(ct)
    out["vmap_jvp"] = jax.vmap(lambda dv, dx: jax.jvp(fn, (vals, x), (dv, dx))[1])(
        dvals_batch, dxs[:2]
    )
    if not full:
        return out
    out["jvp"] = jax.jvp(fn, (vals, x), (dvals, dx))
    out["vmap_jvp_values"] = jax.vmap(lambda d: jax.jvp(lambda v: fn(v, x), (vals,), (d,))[1])(
        dvals_batch
    )
    out["jvp_x"] = jax.jvp(lambda x: fn(vals, x), (x,), (dx,))
    out["jvp_values"] = jax.jvp(lambda v: fn(v, x), (vals,), (dvals,))
    out["jacfwd"] = jax.jacfwd(lambda x: jnp.tanh(fn(vals, x)))(x)
    out["jacrev"] = jax.jacrev(lambda x: jnp.tanh(fn(vals, x)))(x)
    out["grad"] = jax.grad(loss, argnums=(0, 1))(vals, x)
    out["hessian"] = jax.hessian(lambda x: loss(vals, x))(x)
    y, lin = jax.linearize(fn, vals, x)
    out["linearize"] = (y, lin(dvals, dx))
    if len(vals) == 1:  # entrywise formats: linear in their one value leaf
        out["linear_transpose_values"] = jax.linear_transpose(lambda v: fn(v, x), vals)(ct)
    out["vmap_jvp_x"] = jax.vmap(lambda d: jax.jvp(lambda x: fn(vals, x), (x,), (d,))[1])(dxs)
    # per-example gradients: a batch of x under the reverse mode (the SDDMM batched)
    out["vmap_grad"] = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0))(vals, xs)
    return out


def _inputs(a, left, n=2):
    m, k = a.shape
    keys = jax.random.split(jax.random.key(1), 8)
    x_shape, y_shape = ((n, m), (n, k)) if left else ((k, n), (m, n))
    scale = 1.0 / np.sqrt(max(a.shape))  # keeps tanh out of saturation
    x = jax.random.normal(keys[0], x_shape, F32) * scale
    dx = jax.random.normal(keys[1], x_shape, F32)
    ct = jax.random.normal(keys[2], y_shape, F32)
    dxs = jax.random.normal(keys[3], (3, *x_shape), F32)
    xs = jax.random.normal(keys[4], (2, *x_shape), F32) * scale
    vals = _values(a)
    dvals = tuple(
        jax.random.normal(kk, v.shape, F32)
        for kk, v in zip(jax.random.split(keys[5], len(vals)), vals, strict=True)
    )
    dvals_batch = tuple(
        jax.random.normal(kk, (2, *v.shape), F32)
        for kk, v in zip(jax.random.split(keys[6], len(vals)), vals, strict=True)
    )
    return vals, x, dvals, dx, ct, dxs, dvals_batch, xs


SECOND_ORDER = {"hessian", "hvp"}


@functools.cache
def _dense_reference(name: str, shape: tuple[int, int], left: bool):
    """All transformations on ``a.todense()``, computed once per example and side."""
    factory = next(f for f in REPRESENTATIVES if f.name == name)
    a = factory.make(jax.random.key(0), shape, F32)
    out = jax.jit(lambda *args: _transforms(_dense_fn(a, left), *args))(*_inputs(a, left))
    return jax.tree.map(np.asarray, out)


def _check(factory, shape, impl, left, full):
    a = factory.make(jax.random.key(0), shape, F32)
    args = _inputs(a, left)
    sparse = jax.jit(lambda *args: _transforms(_sparse_fn(a, impl, left), *args, full=full))(*args)
    dense = _dense_reference(factory.name, shape, left)
    assert set(sparse) <= set(dense) and (not full or sparse.keys() == dense.keys())
    for name in sparse:
        k = int(np.prod(shape)) if name in SECOND_ORDER else max(shape)
        got, want = jax.tree.leaves(sparse[name]), jax.tree.leaves(dense[name])
        assert len(got) == len(want), name
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g.shape == w.shape and g.dtype == w.dtype, (name, i)
            assert_close(g, w, F32, k, err_msg=f"{name}[{i}] impl={impl}")


# Every transformation through the sparse (XLA) kernels of every format...
FULL = [(f, f.shapes[0], left) for f in REPRESENTATIVES for left in (False, True)]
FULL_IDS = [f"{f.name}-{'x@a' if left else 'a@x'}" for f, _, left in FULL]


@pytest.mark.parametrize("factory,shape,left", FULL, ids=FULL_IDS)
def test_every_transformation_xla(factory, shape, left):
    _check(factory, shape, "xla", left, full=True)


# ... and the core ones (every rule: JVP, transpose, batching, and their compositions)
# through every other implementation.
@pytest.mark.parametrize("factory,shape,impl,left", CASES, ids=IDS)
def test_transformations(factory, shape, impl, left):
    _check(factory, shape, impl, left, full=False)


@pytest.mark.parametrize("dtype", [jnp.bfloat16], ids=["bf16"])
@pytest.mark.parametrize("factory", REPRESENTATIVES, ids=[f.name for f in REPRESENTATIVES])
def test_jvp_dtypes_default_impl(factory, dtype):
    """``jax.jvp`` in both operands with the default ``impl``, in the other dtypes
    (float32 is every other test's)."""
    shape = factory.shapes[0]
    a = factory.make(jax.random.key(2), shape, dtype)
    vals, x, dvals, dx, *_ = _inputs(a, False)
    x, dx = x.astype(dtype), dx.astype(dtype)
    dvals = tuple(d.astype(dtype) for d in dvals)
    sparse = jax.jvp(_sparse_fn(a, "auto", False), (vals, x), (dvals, dx))

    def dense(vals, x):  # the oracle in float32 on the same (rounded) inputs
        w = a.with_values(*vals).todense().astype(F32)
        return w @ x.astype(F32)

    expected = jax.jvp(dense, (vals, x), (dvals, dx))
    for got, want in zip(sparse, expected, strict=True):
        assert got.dtype == dtype
        assert_close(got, want, dtype, max(shape))


def test_issue_repro_bcsr_jvp():
    """The reported failure: forward mode through a sparse (not densified) BCSR product."""
    a = jsparse.BCSR.random(jax.random.key(0), (128, 96), density=0.1, block_shape=(16, 16))
    x = jax.random.normal(jax.random.key(1), (96,))
    y, t = jax.jvp(lambda x: a @ x, (x,), (x,))
    assert_close(y, a.todense() @ x, F32, 96)
    assert_close(t, a.todense() @ x, F32, 96)
    # the sparse XLA product is the one that runs (auto does not densify at 10%)
    jaxpr = str(jax.make_jaxpr(lambda x: jax.jvp(lambda x: a @ x, (x,), (x,)))(x))
    assert "jsparse_spmm" in jaxpr


def test_issue_repro_nm_hessian():
    nm = jsparse.NM.random(jax.random.key(0), (16, 32), n=2, m=4)
    x = jax.random.normal(jax.random.key(1), (32,)) * 0.2
    h = jax.hessian(lambda x: jnp.sum(jnp.tanh(nm @ x)))(x)
    ref = jax.hessian(lambda x: jnp.sum(jnp.tanh(nm.todense() @ x)))(x)
    assert_close(h, ref, F32, 32 * 16)


@pytest.mark.parametrize("impl", ["auto", "xla", "pallas"])
def test_hessian_through_nm_linear(impl):
    layer = jsparse.nn.NMLinear(16, 8, n=2, m=4, impl=impl, rngs=nnx.Rngs(0))
    w, b = layer.kernel.todense(), layer.bias[...]
    x = jax.random.normal(jax.random.key(3), (16,)) * 0.3

    h = jax.hessian(lambda x: jnp.sum(jnp.tanh(layer(x))))(x)
    ref = jax.hessian(lambda x: jnp.sum(jnp.tanh(x @ w + b)))(x)
    assert_close(h, ref, F32, 16 * 8)

    # and the Hessian in the layer's parameters (nnx.grad inside jax.jacfwd)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(params):
        return jnp.sum(jnp.tanh(nnx.merge(graphdef, params, rest)(x)))

    hp = jax.hessian(loss)(params)
    values = params["kernel_values"][...]

    def loss_values(v):
        dense = layer.kernel.with_values(v).todense()
        return jnp.sum(jnp.tanh(x @ dense + b))

    ref_p = jax.hessian(loss_values)(values)
    assert_close(hp["kernel_values"]["kernel_values"][...], ref_p, F32, 16 * 8)


def test_linear_transpose_is_the_sparse_transpose():
    """``linear_transpose`` of ``x -> A @ x`` runs the transposed kernel (no densify)."""
    a = jsparse.BCSR.random(jax.random.key(4), (64, 48), density=0.2, block_shape=(8, 8))
    ct = jax.random.normal(jax.random.key(5), (64, 3))
    f_t = jax.linear_transpose(lambda x: jsparse.matmul(a, x, impl="xla"), jnp.zeros((48, 3)))
    (got,) = f_t(ct)
    assert_close(got, a.todense().T @ ct, F32, 64)
    jaxpr = str(jax.make_jaxpr(f_t)(ct))
    assert "jsparse_spmm" in jaxpr and "transpose=True" in jaxpr


def test_index_leaves_get_float0_tangents_and_cotangents():
    """A whole format through ``jvp`` (float0 tangents for the index leaves) and
    ``grad(allow_int=True)``: the value tangent matches the dense one."""
    a = jsparse.NM.random(jax.random.key(6), (8, 16), n=2, m=4)
    x = jax.random.normal(jax.random.key(7), (16, 2))
    ta = a._replace(
        values=jnp.ones_like(a.values),
        positions=np.zeros(a.positions.shape, jax.dtypes.float0),
    )
    _, t = jax.jvp(lambda a: jsparse.matmul(a, x, impl="xla"), (a,), (ta,))
    expected = a.with_values(jnp.ones_like(a.values)).todense() @ x
    assert_close(t, expected, F32, 16)
    g = jax.grad(lambda a: jnp.sum(jsparse.matmul(a, x, impl="xla") ** 2), allow_int=True)(a)
    assert g.positions.dtype == jax.dtypes.float0


def test_sample_forward_mode():
    """The SDDMM (``jsparse.sddmm``) has forward mode and a transpose too."""
    pattern = jsparse.BCSR.random(jax.random.key(8), (32, 24), density=0.3, block_shape=(4, 4))
    u = jax.random.normal(jax.random.key(9), (32, 5))
    v = jax.random.normal(jax.random.key(10), (5, 24))
    mask = (pattern.todense() != 0).astype(F32)

    def sparse(u, v):
        return jsparse.sddmm(u, v, pattern, impl="xla").todense()

    def dense(u, v):
        return (u @ v) * mask

    du, dv = jnp.cos(u), jnp.sin(v)
    got = jax.jvp(sparse, (u, v), (du, dv))
    want = jax.jvp(dense, (u, v), (du, dv))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, F32, 5)
    h = jax.hessian(lambda u: jnp.sum(jnp.tanh(sparse(u, v))))(u)
    assert_close(h, jax.hessian(lambda u: jnp.sum(jnp.tanh(dense(u, v))))(u), F32, 24 * 5)
