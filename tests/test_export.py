"""jax.export of functions taking and returning formats: serialization round trips
(every oracle example), a symbolic batch dimension on the dense operand (both
orientations, leading batch axes) and one export for several platforms called on CPU
(each format's representative example: tests/factories.py). Every result is compared
with the eager product or the dense oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jsparse
from jsparse.core.registry import on_platform

from factories import FACTORIES, REPRESENTATIVE_CASES, REPRESENTATIVE_IDS

CASES = [(f, f.shapes[0]) for f in FACTORIES]
IDS = [f.name for f, _ in CASES]
PLATFORMS = ["cpu", "cuda", "tpu"]


def _close(got, want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def _make(factory, shape):
    return factory.make(jax.random.key(0), shape, jnp.float32)


@pytest.mark.parametrize(("factory", "shape"), CASES, ids=IDS)
def test_serialize_round_trip(factory, shape):
    a = _make(factory, shape)
    x = jax.random.normal(jax.random.key(1), (shape[1], 3))
    exp = export.export(jax.jit(lambda a, x: (a @ x, a)))(a, x)
    back = export.deserialize(exp.serialize())
    y, a2 = back.call(a, x)
    _close(y, a @ x)
    _close(y, a.todense() @ x)
    assert type(a2) is type(a) and a2.shape == a.shape
    for f in a._static_fields:
        assert getattr(a2, f) == getattr(a, f)
    for leaf, leaf2 in zip(jax.tree.leaves(a), jax.tree.leaves(a2), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(leaf2))


@pytest.mark.parametrize(("factory", "shape"), REPRESENTATIVE_CASES, ids=REPRESENTATIVE_IDS)
@pytest.mark.parametrize("left", [False, True], ids=["A@x", "x@A"])
def test_symbolic_batch(factory, shape, left):
    a = _make(factory, shape)
    m, k = shape
    if left:
        spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"b, {m}"), jnp.float32)
        fn = lambda a, x: x @ a  # noqa: E731
    else:
        spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"{k}, b"), jnp.float32)
        fn = lambda a, x: a @ x  # noqa: E731
    back = export.deserialize(export.export(jax.jit(fn))(a, spec).serialize())
    dense = a.todense()
    for b in (1, 5):
        x = jax.random.normal(jax.random.key(b), (b, m) if left else (k, b))
        y = back.call(a, x)
        _close(y, fn(a, x))
        _close(y, x @ dense if left else dense @ x)


@pytest.mark.parametrize(("factory", "shape"), REPRESENTATIVE_CASES, ids=REPRESENTATIVE_IDS)
@pytest.mark.parametrize("left", [False, True], ids=["A@x", "x@A"])
def test_symbolic_leading_batch(factory, shape, left):
    a = _make(factory, shape)
    m, k = shape
    spec_shape = f"b, 2, {m}" if left else f"b, {k}, 3"
    spec = jax.ShapeDtypeStruct(export.symbolic_shape(spec_shape), jnp.float32)
    fn = (lambda a, x: x @ a) if left else (lambda a, x: a @ x)
    exp = export.export(jax.jit(fn))(a, spec)
    x = jax.random.normal(jax.random.key(2), (4, 2, m) if left else (4, k, 3))
    dense = a.todense()
    _close(exp.call(a, x), x @ dense if left else dense @ x)


@pytest.mark.parametrize(("factory", "shape"), REPRESENTATIVE_CASES, ids=REPRESENTATIVE_IDS)
def test_multi_platform_export(factory, shape):
    a = _make(factory, shape)
    x = jax.random.normal(jax.random.key(3), (shape[1], 4))
    xl = jax.random.normal(jax.random.key(4), (4, shape[0]))
    fn = jax.jit(lambda a, x, xl: (a @ x, xl @ a))
    exp = export.export(fn, platforms=PLATFORMS)(a, x, xl)
    assert tuple(exp.platforms) == tuple(PLATFORMS)
    y, yl = export.deserialize(exp.serialize()).call(a, x, xl)
    _close(y, a.todense() @ x)
    _close(yl, xl @ a.todense())


@pytest.mark.parametrize(("factory", "shape"), CASES[:1] + CASES[-1:], ids=IDS[:1] + IDS[-1:])
def test_multi_platform_export_symbolic_and_grad(factory, shape):
    """A training-style function (value and gradient) exported for every platform with
    a symbolic batch."""
    a = _make(factory, shape)
    spec = jax.ShapeDtypeStruct(export.symbolic_shape(f"b, {shape[0]}"), jnp.float32)

    def loss(a, x):
        return jnp.sum(jnp.tanh(x @ a))

    fn = jax.jit(lambda a, x: jax.grad(loss, argnums=1)(a, x))
    exp = export.export(fn, platforms=PLATFORMS)(a, spec)
    x = jax.random.normal(jax.random.key(5), (3, shape[0]))
    want = jax.grad(lambda x: jnp.sum(jnp.tanh(x @ a.todense())))(x)
    _close(exp.call(a, x), want)


def test_static_fields_serialized_as_json():
    a = jsparse.NM.fromdense(jnp.ones((4, 8)), n=2, m=4)
    exp = export.export(jax.jit(lambda a: a))(a)
    back = export.deserialize(exp.serialize())
    out = back.call(a)
    assert (out.shape, out.n, out.m, out.axis) == (a.shape, a.n, a.m, a.axis)
    assert isinstance(out.shape, tuple)


def test_symbolic_width_declined_by_pallas_with_reason():
    a = jsparse.BCSR.random(jax.random.key(0), (64, 64), density=0.2, block_shape=(16, 16))
    spec = jax.ShapeDtypeStruct(export.symbolic_shape("64, b"), jnp.float32)
    with pytest.raises(ValueError, match="symbolic"):
        export.export(jax.jit(lambda a, x: jsparse.matmul(a, x, impl="pallas")))(a, spec)


def test_on_platform_placeholder_and_errors():
    f = on_platform("cuda", lambda x: 2 * x)
    chosen = jax.jit(
        lambda x: jax.lax.platform_dependent(x, cuda=f, default=lambda x: x + 1)
    )
    exp = export.export(chosen, platforms=PLATFORMS)(jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(exp.call(jnp.ones(3))), [2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="cannot be lowered for cpu"):
        jax.jit(f)(jnp.ones(3))
    with pytest.raises(ValueError, match="platform must be one of"):
        on_platform("gpu", lambda x: x)
    g = on_platform("cpu", lambda x: 2 * x, export_fallback=lambda x: 3 * x)
    np.testing.assert_array_equal(np.asarray(jax.vmap(g)(jnp.ones((2, 3)))), 2 * np.ones((2, 3)))
    exp = export.export(jax.jit(g))(jnp.ones(3))  # export lowers the fallback
    np.testing.assert_array_equal(np.asarray(exp.call(jnp.ones(3))), [3.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="fallback returns shapes"):
        on_platform("cpu", lambda x: x, export_fallback=lambda x: x[:1])(jnp.ones(3))
