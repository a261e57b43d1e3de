"""Stacked formats (leaves with leading batch axes) and jsparse.validate under jit with
checkify. Results are compared with the dense oracle or known values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jsparse

from factories import FACTORIES

CASES = [(f, f.shapes[0]) for f in FACTORIES]
IDS = [f.name for f, _ in CASES]


def _stack(*mats):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *mats)


@pytest.mark.parametrize(("factory", "shape"), CASES, ids=IDS)
def test_stacked_repr_error_and_vmap(factory, shape):
    mats = [factory.make(jax.random.key(i), shape, jnp.float32) for i in range(3)]
    s = _stack(*mats)
    name = type(s).__name__
    assert s.batch_shape == (3,) and mats[0].batch_shape == ()
    assert repr(s).startswith(f"{name}[stacked (3,)](shape={shape!r}")
    assert "stacked" not in repr(mats[0])
    x = jax.random.normal(jax.random.key(9), (shape[1], 2))
    for op in (lambda: s @ x, lambda: s.todense(), lambda: s.T, s.validate,
               lambda: jsparse.validate(s), lambda: jsparse.scale(s, 2.0)):
        with pytest.raises(ValueError, match=r"stacked along leading axes \(3,\).*jax.vmap"):
            op()
    # inside vmap, and indexed, it is an ordinary matrix
    ys = jax.vmap(lambda a: a @ x)(s)
    want = jnp.stack([m.todense() @ x for m in mats])
    np.testing.assert_allclose(np.asarray(ys), np.asarray(want), rtol=1e-5, atol=1e-5)
    one = jax.tree.map(lambda leaf: leaf[1], s)
    np.testing.assert_allclose(np.asarray(one @ x), np.asarray(mats[1].todense() @ x),
                               rtol=1e-5, atol=1e-5)


def test_stacked_by_scan_gives_clear_error():
    a = jsparse.BCSR.random(jax.random.key(0), (8, 8), density=0.5, block_shape=(2, 2))

    def body(c, _):
        return c, jsparse.scale(a, c)

    _, s = jax.lax.scan(body, 1.0, None, length=2)
    assert s.batch_shape == (2,)
    with pytest.raises(ValueError, match=r"BCSR is stacked along leading axes \(2,\)"):
        s @ jnp.ones(8)


def test_repr_of_non_array_leaves():
    a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
    dtypes = jax.tree.map(lambda leaf: leaf.dtype, a)
    assert repr(dtypes).startswith("BCSR(shape=(4, 4), data=")


def _checked(a):
    err, out = checkify.checkify(jax.jit(jsparse.validate))(a)
    return err, out


@pytest.mark.parametrize(("factory", "shape"), CASES, ids=IDS)
def test_validate_passes_valid_under_jit(factory, shape):
    a = factory.make(jax.random.key(0), shape, jnp.float32)
    assert jsparse.validate(a) is a  # eager: a.validate()
    err, out = _checked(a)
    err.throw()  # no error
    for leaf, leaf2 in zip(jax.tree.leaves(a), jax.tree.leaves(out), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(leaf2))


def test_bcsr_out_of_range_column_caught_under_jit():
    a = jsparse.BCSR.random(jax.random.key(0), (8, 8), density=0.5, block_shape=(2, 2))
    bad = a._replace(indices=a.indices.at[0].set(9))
    with pytest.raises(ValueError, match="BCSR indices must be block-columns in"):
        jsparse.validate(bad)  # eager
    err, _ = _checked(bad)
    with pytest.raises(checkify.JaxRuntimeError, match=r"BCSR indices .*\[0, 4\).*found 9"):
        err.throw()


def test_bcsr_bad_indptr_and_order_caught_under_jit():
    a = jsparse.BCSR.fromdense(jnp.ones((4, 4)), block_shape=(2, 2))  # indptr [0, 2, 4]
    err, _ = _checked(a._replace(indptr=jnp.array([0, 5, 4], jnp.int32)))
    with pytest.raises(checkify.JaxRuntimeError, match="indptr must be non-decreasing"):
        err.throw()
    err, _ = _checked(a._replace(indptr=jnp.array([0, 2, 3], jnp.int32)))
    with pytest.raises(checkify.JaxRuntimeError, match="BCSR indptr must start at 0 and end"):
        err.throw()
    unsorted = a._replace(indices=jnp.array([1, 0, 0, 1], jnp.int32))
    err, _ = _checked(unsorted)
    with pytest.raises(checkify.JaxRuntimeError, match="strictly increasing within each"):
        err.throw()


def test_nm_bad_positions_caught_under_jit():
    a = jsparse.NM.random(jax.random.key(0), (4, 8), n=2, m=4)
    # repeat a position inside a group: pack [0, 0] where [p0, p1] was
    from jsparse.formats.nm.packing import pack_positions

    pos = a.unpacked_positions.at[0, 1].set(a.unpacked_positions[0, 0])
    bad = a._replace(positions=pack_positions(pos, m=4))
    with pytest.raises(ValueError, match="strictly increasing"):
        jsparse.validate(bad)
    err, _ = _checked(bad)
    with pytest.raises(checkify.JaxRuntimeError, match="NM positions must be strictly"):
        err.throw()
    a8 = jsparse.NM.random(jax.random.key(0), (4, 12), n=1, m=3)  # 2 bits: 3 fits, m=3
    pos = a8.unpacked_positions.at[2, 1].set(3)
    bad = a8._replace(positions=pack_positions(pos, m=3))
    err, _ = _checked(bad)
    with pytest.raises(checkify.JaxRuntimeError, match=r"NM positions must be in \[0, m\)"):
        err.throw()


def test_validate_rejects_non_formats():
    with pytest.raises(TypeError, match="jsparse format"):
        jsparse.validate(jnp.eye(2))
