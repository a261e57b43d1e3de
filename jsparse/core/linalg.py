"""Linear-algebra helpers the formats share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["relative_error", "thin_svd"]


def thin_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``(u, s, vt)`` of a (batch of) matrices (LAPACK's default driver on CPU).

    One place to swap the SVD (e.g. a randomized one for large blocks). Note: on a
    heavily loaded CPU, OpenBLAS threading can slow LAPACK SVDs by 10x or more;
    ``OPENBLAS_NUM_THREADS=1`` avoids it.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.core.linalg import thin_svd
      >>> u, s, vt = thin_svd(jnp.ones((4, 2)))
      >>> u.shape, s.shape, vt.shape
      ((4, 2), (2,), (2, 2))
    """
    return jnp.linalg.svd(x, full_matrices=False)


def relative_error(x: jax.Array, approx: jax.Array) -> jax.Array:
    """``||x - approx||_F / ||x||_F`` in (at least) float32; the absolute error when
    ``x`` is zero.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.core.linalg import relative_error
      >>> float(relative_error(jnp.ones(4), jnp.zeros(4)))
      1.0
    """
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    err = jnp.linalg.norm(x32 - approx.astype(x32.dtype))
    norm = jnp.linalg.norm(x32)
    return jnp.where(norm > 0, err / jnp.where(norm > 0, norm, 1), err)
