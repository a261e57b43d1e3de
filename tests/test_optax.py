"""optax on whole formats through ``jsparse.train.values_only``: a few steps of each
optimizer on the format equal the same optimizer run on the value leaves alone (the
reference), and the index leaves never change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jsparse

from factories import FACTORIES

# One example of each format (the first listed).
_FIRST: dict[str, object] = {}
for _f in FACTORIES:
    _FIRST.setdefault(_f.name.split("_")[0], _f)
EXAMPLES = list(_FIRST.values())
IDS = [f.name for f in EXAMPLES]

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "lion": lambda: optax.lion(1e-2),
    "clip_adamw": lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2)),
    "schedule": lambda: optax.adam(optax.cosine_decay_schedule(1e-2, decay_steps=3)),
    "contrib_schedule_free": lambda: optax.contrib.schedule_free_adamw(1e-2, warmup_steps=1),
    "contrib_prodigy": lambda: optax.contrib.prodigy(1.0),
}
STEPS = 3


def _problem(factory):
    shape = factory.shapes[0]
    a = factory.make(jax.random.key(0), shape, jnp.float32)
    x = jax.random.normal(jax.random.key(1), (shape[1], 4))
    target = jax.random.normal(jax.random.key(2), (shape[0], 4))

    def loss(w):
        return jnp.mean((w @ x - target) ** 2)

    return a, loss


def _values(a):
    return tuple(getattr(a, f) for f in a._value_fields)


@pytest.mark.parametrize("factory", EXAMPLES, ids=IDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_whole_format_equals_values_alone(factory, name):
    a, loss = _problem(factory)
    tx = jsparse.train.values_only(OPTIMIZERS[name]())
    ref_tx = OPTIMIZERS[name]()

    @jax.jit
    def step(w, state):
        g = jax.grad(loss, allow_int=True)(w)
        updates, state = tx.update(g, state, w)
        return optax.apply_updates(w, updates), state

    def ref_loss(values):
        return loss(a.with_values(*values))

    @jax.jit
    def ref_step(values, state):
        updates, state = ref_tx.update(jax.grad(ref_loss)(values), state, values)
        return optax.apply_updates(values, updates), state

    w, state = a, tx.init(a)
    values, ref_state = _values(a), ref_tx.init(_values(a))
    for _ in range(STEPS):
        w, state = step(w, state)
        values, ref_state = ref_step(values, ref_state)
    assert type(w) is type(a)
    for got, want in zip(_values(w), values, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    for f in a._index_fields:
        got, want = getattr(w, f), getattr(a, f)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    moved = [not np.allclose(np.asarray(u), np.asarray(v)) for u, v in zip(
        _values(w), _values(a), strict=True)]
    assert any(moved)
    np.testing.assert_allclose(
        np.asarray(w.todense()), np.asarray(a.with_values(*values).todense()), rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("factory", EXAMPLES, ids=IDS)
def test_reduce_on_plateau_extra_args(factory):
    """optax.contrib.reduce_on_plateau needs ``value=``: passed through."""
    a, loss = _problem(factory)
    make = lambda: optax.chain(  # noqa: E731
        optax.adam(1e-2), optax.contrib.reduce_on_plateau(patience=1, factor=0.5)
    )
    tx, ref_tx = jsparse.train.values_only(make()), make()
    w, state = a, tx.init(a)
    values, ref_state = _values(a), ref_tx.init(_values(a))
    for _ in range(STEPS):
        value, g = jax.value_and_grad(loss, allow_int=True)(w)
        updates, state = tx.update(g, state, w, value=value)
        w = optax.apply_updates(w, updates)
        ref_value, rg = jax.value_and_grad(lambda v: loss(a.with_values(*v)))(values)
        ref_updates, ref_state = ref_tx.update(rg, ref_state, values, value=ref_value)
        values = optax.apply_updates(values, ref_updates)
    for got, want in zip(_values(w), values, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_plain_optax_fails_and_wrapper_in_a_pytree():
    """The failure the wrapper exists for, and a mixed pytree (format, dense bias, an
    integer step counter) where only the floating leaves move."""
    w = jsparse.NM.random(jax.random.key(0), (8, 16), n=2, m=4)
    params = {"w": w, "b": jnp.zeros(8), "step": jnp.int32(7)}
    x = jnp.ones(16)

    def loss(p):
        return jnp.sum((p["w"] @ x + p["b"]) ** 2)

    g = jax.grad(loss, allow_int=True)(params)
    with pytest.raises(TypeError):
        plain = optax.adam(1e-2)
        optax.apply_updates(params, plain.update(g, plain.init(params), params)[0])
    tx = jsparse.train.values_only(optax.adam(1e-2))
    updates, _ = tx.update(g, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert int(new["step"]) == 7 and new["step"].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(new["w"].positions), np.asarray(w.positions))
    assert not np.allclose(np.asarray(new["b"]), 0.0)


def test_values_only_rejects_non_transformations():
    with pytest.raises(TypeError, match="GradientTransformation"):
        jsparse.train.values_only(1e-3)
