"""What users also expect (issue 16): A * dense, A * A', A + A' under jit, A.sum,
abs / ** / map_values, A[i] and BCSR.block_rows, BCSR.eye, to_scipy for NM and
Monarch, clear errors from jax.numpy functions; each against the dense oracle, with
jit, vmap and grad."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse
from jsparse.core.nonfinite import stored_mask

KEY = jax.random.key(0)
ENTRYWISE = {
    "bcsr": lambda: jsparse.BCSR.random(KEY, (8, 12), density=0.5, block_shape=(2, 2)),
    "nm_axis1": lambda: jsparse.NM.random(KEY, (8, 12), n=2, m=4),
    "nm_axis0": lambda: jsparse.NM.random(KEY, (8, 12), n=1, m=4, axis=0),
}
ALL = {
    **ENTRYWISE,
    "monarch": lambda: jsparse.Monarch.init(KEY, (8, 12), nblocks=2),
    "lowrank": lambda: jsparse.LowRankSparse.random(
        KEY, (8, 12), rank=2, density=0.3, block_shape=(2, 2)
    ),
}
D = jax.random.normal(jax.random.key(1), (8, 12))


def grad_dense(a, g):
    """The dense matrix of a format's gradient (its values on ``a``'s pattern)."""
    return a.with_values(*(getattr(g, f) for f in a._value_fields)).todense()


def close(x, y):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ENTRYWISE))
def test_times_dense(name):
    a = ENTRYWISE[name]()
    expected = a.todense() * D * stored_mask(a)
    close((a * D).todense(), expected)
    close((D * a).todense(), expected)
    close(jax.jit(lambda a, d: (a * d).todense())(a, D), expected)
    assert type(a * D) is type(a)
    # vmap over a stack of dense operands
    ds = jnp.stack([D, 2 * D])
    close(jax.vmap(lambda d: (a * d).todense())(ds), jnp.stack([expected, 2 * expected]))
    # grad with respect to the dense operand and the values
    gd = jax.grad(lambda d: jnp.sum((a * d).todense() ** 2))(D)
    close(gd, 2 * a.todense() ** 2 * D)
    dense_nan = D.at[0].set(jnp.nan)  # unstored NaN entries do not leak in
    masked = stored_mask(a)
    assert bool(jnp.all(jnp.isnan((a * dense_nan).todense()) == (masked & jnp.isnan(dense_nan))))


@pytest.mark.parametrize("name", sorted(ENTRYWISE))
def test_times_and_plus_same_pattern(name):
    a = ENTRYWISE[name]()
    b = a * 3.0
    close((a * b).todense(), a.todense() * b.todense())
    close((a + b).todense(), a.todense() + b.todense())
    # under jit with two separate arguments holding the same pattern arrays
    close(jax.jit(lambda a, b: (a + b).todense())(a, b), a.todense() + b.todense())
    close(jax.jit(lambda a, b: (a * b).todense())(a, b), a.todense() * b.todense())
    close(jax.jit(lambda a: (a + a).todense())(a), 2 * a.todense())
    g = jax.grad(lambda a: jnp.sum((a * a).todense()), allow_int=True)(a)
    close(grad_dense(a, g), 2 * a.todense())
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), a)
    out = jax.vmap(lambda s: (s + s).todense())(stacked)
    close(out[1], 2 * a.todense())


def test_different_patterns():
    a = jsparse.BCSR.random(KEY, (8, 8), density=0.5, block_shape=(2, 2))
    b = jsparse.BCSR.random(jax.random.key(5), (8, 8), density=0.5, block_shape=(2, 2))
    with pytest.raises(ValueError, match="same pattern"):
        a + b
    with pytest.raises(ValueError, match="same pattern"):
        a * b
    # under jit they are compared when the program runs: a mismatch gives NaN
    assert bool(jnp.all(jnp.isnan(jax.jit(lambda a, b: (a + b).data)(a, b))))


def test_times_errors():
    a = ENTRYWISE["bcsr"]()
    with pytest.raises(ValueError, match="matrix's shape"):
        a * jnp.ones((8, 1))
    with pytest.raises(TypeError, match="same format"):
        a * jsparse.NM.random(KEY, (8, 12))
    with pytest.raises(TypeError, match="no elementwise product"):
        ALL["monarch"]() * D
    with pytest.raises(TypeError, match="must be real"):
        a * jnp.ones((8, 12), jnp.complex64)


@pytest.mark.parametrize("name", sorted(ALL))
def test_sum(name):
    a = ALL[name]()
    dense = a.todense()
    close(a.sum(), dense.sum())
    close(a.sum(axis=0), dense.sum(0))
    close(a.sum(axis=1), dense.sum(1))
    close(a.sum(axis=-1), dense.sum(1))
    close(jax.jit(lambda a: a.sum(0))(a), dense.sum(0))
    # the same pattern with doubled values (doubling the leaves would corrupt indices)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), a, jsparse.scale(a, 2.0))
    out = jax.vmap(lambda s: s.sum(1))(stacked)
    close(out[0], dense.sum(1))
    close(out[1], 2 * dense.sum(1))
    with pytest.raises(ValueError, match="axis"):
        a.sum(axis=2)


def test_sum_grad():
    a = ENTRYWISE["bcsr"]()
    g = jax.grad(lambda v: a.with_values(v).sum())(a.data)
    close(g, jnp.ones_like(a.data))


@pytest.mark.parametrize("name", sorted(ENTRYWISE))
def test_abs_pow_map_values(name):
    a = ENTRYWISE[name]()
    close(abs(a).todense(), jnp.abs(a.todense()))
    close((a**2).todense(), a.todense() ** 2)
    close((abs(a) ** 0.5).todense(), jnp.sqrt(jnp.abs(a.todense())))
    close(jsparse.map_values(jnp.tanh, a).todense(), jnp.tanh(a.todense()))
    close(jax.jit(lambda a: abs(a).todense())(a), jnp.abs(a.todense()))
    g = jax.grad(lambda a: jnp.sum((a**2).todense()), allow_int=True)(a)
    close(grad_dense(a, g), 2 * a.todense())
    with pytest.raises(ValueError, match="p > 0"):
        a**0
    with pytest.raises(ValueError, match="zero-preserving"):
        jsparse.map_values(jnp.cos, a)


@pytest.mark.parametrize("name", sorted(ALL))
def test_row_indexing(name):
    a = ALL[name]()
    dense = a.todense()
    close(a[3], dense[3])
    close(a[-1], dense[-1])
    close(jax.jit(lambda a, i: a[i])(a, 5), dense[5])
    close(jax.vmap(lambda i: a[i])(jnp.arange(8)), dense)
    assert len(list(a)) == 8
    with pytest.raises(IndexError):
        a[8]
    with pytest.raises(TypeError, match="one integer row"):
        a[1:3]
    with pytest.raises(TypeError, match="one integer row"):
        a[1, 2]


def test_row_indexing_grad():
    a = ENTRYWISE["bcsr"]()
    g = jax.grad(lambda v: jnp.sum(a.with_values(v)[2]))(a.data)
    expected = jax.grad(lambda v: jnp.sum(a.with_values(v).todense()[2]))(a.data)
    close(g, expected)


def test_block_rows():
    a = jsparse.BCSR.random(KEY, (12, 8), density=0.5, block_shape=(2, 4))
    for start, stop in [(0, 6), (1, 3), (2, 2), (5, 6)]:
        b = a.block_rows(start, stop)
        close(b.todense(), a.todense()[2 * start : 2 * stop])
        b.validate()
    g = jax.grad(lambda v: jnp.sum(a.with_values(v).block_rows(1, 3).todense()))(a.data)
    close(g, jax.grad(lambda v: jnp.sum(a.with_values(v).todense()[2:6]))(a.data))
    with pytest.raises(ValueError, match="start <= stop"):
        a.block_rows(3, 1)
    with pytest.raises(ValueError, match="start <= stop"):
        a.block_rows(0, 7)


def test_eye():
    for n, b in [(6, 1), (6, 3), (8, 8), (0, 2)]:
        e = jsparse.BCSR.eye(n, block_size=b)
        close(e.todense(), jnp.eye(n))
        assert e.block_shape == (b, b)
    x = jax.random.normal(KEY, (6, 2))
    close(jax.jit(lambda x: jsparse.BCSR.eye(6, block_size=2) @ x)(x), x)
    assert jsparse.BCSR.eye(4, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="does not divide"):
        jsparse.BCSR.eye(6, block_size=4)
    with pytest.raises(TypeError, match="complex"):
        jsparse.BCSR.eye(4, dtype=jnp.complex64)


@pytest.mark.parametrize("name", ["nm_axis1", "nm_axis0", "monarch"])
def test_to_scipy(name):
    a = ALL[name]()
    for fmt in ("csr", "bsr"):
        s = a.to_scipy(fmt)
        assert s.format == fmt
        close(s.toarray(), a.todense())
    if name.startswith("nm"):
        assert a.to_scipy().nnz == a.nstored  # stored zeros are kept
    with pytest.raises(ValueError, match="format"):
        a.to_scipy("coo")


@pytest.mark.parametrize("name", sorted(ALL))
def test_jnp_functions_point_to_jsparse_matmul(name):
    a = ALL[name]()
    x = jnp.ones(12)
    for fn in (
        lambda: jnp.matmul(a, x),
        lambda: jnp.dot(a, x),
        lambda: jnp.einsum("ij,j->i", a, x),
        lambda: jnp.asarray(a),
    ):
        with pytest.raises(TypeError, match=r"jsparse\.matmul|todense"):
            fn()
