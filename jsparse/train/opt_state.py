"""Keep an optimizer state in step with values that moved.

When a sparse layer's pattern changes, its stored values are permuted (re-sorted into
the canonical order), some start afresh (regrown blocks), or some are dropped (a
pruning step that shrinks the layer). Every optimizer-state leaf that mirrors those
values (Adam's ``mu`` and ``nu``, momentum traces ...) must follow: a
:class:`ValueRemap` says, for each new slot, which old slot it comes from and whether
it restarts at zero.

Which leaves mirror a parameter is read from the tree paths: an optax state holds
copies of the parameter tree, so a mirroring leaf's path *ends with* the parameter's
path (``(0, "mu", "layers", 1, "kernel_data")`` ends with ``("layers", 1,
"kernel_data")``) and has the parameter's old shape. Leaves that match no parameter
(step counts, scalars) are left alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ValueRemap", "remap_opt_state", "remap_optimizer"]

Path = tuple[str, ...]


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["source", "reset"], meta_fields=["old_shape"]
)
@dataclasses.dataclass(frozen=True)
class ValueRemap:
    """How the stored values of one parameter moved.

    Args:
      source: ``(new_len,)`` int: new slot ``i`` takes old slot ``source[i]``.
      reset: ``(new_len,)`` bool or ``None``: slots that restart at zero.
      old_shape: the parameter's shape before the move (to recognise mirrors).

    Returns:
      A pytree (``source`` and ``reset`` are leaves), usable under ``jit``.

    Example:
      >>> import jax.numpy as jnp
      >>> remap = ValueRemap(source=jnp.array([2, 0]), reset=jnp.array([False, True]),
      ...                    old_shape=(3,))
      >>> remap.apply(jnp.array([1.0, 2.0, 3.0])).tolist()
      [3.0, 0.0]
    """

    source: jax.Array
    reset: jax.Array | None
    old_shape: tuple[int, ...]

    def apply(self, leaf: jax.Array) -> jax.Array:
        """``leaf`` (shaped like the old values) moved to the new slots.

        Args:
          leaf: an array of shape ``old_shape`` (or any leading length ``source`` indexes).

        Returns:
          ``leaf[source]``, zero where ``reset``.
        """
        out = leaf[self.source]
        if self.reset is not None:
            mask = self.reset.reshape(self.reset.shape + (1,) * (out.ndim - 1))
            out = jnp.where(mask, jnp.zeros((), out.dtype), out)
        return out


def _key_str(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _norm_path(path: Sequence[Any]) -> Path:
    return tuple(_key_str(k) if not isinstance(k, str | int) else str(k) for k in path)


def _match(leaf_path: Path, shape, remaps: Mapping[Path, ValueRemap]) -> ValueRemap | None:
    best, best_len = None, -1
    for path, remap in remaps.items():
        n = len(path)
        if n <= len(leaf_path) and leaf_path[len(leaf_path) - n :] == path and n > best_len:
            if tuple(shape) == tuple(remap.old_shape):
                best, best_len = remap, n
    return best


def remap_opt_state(opt_state, remaps: Mapping[Sequence[Any], ValueRemap]):
    """A new optimizer state (any optax state pytree) with the leaves that mirror a
    remapped parameter moved by :meth:`ValueRemap.apply`.

    Args:
      opt_state: an optax state (plain arrays, or nnx ``Variable`` leaves).
      remaps: parameter path (as in the model, e.g. ``("layers", 1, "kernel_data")``)
        -> how its values moved.

    Returns:
      The new state, the same tree; unmatched leaves are the same objects.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"w": jnp.array([1.0, 2.0, 3.0])}
      >>> state = optax.sgd(0.1, momentum=0.9).init(params)
      >>> remap = ValueRemap(source=jnp.array([2, 1]), reset=None, old_shape=(3,))
      >>> new = remap_opt_state(state, {("w",): remap})
      >>> new[0].trace["w"].shape
      (2,)
    """
    remaps = {_norm_path(p): r for p, r in remaps.items()}

    def move(path, leaf):
        value = leaf[...] if isinstance(leaf, nnx.Variable) else leaf
        if not hasattr(value, "shape"):
            return leaf
        remap = _match(_norm_path(path), value.shape, remaps)
        if remap is None:
            return leaf
        if isinstance(leaf, nnx.Variable):
            return leaf.replace(remap.apply(value))
        return remap.apply(value)

    return jax.tree_util.tree_map_with_path(
        move, opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def remap_optimizer(optimizer: nnx.Optimizer, remaps: Mapping[Sequence[Any], ValueRemap]) -> int:
    """Apply ``remaps`` in place to the state of an :class:`flax.nnx.Optimizer`.

    Works eagerly and inside ``nnx.jit``.

    Args:
      optimizer: the optimizer (its ``opt_state`` variables are updated in place).
      remaps: parameter path (as in the model) -> how its values moved.

    Returns:
      The number of state leaves moved (two per parameter for Adam).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
      >>> remap = ValueRemap(source=jnp.array([2, 1, 0]), reset=None, old_shape=(3,))
      >>> remap_optimizer(optimizer, {("bias",): remap})  # Adam's mu and nu
      2
    """
    remaps = {_norm_path(p): r for p, r in remaps.items()}
    moved = 0
    leaves = jax.tree_util.tree_leaves_with_path(
        optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for path, leaf in leaves:
        if not isinstance(leaf, nnx.Variable):
            continue
        value = leaf[...]
        if not hasattr(value, "shape"):
            continue
        remap = _match(_norm_path(path), value.shape, remaps)
        if remap is not None:
            leaf.set_value(remap.apply(value))
            moved += 1
    return moved
