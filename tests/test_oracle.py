"""Every format against the dense oracle: eager, jit, vmap and grad, several dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse

from factories import FACTORIES, FORMAT_OF, REPRESENTATIVE_CASES, REPRESENTATIVE_IDS
from oracle import (
    assert_close,
    gather_dense_grad,
    scaled,
    stack_values,
    value_axes,
    value_leaves,
)

DTYPES = [jnp.float32, jnp.bfloat16]
CASES = [(f, shape) for f in FACTORIES for shape in f.shapes]


def _case_id(case) -> str:
    factory, shape = case
    return f"{factory.name}-{shape[0]}x{shape[1]}"


IDS = [_case_id(c) for c in CASES]


def _impls(case, combo: int, combos: int) -> list[str]:
    """The named implementations (not "auto": it runs one of them) that check ``case``
    in the ``combo``-th of ``combos`` combinations of the other factors (dtype and
    orientation). A pairwise design rather than every combination: implementation
    ``j`` of example ``c`` runs in combination ``(c + j) % combos``, so every
    implementation meets every example once, and every combination over the examples."""
    c = CASES.index(case)
    impls = jsparse.implementations("matmul", FORMAT_OF[case[0].name])
    return [impl for j, impl in enumerate(impls) if (c + j) % combos == combo]


def _dense_matmul(w, x, left: bool):
    """The oracle: the same product in float32 on the dense matrix."""
    w32, x32 = w.astype(jnp.float32), x.astype(jnp.float32)
    return jnp.matmul(x32, w32) if left else jnp.matmul(w32, x32)


def _operand(key, a, left: bool, batch: tuple[int, ...], n: int | None, dtype):
    m, k = a.shape
    if left:  # x @ a, x (..., M)
        shape = (*batch, m)
    else:  # a @ x, x (..., K, n) or (K,)
        shape = (k,) if n is None else (*batch, k, n)
    return jax.random.normal(key, shape, dtype)


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


# The members and the gradients in float32 on every example; in bfloat16 (a path of
# each format's code rather than of a pattern) on each format's representative example.
DTYPE_CASES = [pytest.param(c, jnp.float32, id=f"{_case_id(c)}-float32") for c in CASES] + [
    pytest.param(c, jnp.bfloat16, id=f"{_case_id(c)}-bfloat16") for c in REPRESENTATIVE_CASES
]


@pytest.mark.parametrize("case,dtype", DTYPE_CASES)
def test_basic_members(case, dtype):
    factory, shape = case
    a = factory.make(jax.random.key(0), shape, dtype)
    assert a.shape == shape and a.ndim == 2 and a.dtype == dtype
    d = a.todense()
    assert d.shape == shape and d.dtype == dtype
    a.validate()
    if isinstance(a, (jsparse.Monarch, jsparse.LowRankSparse)):
        # A factored format multiplies its factors in todense(); transposed, XLA's dot
        # sums in another order (which differs between AVX2 and AVX-512 machines), so
        # the two agree to a few ulps of the sum (rounded to `dtype`: one ulp of it);
        # every other format is exact.
        assert_close(a.T.todense(), d.T, dtype)
    else:
        np.testing.assert_array_equal(
            np.asarray(a.T.todense(), np.float32), np.asarray(d.T, np.float32)
        )
    assert a.T.shape == shape[::-1]
    b = a.astype(jnp.float32)
    assert b.dtype == jnp.float32
    # A factored format (Monarch, LowRankSparse) rounds its dense product in `dtype`,
    # so the float32 copy matches the rounded dense only to `dtype`'s tolerance.
    assert_close(b.todense(), d, dtype)
    # pytree round trip keeps the type and the values
    leaves, tree = jax.tree_util.tree_flatten(a)
    c = jax.tree_util.tree_unflatten(tree, leaves)
    assert type(c) is type(a)
    np.testing.assert_array_equal(np.asarray(c.todense(), np.float32), np.asarray(d, np.float32))


def _check_matmul(factory, shape, dtype, left, batch, n, impls=("auto",)):
    a = factory.make(jax.random.key(1), shape, dtype)
    x = _operand(jax.random.key(2), a, left, batch if (n or left) else (), n, dtype)
    if left and n is None:
        x = x.reshape(-1)  # the vector case: x (M,)
    expected = _dense_matmul(a.todense(), x, left)
    k = shape[0] if left else shape[1]

    def product(a, x, impl="auto"):
        return jsparse.matmul(x, a, impl=impl) if left else jsparse.matmul(a, x, impl=impl)

    eager = product(a, x)
    assert eager.shape == expected.shape and eager.dtype == dtype
    assert_close(eager, expected, dtype, k, err_msg="eager")
    assert_close((x @ a) if left else (a @ x), expected, dtype, k, err_msg="operator")
    for impl in impls:
        out = jax.jit(product, static_argnums=2)(a, x, impl)
        assert out.dtype == dtype, impl
        assert_close(out, expected, dtype, k, err_msg=f"jit impl={impl}")


@pytest.mark.parametrize("left", [False, True], ids=["a@x", "x@a"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_matmul(case, dtype, left):
    """A matrix operand: the default implementation eager and through the operator, and
    under ``jit`` each implementation in one of the four (dtype, orientation) cases."""
    factory, shape = case
    combo = 2 * DTYPES.index(dtype) + int(left)
    _check_matmul(factory, shape, dtype, left, (), 3, _impls(case, combo, 4))


# A vector or a batch is folded into a matrix before any implementation runs
# (jsparse.core.verbs): the folding is the verbs' (not a pattern's or an
# implementation's), checked through the default implementation on each format's
# representative example.
@pytest.mark.parametrize("left", [False, True], ids=["a@x", "x@a"])
@pytest.mark.parametrize("batch,n", [((), None), ((2,), 5)], ids=["vector", "batched"])
@pytest.mark.parametrize("case", REPRESENTATIVE_CASES, ids=REPRESENTATIVE_IDS)
def test_matmul_folds_vectors_and_batches(case, left, batch, n):
    factory, shape = case
    _check_matmul(factory, shape, jnp.float32, left, batch, n)


@pytest.mark.parametrize("left", [False, True], ids=["a@x", "x@a"])
@pytest.mark.parametrize("case", REPRESENTATIVE_CASES, ids=REPRESENTATIVE_IDS)
def test_vmap_over_dense_operand(case, left):
    """A batch of the dense operand is folded into its columns (the product's batching
    rule, jsparse.core.product: one rule for every format)."""
    factory, shape = case
    dtype = jnp.float32
    a = factory.make(jax.random.key(3), shape, dtype)
    xs = _operand(jax.random.key(4), a, left, (3, 2), 4, dtype)  # a batch of 3
    if left:
        f = jax.vmap(lambda x: x @ a)
        expected = jnp.stack([_dense_matmul(a.todense(), x, True) for x in xs])
    else:
        f = jax.vmap(lambda x: a @ x)
        expected = jnp.stack([_dense_matmul(a.todense(), x, False) for x in xs])
    assert_close(f(xs), expected, dtype, max(shape))
    assert_close(jax.jit(f)(xs), expected, dtype, max(shape))


@pytest.mark.parametrize("left", [False, True], ids=["a@x", "x@a"])
def test_vmap_over_values(case, left):
    factory, shape = case
    dtype = jnp.float32
    a = factory.make(jax.random.key(5), shape, dtype)
    mats = [a, scaled(a, -0.5), scaled(a, 2.0)]
    batched = stack_values(mats)
    x = _operand(jax.random.key(6), a, left, (2,), 3, dtype)
    f = (lambda a: x @ a) if left else (lambda a: a @ x)
    out = jax.vmap(f, in_axes=(value_axes(a),))(batched)
    expected = jnp.stack([_dense_matmul(m.todense(), x, left) for m in mats])
    assert_close(out, expected, dtype, max(shape))
    dense = jax.vmap(lambda a: a.todense(), in_axes=(value_axes(a),))(batched)
    assert_close(dense, jnp.stack([m.todense() for m in mats]), dtype)


@pytest.mark.parametrize("left", [False, True], ids=["a@x", "x@a"])
@pytest.mark.parametrize("case,dtype", DTYPE_CASES)
def test_grad(case, dtype, left):
    factory, shape = case
    a = factory.make(jax.random.key(7), shape, dtype)
    x = _operand(jax.random.key(8), a, left, (3,) if left else (), 3, dtype)
    target = jax.random.normal(jax.random.key(9), (3, shape[1]) if left else (shape[0], 3))

    k = max(shape)

    def _loss(y):  # smooth and O(1) sensitive, so bfloat16 rounding of y stays small
        y = y.astype(jnp.float32) / np.sqrt(k)
        return jnp.sum(target * y + 0.5 * y**2)

    def loss_dense(w, x):
        return _loss(_dense_matmul(w, x, left))

    # In float32 each implementation in one of the two orientations (_impls); the
    # default one in bfloat16.
    impls = _impls(case, int(left), 2) if dtype == jnp.float32 else []
    for impl in impls or ["auto"]:

        def loss(a, x, impl=impl):
            return _loss(
                jsparse.matmul(x, a, impl=impl) if left else jsparse.matmul(a, x, impl=impl)
            )

        ga, gx = jax.jit(jax.grad(loss, argnums=(0, 1), allow_int=True))(a, x)
        assert type(ga) is type(a)
        assert not any(
            jnp.issubdtype(leaf.dtype, jnp.integer) for leaf in jax.tree_util.tree_leaves(ga)
        ), "index leaves must get float0 cotangents"
        ga_ref = gather_dense_grad(a, lambda w, x=x: loss_dense(w, x))
        gx_ref = jax.grad(loss_dense, argnums=1)(a.todense(), x)
        for name, g in value_leaves(ga).items():
            assert g.dtype == getattr(a, name).dtype, (impl, name)
            assert_close(g, getattr(ga_ref, name), dtype, k, err_msg=f"d{name} impl={impl}")
        assert gx.dtype == x.dtype
        assert_close(gx, gx_ref, dtype, k, err_msg=f"dx impl={impl}")


def test_float0_index_cotangents(case):
    factory, shape = case
    a = factory.make(jax.random.key(10), shape, jnp.float32)
    ga = jax.grad(lambda a: jnp.sum(a @ jnp.ones((shape[1],))), allow_int=True)(a)
    index_fields = [f for f in a._leaf_fields if f not in a._value_fields]
    for f in index_fields:
        assert getattr(ga, f).dtype == jax.dtypes.float0, f
    ga.validate()  # a cotangent passes validation


# float64 is a path of each format's code, not of each pattern: each format's
# representative example.
@pytest.mark.parametrize("case", REPRESENTATIVE_CASES, ids=REPRESENTATIVE_IDS)
def test_float64(case):
    factory, shape = case
    with jax.enable_x64(True):
        a = factory.make(jax.random.key(11), shape, jnp.float64)
        x = jax.random.normal(jax.random.key(12), (shape[1], 2), jnp.float64)
        y = a @ x
        assert y.dtype == jnp.float64
        assert_close(y, a.todense() @ x, jnp.float64, shape[1])
        g = jax.grad(lambda x: jnp.sum((a @ x) ** 2))(x)
        assert_close(
            g, jax.grad(lambda x: jnp.sum((a.todense() @ x) ** 2))(x), jnp.float64, shape[1]
        )


def test_jit_does_not_recompile_for_new_values(case):
    factory, shape = case
    traces = []  # one entry per trace, hence per compilation

    def product(a, x):
        traces.append(None)
        return a @ x

    f = jax.jit(product)
    x = jnp.ones((shape[1], 2))
    a1 = factory.make(jax.random.key(13), shape, jnp.float32)
    a2 = factory.make(jax.random.key(14), shape, jnp.float32)  # new values and pattern
    f(a1, x)
    f(a2, x)
    assert len(traces) == 1
