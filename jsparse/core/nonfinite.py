"""Non-finite dense operands: every product counts the *stored* entries only.

jsparse's semantics (docs/bcsr.md, "NaN and infinity"): ``op(A) @ x`` is the sum,
over the entries ``A`` stores, of ``A[i, j] * x[j]``. An unstored entry contributes
nothing, even when ``x[j]`` is NaN or infinite; a stored entry contributes its
IEEE product (a stored zero times ``inf`` is NaN). The sparse kernels follow it by
construction. Implementations that multiply a dense form of ``A`` (the inherited
``"dense"`` matmul, N:M's decompress-and-``dot``) would also multiply the unstored
zeros; :func:`stored_only` corrects them, at the cost of one ``isfinite`` pass over
``x`` when ``x`` is finite.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["nonfinite_part", "stored_mask", "stored_only"]


def stored_mask(a) -> jax.Array:
    """The boolean ``(M, K)`` mask of the entries ``a`` stores structurally: where
    ``a`` with every stored value set to one has a nonzero dense entry (for factored
    formats, the entries some product of stored factors reaches).

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> from jsparse.core.nonfinite import stored_mask
      >>> a = jsparse.BCSR.fromdense(jnp.diag(jnp.array([1.0, 0.0])), block_shape=(1, 1))
      >>> stored_mask(a).tolist()
      [[True, False], [False, False]]
    """
    ones = [jnp.ones(getattr(a, f).shape, getattr(a, f).dtype) for f in a._value_fields]
    return a.with_values(*ones).todense() != 0


def nonfinite_part(w: jax.Array, mask: jax.Array, x: jax.Array) -> jax.Array:
    """What the non-finite entries of ``x`` add to ``w @ x`` through the entries
    ``mask`` keeps: NaN, ``+inf``, ``-inf`` or 0 per output (float32).

    A kept ``w[i, j]`` meeting a NaN gives NaN; meeting ``±inf`` it gives NaN (a zero
    ``w[i, j]``) or an infinity of the product's sign; infinities of both signs in
    one output give NaN.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.core.nonfinite import nonfinite_part
      >>> w = jnp.array([[1.0, 0.0], [-2.0, 0.0]])
      >>> x = jnp.array([[jnp.inf], [jnp.nan]])
      >>> nonfinite_part(w, w != 0, x)[:, 0].tolist()
      [inf, -inf]
    """
    f32 = jnp.float32

    def count(left, right):
        return jnp.matmul(left.astype(f32), right.astype(f32), precision="highest")

    pinf, ninf = x == jnp.inf, x == -jnp.inf
    pos, neg, zero = mask & (w > 0), mask & (w < 0), mask & (w == 0)
    nan = (count(mask, jnp.isnan(x)) + count(zero, pinf | ninf)) > 0
    up = (count(pos, pinf) + count(neg, ninf)) > 0
    down = (count(pos, ninf) + count(neg, pinf)) > 0
    nan = nan | (up & down)
    return jnp.where(nan, jnp.nan, jnp.where(up, jnp.inf, jnp.where(down, -jnp.inf, 0.0)))


def stored_only(
    product: Callable[[jax.Array], jax.Array],
    dense: Callable[[], tuple[jax.Array, jax.Array]],
    x: jax.Array,
) -> jax.Array:
    """``product(x)`` with the stored-entries semantics, for a ``product`` that
    multiplies a dense form of the matrix (unstored zeros included).

    When ``x`` is finite this is ``product(x)``; otherwise ``product`` runs on ``x``
    with its non-finite entries zeroed and :func:`nonfinite_part` adds what they give
    through the stored entries (a ``lax.cond``: the dense form is built only then).

    Args:
      product: ``x -> op(A) @ x`` for a 2-D ``x``.
      dense: ``() -> (w, mask)``: ``op(A)`` densified and its :func:`stored_mask`.
      x: the 2-D dense operand.

    Returns:
      ``product(x)`` where it is finite, and the stored-entries result elsewhere.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.core.nonfinite import stored_only
      >>> w = jnp.array([[1.0, 0.0], [0.0, 1.0]])  # the zeros are not stored
      >>> x = jnp.array([[1.0], [jnp.nan]])
      >>> (w @ x)[:, 0].tolist()
      [nan, nan]
      >>> stored_only(lambda x: w @ x, lambda: (w, w != 0), x)[:, 0].tolist()
      [1.0, nan]
    """

    def nonfinite(x):
        finite = jnp.isfinite(x)
        y = product(jnp.where(finite, x, jnp.zeros((), x.dtype)))
        w, mask = dense()
        return (y.astype(jnp.float32) + nonfinite_part(w, mask, x)).astype(y.dtype)

    return lax.cond(jnp.all(jnp.isfinite(x)), product, nonfinite, x)
