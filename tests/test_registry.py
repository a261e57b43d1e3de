"""The registry's platform rules: an explicit ``impl`` that one platform refuses raises
the reason (a ValueError naming the platform and the limit) when lowered for that
platform, and runs on the others."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsparse


@jsparse.extend.register_format
class OnlyHere(jsparse.BCSR):
    """A BCSR subclass with a "scale" implementation that CUDA's check refuses."""


def _scale(a, s):
    return a.with_values(a.data * s)


jsparse.extend.register_impl("scale", OnlyHere, "limited", _scale)
jsparse.extend.register_impl(
    "scale",
    OnlyHere,
    "limited",
    _scale,
    platform="cuda",
    supports=lambda a, s: "the block needs 300 KB of shared memory, the target has 227 KB",
)


def _a():
    return OnlyHere(jnp.ones((1, 2, 2)), [0], [0, 1], shape=(2, 2))


def test_an_explicit_impl_refused_on_one_platform_runs_on_the_others():
    out = jax.jit(lambda a: jsparse.scale(a, 3.0, impl="limited"))(_a())
    np.testing.assert_array_equal(out.todense(), np.full((2, 2), 3.0, np.float32))


def test_lowering_for_the_refusing_platform_names_it_and_the_limit():
    traced = jax.jit(lambda a: jsparse.scale(a, 3.0, impl="limited")).trace(_a())
    message = r"impl=.limited. cannot run scale for OnlyHere on cuda: .*the block needs 300 KB"
    with pytest.raises(ValueError, match=message):
        traced.lower(lowering_platforms=("cuda",))
    traced.lower(lowering_platforms=("cpu",))  # the others still lower
    traced.lower(lowering_platforms=("tpu",))


def test_auto_skips_the_refusing_platform_silently():
    jax.jit(lambda a: jsparse.scale(a, 3.0)).trace(_a()).lower(lowering_platforms=("cuda",))


def test_grad_jvp_and_vmap_pass_through_the_refusing_branch():
    # platform_dependent differentiates and batches every branch, also the refusal.
    def f(s):
        return jnp.sum(jsparse.scale(_a(), s, impl="limited").data)

    np.testing.assert_allclose(jax.grad(f)(2.0), 4.0)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(2.0), 4.0)
    _, tangent = jax.jvp(f, (2.0,), (1.0,))
    np.testing.assert_allclose(tangent, 4.0)
    np.testing.assert_allclose(jax.vmap(f)(jnp.arange(3.0)), [0.0, 4.0, 8.0])
    traced = jax.jit(jax.grad(f)).trace(2.0)
    with pytest.raises(ValueError, match="cannot run scale for OnlyHere on cuda"):
        traced.lower(lowering_platforms=("cuda",))


def test_a_multi_platform_export_keeps_the_refusal_out_of_the_other_platforms():
    exported = jax.export.export(
        jax.jit(lambda a: jsparse.scale(a, 3.0, impl="limited")), platforms=("cpu", "tpu")
    )(_a())
    assert exported.platforms == ("cpu", "tpu")
    with pytest.raises(ValueError, match="on cuda"):
        jax.export.export(
            jax.jit(lambda a: jsparse.scale(a, 3.0, impl="limited")), platforms=("cpu", "cuda")
        )(_a())
