"""Checkpoints of sparse models with orbax: only the stored values and the index arrays.

A jsparse layer keeps its kernel as variables (``kernel_data``, ``kernel_indices`` …
for BCSR), so ``nnx.state(model)`` already holds exactly what is stored, and orbax
writes it as it writes any pytree of arrays: a 90% block-sparse layer takes about a
tenth of the dense layer's bytes on disk. This module adds what orbax cannot know:

* :func:`restore` into a model built *abstractly* (``nnx.eval_shape``) or on another
  mesh, where a layer whose pattern changed size between saves (gradual magnitude
  pruning drops stored blocks) takes the saved size: the target's leaf shapes are
  only a guide, its dtypes and shardings are kept, and anything else that differs is
  an error naming the variable;
* :func:`nbytes_on_disk` and :func:`dense_nbytes`, to report what sparsity saved.

Writes are orbax's: to a temporary folder renamed into place once complete, so a
writer killed half-way leaves the previous checkpoint readable (tested by killing a
writer process). Sharded arrays are written by every process for its own shards.

Example:

  >>> import tempfile, jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> import jsparse
  >>> layer = jsparse.nn.BCSRLinear(64, 64, sparsity=0.75, block_shape=(16, 16),
  ...                               rngs=nnx.Rngs(0))
  >>> path = tempfile.mkdtemp() + "/step_1"
  >>> jsparse.checkpoint.save(path, layer)
  >>> abstract = nnx.eval_shape(lambda: jsparse.nn.BCSRLinear(
  ...     64, 64, sparsity=0.75, block_shape=(16, 16), rngs=nnx.Rngs(1)))
  >>> restored = jsparse.checkpoint.restore(path, abstract)
  >>> x = jnp.ones((2, 64))
  >>> bool(jnp.array_equal(restored(x), layer(x)))
  True
  >>> jsparse.checkpoint.nbytes_on_disk(path) < jsparse.checkpoint.dense_nbytes(layer)
  True
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsparse.nn.format_linear import FormatLinear

__all__ = ["dense_nbytes", "nbytes_on_disk", "restore", "save"]


def _checkpointer():
    import orbax.checkpoint as ocp  # imported on use: orbax is heavy to import

    return ocp.StandardCheckpointer()


def _is_graph(target) -> bool:
    """A module, or a tuple / list of modules (``(model, optimizer)``)."""
    if isinstance(target, (tuple, list)):
        return bool(target) and all(isinstance(t, nnx.Module) for t in target)
    return isinstance(target, nnx.Module)


def _as_state(target):
    return nnx.state(target) if _is_graph(target) else target


def save(directory: str | os.PathLike, target: Any, *, force: bool = False) -> None:
    """Write ``target`` (an NNX module, a tuple of modules such as ``(model,
    optimizer)``, or any pytree of arrays) to ``directory`` and wait until it is
    committed.

    ``directory`` must not exist unless ``force=True`` (then it is replaced). Only the
    leaves are written: for a jsparse layer, its stored values and index arrays.

    Example:

      >>> import tempfile
      >>> from flax import nnx
      >>> import jsparse
      >>> layer = jsparse.nn.NMLinear(16, 8, rngs=nnx.Rngs(0))
      >>> jsparse.checkpoint.save(tempfile.mkdtemp() + "/ckpt", layer)
    """
    ckptr = _checkpointer()
    ckptr.save(os.path.abspath(directory), _as_state(target), force=force)
    ckptr.wait_until_finished()


def _leaf_path(path) -> str:
    names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(n) for n in names)


def _restore_spec(path, want, saved, mesh):
    """The abstract array to restore one leaf into: the saved shape, the target's
    dtype and sharding; a rank change or a non-floating dtype change is an error
    naming the leaf."""
    name = _leaf_path(path)
    if saved is None:
        raise ValueError(f"the checkpoint has no value for {name!r}")
    shape, dtype, saved_dtype = tuple(saved.shape), np.dtype(want.dtype), np.dtype(saved.dtype)
    both_float = jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(saved_dtype, jnp.floating)
    if len(shape) != len(want.shape) or (saved_dtype != dtype and not both_float):
        raise ValueError(
            f"{name!r}: the checkpoint holds {np.dtype(saved.dtype).name}{list(shape)}, "
            f"the target expects {dtype.name}{list(want.shape)}"
        )
    sharding = getattr(want, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(
        sharding.mesh, jax.sharding.AbstractMesh
    ):
        # nnx.eval_shape under jax.set_mesh gives shardings on the abstract mesh.
        if mesh is None or mesh.empty or mesh.abstract_mesh != sharding.mesh:
            raise ValueError(
                f"{name!r} is sharded over an abstract mesh {dict(sharding.mesh.shape)}: "
                "restore inside `with jax.set_mesh(mesh)` or pass mesh= (a concrete mesh "
                "of that shape)"
            )
        sharding = jax.sharding.NamedSharding(mesh, sharding.spec)
    if isinstance(sharding, jax.sharding.NamedSharding) and shape != tuple(want.shape):
        spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
        for size, axes in zip(shape, spec, strict=True):
            parts = int(np.prod([sharding.mesh.shape[a] for a in _axis_names(axes)]))
            if size % parts:
                raise ValueError(
                    f"{name!r}: the saved size {list(shape)} does not divide over the "
                    f"target's sharding {sharding.spec}"
                )
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _axis_names(axes) -> tuple:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, tuple) else (axes,)


def restore(directory: str | os.PathLike, target: Any, *, mesh=None) -> Any:
    """Read the checkpoint at ``directory`` into the structure of ``target``.

    ``target`` is an NNX module or a tuple of modules (concrete, or abstract from
    ``nnx.eval_shape``, e.g. built under another mesh so its variables carry the new
    shardings), or a pytree of arrays / ``jax.ShapeDtypeStruct``. Each array is
    restored with the target leaf's dtype and sharding (so restoring onto another
    mesh reshards) and with the *saved* shape: a layer whose number of stored blocks
    changed between saves comes back at its saved size. Floating values are cast to
    the target's dtype (float32 values restore into a bfloat16 model); a leaf missing
    from the checkpoint, saved with another rank, or an integer (index) leaf of
    another dtype raises ``ValueError`` naming it.

    A target built with ``nnx.eval_shape`` under ``jax.set_mesh(mesh)`` carries
    shardings on the *abstract* mesh; they are placed on ``mesh`` (default: the mesh
    set with ``jax.set_mesh`` around this call).

    Returns new modules for a module target (the target is left as it was), else the
    restored pytree.

    Example:

      >>> import tempfile, jax.numpy as jnp
      >>> from flax import nnx
      >>> import jsparse
      >>> a = jsparse.nn.MonarchLinear(32, 32, nblocks=4, rngs=nnx.Rngs(0))
      >>> path = tempfile.mkdtemp() + "/ckpt"
      >>> jsparse.checkpoint.save(path, a)
      >>> b = jsparse.checkpoint.restore(path, jsparse.nn.MonarchLinear(
      ...     32, 32, nblocks=4, rngs=nnx.Rngs(1)))
      >>> bool(jnp.array_equal(a(jnp.ones((1, 32))), b(jnp.ones((1, 32)))))
      True
    """
    directory = os.path.abspath(directory)
    mesh = jax.sharding.get_mesh() if mesh is None else mesh
    graphdef = None
    if _is_graph(target):
        graphdef, target = nnx.split(target)
    ckptr = _checkpointer()
    saved = ckptr.metadata(directory).item_metadata.tree
    # orbax stores an nnx State as nested dicts (a variable's array under "value"):
    # leaves are matched by their printed key paths.
    saved_leaves = {_leaf_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(target)
    abstract = [
        _restore_spec(path, leaf, saved_leaves.get(_leaf_path(path)), mesh)
        for path, leaf in with_paths
    ]
    restored = ckptr.restore(directory, jax.tree_util.tree_unflatten(treedef, abstract))
    return restored if graphdef is None else nnx.merge(graphdef, restored)


def nbytes_on_disk(directory: str | os.PathLike) -> int:
    """The bytes of every file under ``directory`` (a checkpoint).

    Example:

      >>> import tempfile
      >>> from flax import nnx
      >>> import jsparse
      >>> path = tempfile.mkdtemp() + "/ckpt"
      >>> jsparse.checkpoint.save(path, nnx.Linear(4, 4, rngs=nnx.Rngs(0)))
      >>> jsparse.checkpoint.nbytes_on_disk(path) > 0
      True
    """
    total = 0
    for root, _, files in os.walk(directory):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def dense_nbytes(model: nnx.Module) -> int:
    """The bytes of ``model``'s parameters if every jsparse layer's kernel were dense
    (``in_features * out_features`` values of its dtype); other parameters count as
    they are. The yardstick for :func:`nbytes_on_disk`.

    Example:

      >>> from flax import nnx
      >>> import jsparse
      >>> layer = jsparse.nn.BCSRLinear(64, 32, sparsity=0.9, block_shape=(8, 8),
      ...                               use_bias=False, rngs=nnx.Rngs(0))
      >>> jsparse.checkpoint.dense_nbytes(layer)   # 64 * 32 float32
      8192
    """
    total = 0
    sparse_vars = set()
    for _, module in nnx.iter_graph(model):
        if isinstance(module, FormatLinear):
            kernel = module.kernel
            total += int(np.prod(kernel.shape)) * np.dtype(kernel.dtype).itemsize
            sparse_vars.update(id(v) for v in module.kernel_variables.values())
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and id(var) not in sparse_vars:
            value = var.get_value()
            total += int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
    return total
