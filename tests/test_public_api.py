"""Every public name is importable and documented."""

import jsparse


def test_every_public_name_imports():
    assert jsparse.__all__ == sorted(set(jsparse.__all__), key=jsparse.__all__.index)
    for name in jsparse.__all__:
        obj = getattr(jsparse, name)
        assert obj is not None, name
        assert getattr(obj, "__doc__", None), f"jsparse.{name} has no docstring"


def test_star_import():
    namespace = {}
    exec("from jsparse import *", namespace)
    missing = set(jsparse.__all__) - set(namespace)
    assert not missing


def test_registry_rejects_unregistered_and_unknown_implementations():
    import jax
    import jax.numpy as jnp
    import pytest

    a = jsparse.LowRankSparse.random(
        jax.random.key(0), (8, 8), rank=1, density=0.25, block_shape=(2, 2)
    )
    with pytest.raises(ValueError, match="has no 'cusparse' implementation of matmul"):
        jsparse.matmul(a, jnp.ones((8,)), impl="cusparse")
    with pytest.raises(ValueError, match="impl must be one of"):
        jsparse.matmul(a, jnp.ones((8,)), impl="cuda")
