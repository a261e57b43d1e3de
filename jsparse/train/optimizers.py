"""optax on whole formats: an optimizer that updates the stored values and passes the
index arrays through.

``jax.grad(loss, allow_int=True)(a)`` of a format ``a`` has a ``float0`` gradient for
every index leaf (JAX's cotangent of an integer array), on which optax's arithmetic
fails (``UFuncTypeError ... float0``), and ``optax.apply_updates`` cannot add a
``float0`` to an ``int32``. :func:`values_only` wraps any optax transformation so that
it sees only the floating leaves (through :func:`optax.masked`) and returns zero
updates of an integer dtype for the others, which ``optax.apply_updates`` leaves
unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["is_value_leaf", "values_only"]


def is_value_leaf(leaf) -> bool:
    """Whether ``leaf`` is a trainable value: an array of a floating (or complex)
    dtype. Index arrays (integers) and their ``float0`` gradients are not.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> [jsparse.train.is_value_leaf(leaf) for leaf in jax.tree.leaves(a)][:3]
      [True, False, False]
    """
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or dtype == jax.dtypes.float0:
        return False
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def _zero_update(leaf):
    # int32 zeros: optax.apply_updates computes (p + 0).astype(p.dtype) == p.
    return np.zeros(np.shape(leaf), np.int32)


def values_only(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """``tx`` applied to the floating leaves of the parameters; the other leaves (the
    index arrays of jsparse formats, integer counters) get zero updates, so that
    ``optax.apply_updates`` keeps them unchanged.

    Use it to hand whole formats (or pytrees holding them) to optax, with gradients
    from ``jax.grad(..., allow_int=True)``. ``tx`` sees exactly the value leaves (its
    state, global norms and weight decay cover nothing else), as if it were run on
    them alone. Extra arguments (``value=`` for ``optax.contrib.reduce_on_plateau``
    ...) are passed on.

    Args:
      tx: any optax gradient transformation (``optax.adam(1e-3)``, a chain ...).

    Returns:
      The wrapped transformation.

    Raises:
      TypeError: ``tx`` is not an optax gradient transformation.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jsparse
      >>> w = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> loss = lambda w: jnp.sum((w @ jnp.ones(4)) ** 2)
      >>> tx = jsparse.train.values_only(optax.adam(1e-1))
      >>> state = tx.init(w)
      >>> g = jax.grad(loss, allow_int=True)(w)  # float0 for the index leaves
      >>> updates, state = tx.update(g, state, w)
      >>> w2 = optax.apply_updates(w, updates)
      >>> bool((w2.indices == w.indices).all()), round(float(w2.data[0, 0, 0]), 4)
      (True, 0.9)
    """
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise TypeError(
            f"values_only expects an optax GradientTransformation, got {type(tx).__name__}"
        )
    inner = optax.masked(tx, lambda tree: jax.tree.map(is_value_leaf, tree))

    def init(params):
        return inner.init(params)

    def update(updates, state, params=None, **extra_args):
        new, state = inner.update(updates, state, params, **extra_args)
        new = jax.tree.map(lambda u: u if is_value_leaf(u) else _zero_update(u), new)
        return new, state

    return optax.GradientTransformationExtraArgs(init, update)
