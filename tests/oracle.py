"""The shared dense-oracle harness.

Every format is described by a :class:`Factory` that builds a random matrix of that
format; ``tests/test_oracle.py`` runs every op over every factory — eager, under
``jit``, under ``vmap`` (over the dense operand and over the values) and under
``grad`` — and compares with the same computation on ``a.todense()``. A new format
gets the whole suite by listing ``oracle_examples`` (tests/factories.py discovers them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jsparse

# Per-dtype tolerances for one output element of a K-term dot product; scaled by
# sqrt(K) in `tolerance`. bfloat16 carries 8 bits of mantissa and its outputs are
# rounded once more.
TOLERANCES = {
    jnp.dtype(jnp.float64): dict(rtol=1e-12, atol=1e-12),
    jnp.dtype(jnp.float32): dict(rtol=2e-6, atol=2e-6),
    jnp.dtype(jnp.bfloat16): dict(rtol=1e-2, atol=1e-2),
    jnp.dtype(jnp.float16): dict(rtol=2e-3, atol=2e-3),
}


def tolerance(dtype, k: int = 1) -> dict:
    tol = TOLERANCES[jnp.dtype(dtype)]
    scale = max(1.0, float(np.sqrt(k)))
    return dict(rtol=tol["rtol"] * scale, atol=tol["atol"] * scale)


def assert_close(actual, expected, dtype, k: int = 1, err_msg: str = "") -> None:
    np.testing.assert_allclose(
        np.asarray(jnp.asarray(actual, jnp.float32 if dtype != jnp.float64 else dtype)),
        np.asarray(jnp.asarray(expected, jnp.float32 if dtype != jnp.float64 else dtype)),
        err_msg=err_msg,
        **tolerance(dtype, k),
    )


# How to build a random matrix of one format (name, make(key, shape, dtype), shapes).
Factory = jsparse.extend.OracleExample


def value_axes(a: jsparse.AbstractSparseMatrix, axis=0):
    """An ``in_axes`` prefix tree: ``axis`` for the value leaves, None for indices."""
    return a._replace(**{f: (axis if f in a._value_fields else None) for f in a._leaf_fields})


def stack_values(mats: list[jsparse.AbstractSparseMatrix]):
    """Stack the value leaves of matrices that share one pattern (indices of the first)."""
    first = mats[0]
    return first._replace(
        **{f: jnp.stack([getattr(m, f) for m in mats]) for f in first._value_fields}
    )


def scaled(a: jsparse.AbstractSparseMatrix, s: float):
    """Every value leaf times ``s`` (the same pattern, other values)."""
    return a._replace(**{f: getattr(a, f) * s for f in a._value_fields})


def gather_dense_grad(a, dense_fn):
    """The gradient of ``dense_fn(a.todense())`` with respect to ``a``'s leaves:
    the dense gradient pulled back to ``a``'s values through ``todense``."""
    return jax.grad(lambda a: dense_fn(a.todense()), allow_int=True)(a)


def value_leaves(a) -> dict[str, jax.Array]:
    return {f: getattr(a, f) for f in a._value_fields}


def np_init(key, shape, dtype=jnp.float32):
    """A lecun-normal-like initializer drawn with NumPy (jax.random would compile a
    sampler per shape; the tests only need fixed, well-scaled kernels)."""
    seed = int(np.prod(shape)) + len(shape)
    w = np.random.default_rng(seed).standard_normal(shape) / np.sqrt(shape[0])
    return jnp.asarray(w, dtype)
