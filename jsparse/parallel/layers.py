"""Tensor-parallel sparse NNX layers: a :class:`~jsparse.parallel.Split` kernel as a layer.

:class:`ParallelLinear` is ``y = x @ W + b`` like :class:`flax.nnx.Linear`, with the
kernel ``W`` (``(in_features, out_features)``) stored in a jsparse format and split over
the devices of one mesh axis, Megatron style:

* ``parallel="column"``: the output features are split (``W`` split by columns); each
  device computes its own output features, no collective; the output comes out
  sharded on its feature axis, and so does the bias.
* ``parallel="row"``: the input features are split (``W`` split by rows); each device
  multiplies its part of the input's features and the partial products are summed
  with one ``psum`` (``scatter=True``: one ``psum_scatter``, the output split on its
  feature axis); the bias is replicated and added after the reduction.

A column-parallel layer, an elementwise activation and a row-parallel layer thus need
one all-reduce in the forward pass (docs/scale.md, "Tensor-parallel layers").

The layer holds the Split's leaves as variables (``kernel_<leaf>``): the stored values
are :class:`flax.nnx.Param`, the index arrays and the padding mask
:class:`~jsparse.nn.SparsityPattern`. Every one is stacked along a leading axis of size
``parts`` and carries the sharding ``(axis, None, ...)``: created under ``nnx.jit``
inside ``jax.set_mesh(mesh)``, the layer is born sharded, each device holding only its
shard of the values and of the index arrays, and ``nnx.Optimizer(model, tx,
wrt=nnx.Param)`` shards its state the same way.

Each shard is initialised as the format's own layer (:data:`jsparse.nn.FORMATS`) of the
local shape would be, from its slice of one dense kernel drawn by ``kernel_init`` at the
global shape (so variance-scaling initialisers see the global fan-in). BCSR shards
store equally many blocks, so a fresh layer has no padding; a layer built from an
existing matrix (:meth:`ParallelLinear.from_kernel`) may have some.

The call runs :func:`jsparse.parallel.matmul` inside ``jax.shard_map`` over the layer's
axis only (the other mesh axes stay automatic: a batch sharded over ``"data"`` is not
gathered). Outside a mesh with that axis the layer computes the same shard-wise sums on
one device (the one-device reference of the same model).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn.linear import default_bias_init, default_kernel_init
from jax.sharding import PartitionSpec as P

from jsparse.core.matrix import AbstractSparseMatrix
from jsparse.core.verbs import matmul as sparse_matmul
from jsparse.formats import BCSR, NM
from jsparse.nn import FORMATS, SparsityPattern
from jsparse.parallel.products import matmul as split_matmul
from jsparse.parallel.split import Split, mask_padding, split
from jsparse.train import grow_and_drop as bcsr_grow_and_drop
from jsparse.train import remap_optimizer

__all__ = ["ParallelLinear", "ShardRemap"]

# format name -> the format class a ParallelLinear of that name holds.
_SUPPORTED = MappingProxyType({"bcsr": BCSR, "nm": NM})
# parallel -> the split of W (in_features, out_features).
_ALONG = MappingProxyType({"column": "cols", "row": "rows"})


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["source", "reset"], meta_fields=["old_shape"]
)
@dataclasses.dataclass(frozen=True)
class ShardRemap:
    """How the stored values of a stacked (per-shard) parameter moved: shard ``d``'s
    new slot ``i`` takes its old slot ``source[d, i]``, zero where ``reset[d, i]``.

    The shard-wise counterpart of :class:`jsparse.train.ValueRemap`, usable with
    :func:`jsparse.train.remap_optimizer` / :func:`jsparse.train.remap_opt_state`
    (which call :meth:`apply` on every optimizer-state leaf mirroring the parameter).

    Args:
      source: ``(parts, nse)`` int.
      reset: ``(parts, nse)`` bool.
      old_shape: the parameter's shape ``(parts, nse, ...)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.parallel import ShardRemap
      >>> r = ShardRemap(jnp.array([[1, 0], [0, 1]]), jnp.array([[False, True], [False, False]]),
      ...                old_shape=(2, 2))
      >>> r.apply(jnp.array([[1.0, 2.0], [3.0, 4.0]])).tolist()
      [[2.0, 0.0], [3.0, 4.0]]
    """

    source: jax.Array
    reset: jax.Array
    old_shape: tuple[int, ...]

    def apply(self, leaf: jax.Array) -> jax.Array:
        """``leaf`` (shaped like the old values) moved shard by shard.

        Example:
          >>> import jax.numpy as jnp
          >>> from jsparse.parallel import ShardRemap
          >>> r = ShardRemap(jnp.array([[0]]), jnp.array([[True]]), old_shape=(1, 1, 2))
          >>> r.apply(jnp.ones((1, 1, 2))).tolist()
          [[[0.0, 0.0]]]
        """

        def one(leaf, source, reset):
            out = leaf[source]
            mask = reset.reshape(reset.shape + (1,) * (out.ndim - 1))
            return jnp.where(mask, jnp.zeros((), out.dtype), out)

        return jax.vmap(one)(leaf, self.source, self.reset)


def _raw(value):
    """An initializer's array (``nnx.with_metadata`` wraps it in a VariableMetadata)."""
    return value.raw_value if isinstance(value, nnx.VariableMetadata) else value


def _check_features(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"ParallelLinear: {what} must be a positive int, got {value!r}")
    return int(value)


def _check_mirrors(optimizer: nnx.Optimizer, path: tuple, shape: tuple) -> None:
    """ValueError if ``optimizer`` holds state shaped like the values at ``path`` but
    none of it sits at ``path`` (a wrong ``path``: the state would not follow)."""

    def name(k):
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)

    want = tuple(str(p) for p in path)
    shaped = found = False
    leaves = jax.tree_util.tree_leaves_with_path(
        optimizer.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    for leaf_path, leaf in leaves:
        value = leaf[...] if isinstance(leaf, nnx.Variable) else leaf
        if tuple(getattr(value, "shape", ())) != shape:
            continue
        shaped = True
        names = tuple(name(k) for k in leaf_path)
        found = found or names[len(names) - len(want) :] == want
    if shaped and not found:
        raise ValueError(
            f"ParallelLinear.grow_and_drop: no optimizer state leaf mirrors {want}: pass "
            "this layer's path in the optimizer's model as path="
        )


def _mesh_axis_size(axis: str) -> int | None:
    """The size of ``axis`` in the current (abstract) mesh, ``None`` without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names:
        return None
    return int(dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))[axis])


class ParallelLinear(nnx.Module):
    """``y = x @ W + b`` with ``W`` in a jsparse format split over mesh axis ``axis``
    (module docstring: column- or row-parallel, the variables and their sharding).

    Args:
      in_features, out_features: the global kernel is ``(in_features, out_features)``.
      format: ``"bcsr"`` or ``"nm"`` (names of :data:`jsparse.nn.FORMATS` whose split
        keeps every shard an ordinary matrix of the format).
      parallel: ``"column"`` (outputs split) or ``"row"`` (inputs split).
      axis: the mesh axis name (default ``"model"``).
      parts: the number of shards; default: the size of ``axis`` in the current mesh
        (``jax.set_mesh``), or 1 without one.
      use_bias, dtype, param_dtype, kernel_init, bias_init, rngs: as in
        :class:`flax.nnx.Linear` (``kernel_init`` draws the dense global kernel, which
        each shard prunes into the format; ``dtype`` is the compute dtype, default the
        promotion of the input's and the values').
      scatter: a row-parallel layer sums with ``psum_scatter``: the output comes out
        split on its feature axis (the bias is then split alike).
      impl: the local product's implementation (:func:`jsparse.matmul`).
      **format_params: the format layer's parameters: ``sparsity``, ``block_shape``,
        ``pattern`` for BCSR (per shard: each shard keeps ``1 - sparsity`` of its own
        blocks); ``n``, ``m`` for N:M (groups along the input axis).

    Raises:
      ValueError: unknown ``parallel``, a format that does not split this way, features
        not divisible by ``parts`` (or the format's blocks/groups per shard), or
        ``parts`` unlike the size of ``axis`` in the current mesh.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jsparse.parallel import ParallelLinear
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> with jax.set_mesh(mesh):
      ...     layer = ParallelLinear(8, 4, format="nm", parallel="column", n=2, m=4,
      ...                            rngs=nnx.Rngs(0))
      ...     y = layer(jnp.ones((2, 3, 8)))
      >>> y.shape, layer.parts, layer.kernel_values.shape
      ((2, 3, 4), 1, (1, 4, 4))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        format: str = "bcsr",  # noqa: A002 (the name the brief asks for)
        parallel: str = "column",
        axis: str = "model",
        parts: int | None = None,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: nnx.Initializer = default_kernel_init,
        bias_init: nnx.Initializer = default_bias_init,
        scatter: bool = False,
        impl: str = "auto",
        rngs: nnx.Rngs | None = None,
        _kernel: tuple[Split, jax.Array | None] | None = None,
        **format_params: Any,
    ):
        in_features = _check_features(in_features, "in_features")
        out_features = _check_features(out_features, "out_features")
        self._configure(in_features, out_features, format, parallel, axis, parts, scatter)
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.impl = impl
        if _kernel is not None:  # from_kernel
            s, bias = _kernel
            self._install(split(s, self.parts, along=self.along))
            self.bias = nnx.data(None) if bias is None else nnx.Param(bias, **self._bias_metadata())
            return
        if rngs is None:
            raise TypeError("ParallelLinear needs rngs (e.g. nnx.Rngs(0))")

        key = rngs.params()
        # (An nnx.with_partitioning wrapper is unwrapped: the layer shards by its axis.)
        dense = jnp.asarray(_raw(kernel_init(key, (in_features, out_features), param_dtype)))
        shards = []
        for d in range(self.parts):
            piece = self._slice(dense, d)
            layer = FORMATS[self.format](
                *piece.shape,
                use_bias=False,
                param_dtype=param_dtype,
                kernel_init=lambda *_, piece=piece: piece,
                rngs=nnx.Rngs(jax.random.fold_in(key, d)),
                **format_params,
            )
            shards.append(layer.kernel)
        local = jax.tree.map(lambda *leaves: jnp.stack(leaves), *shards)
        padding = None
        if isinstance(local, BCSR):
            padding = jnp.zeros(local.data.shape[:2], bool)
        self._install(Split(local, padding, self.along, (in_features, out_features)))

        if self.use_bias:
            bias = jnp.asarray(_raw(bias_init(rngs.params(), (out_features,), param_dtype)))
            self.bias = nnx.Param(bias, **self._bias_metadata())
        else:
            self.bias = nnx.data(None)

    # ------------------------------------------------------------ construction
    def _configure(self, in_features, out_features, format, parallel, axis, parts, scatter):
        if parallel not in _ALONG:
            raise ValueError(f"parallel must be 'column' or 'row', got {parallel!r}")
        if format not in _SUPPORTED:
            known = ", ".join(map(repr, _SUPPORTED))
            raise ValueError(
                f"ParallelLinear supports the formats {known}, got format={format!r} "
                "(Monarch splits by blocks, not by rows or columns; LowRankSparse's "
                "replicated factor would train one copy per device)"
            )
        if not isinstance(axis, str) or not axis:
            raise ValueError(f"axis must be a mesh axis name, got {axis!r}")
        mesh_size = _mesh_axis_size(axis)
        if parts is None:
            parts = 1 if mesh_size is None else mesh_size
        parts = _check_features(parts, "parts")
        if mesh_size is not None and mesh_size != parts:
            raise ValueError(
                f"ParallelLinear: parts={parts} but mesh axis {axis!r} has {mesh_size} devices"
            )
        split_features = out_features if parallel == "column" else in_features
        if split_features % parts:
            what = "out_features" if parallel == "column" else "in_features"
            raise ValueError(
                f"ParallelLinear: a {parallel}-parallel layer splits {what}={split_features} "
                f"over {parts} parts: {parts} does not divide it"
            )
        if scatter and parallel != "row":
            raise ValueError("scatter=True needs parallel='row' (a column layer reduces nothing)")
        if scatter and out_features % parts:
            raise ValueError(
                f"scatter=True splits out_features={out_features} over {parts} parts: "
                "it must divide"
            )
        self.in_features, self.out_features = in_features, out_features
        self.format, self.parallel, self.axis = format, parallel, axis
        self.along, self.parts, self.scatter = _ALONG[parallel], parts, bool(scatter)

    def _slice(self, dense: jax.Array, d: int) -> jax.Array:
        if self.parallel == "column":
            n = self.out_features // self.parts
            return dense[:, d * n : (d + 1) * n]
        n = self.in_features // self.parts
        return dense[d * n : (d + 1) * n, :]

    def _bias_metadata(self) -> dict[str, Any]:
        split_bias = self.parallel == "column" or self.scatter
        return {"out_sharding": (self.axis if split_bias else None,), **self._eager()}

    def _eager(self) -> dict[str, Any]:
        # Sharded as created only inside a mesh with the axis (off-mesh: metadata only).
        return {"eager_sharding": _mesh_axis_size(self.axis) is not None}

    def _install(self, s: Split) -> None:
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(s)
        self._split_treedef = treedef
        names = []
        for path, leaf in with_paths:
            name = "kernel_" + str(path[-1].name)
            variable_type = (
                nnx.Param if jnp.issubdtype(leaf.dtype, jnp.inexact) else SparsityPattern
            )
            sharding = (self.axis,) + (None,) * (leaf.ndim - 1)
            setattr(self, name, variable_type(leaf, out_sharding=sharding, **self._eager()))
            names.append(name)
        self._split_leaf_names = tuple(names)

    @classmethod
    def from_kernel(
        cls,
        w: AbstractSparseMatrix,
        bias: jax.Array | None = None,
        *,
        parallel: str = "column",
        axis: str = "model",
        parts: int | None = None,
        scatter: bool = False,
        dtype: Any = None,
        impl: str = "auto",
    ) -> ParallelLinear:
        """A layer holding ``w`` (a BCSR or N:M of shape ``(in_features, out_features)``,
        N:M grouped along axis 0) split by :func:`jsparse.parallel.split` (BCSR shards
        may carry padding). Call it outside ``jit`` (the split reads the pattern).

        Example:
          >>> import jax.numpy as jnp, jsparse
          >>> from jsparse.parallel import ParallelLinear
          >>> w = jsparse.BCSR.fromdense(jnp.eye(8).at[0, 7].set(1.0), block_shape=(2, 2))
          >>> layer = ParallelLinear.from_kernel(w, parallel="row", parts=2)
          >>> layer(jnp.ones((1, 8))).tolist(), int(layer.kernel_padding[...].sum())
          ([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0]], 1)
        """
        names = {v: k for k, v in _SUPPORTED.items()}
        if type(w) not in names:
            raise ValueError(
                f"ParallelLinear.from_kernel takes a BCSR or NM, got {type(w).__name__}"
            )
        if isinstance(w, NM) and w.axis != 0:
            raise ValueError(
                "ParallelLinear.from_kernel: an NM kernel must be grouped along axis 0"
            )
        in_features, out_features = (int(n) for n in w.shape)
        if bias is not None:
            bias = jnp.asarray(bias, w.dtype)
            if bias.shape != (out_features,):
                raise ValueError(f"bias must have shape ({out_features},), got {bias.shape}")
        return cls(
            in_features,
            out_features,
            format=names[type(w)],
            parallel=parallel,
            axis=axis,
            parts=parts,
            use_bias=bias is not None,
            dtype=dtype,
            param_dtype=w.dtype,
            scatter=scatter,
            impl=impl,
            _kernel=(w, bias),
        )

    # ------------------------------------------------------------ the kernel
    @property
    def split(self) -> Split:
        """The kernel as a :class:`~jsparse.parallel.Split` (stacked shards).

        Example:
          >>> from flax import nnx
          >>> from jsparse.parallel import ParallelLinear
          >>> layer = ParallelLinear(8, 8, parts=2, parallel="row", sparsity=0.5,
          ...                        block_shape=(2, 2), rngs=nnx.Rngs(0))
          >>> layer.split
          Split(BCSR, parts=2, along='rows', shape=(8, 8))
        """
        leaves = [getattr(self, n)[...] for n in self._split_leaf_names]
        return jax.tree_util.tree_unflatten(self._split_treedef, leaves)

    def dense_kernel(self) -> jax.Array:
        """The dense global ``(in_features, out_features)`` kernel (padding ignored).

        Example:
          >>> from flax import nnx
          >>> from jsparse.parallel import ParallelLinear
          >>> layer = ParallelLinear(8, 4, format="nm", parts=2, rngs=nnx.Rngs(0))
          >>> layer.dense_kernel().shape
          (8, 4)
        """
        s = self.split
        mesh = jax.sharding.get_abstract_mesh()
        if _mesh_axis_size(self.axis) is not None and mesh.are_all_axes_explicit:
            s = jax.sharding.reshard(s, P())  # gathered: todense reshapes across shards
        return s.todense()

    def block_scores(self, dense: jax.Array) -> jax.Array:
        """Shard-local grow scores for :meth:`grow_and_drop` from a global
        ``(in_features, out_features)`` array (e.g. the dense gradient): the L2 norm of
        every block of each shard's part, ``(parts, blocks per shard)`` row-major over
        the shard's block grid. BCSR layers only.

        Example:
          >>> import jax.numpy as jnp
          >>> from flax import nnx
          >>> from jsparse.parallel import ParallelLinear
          >>> layer = ParallelLinear(8, 8, parts=2, sparsity=0.5, block_shape=(2, 2),
          ...                        rngs=nnx.Rngs(0))
          >>> layer.block_scores(jnp.ones((8, 8))).shape
          (2, 8)
        """
        s = self._bcsr_split("block_scores")
        dense = jnp.asarray(dense)
        if dense.shape != (self.in_features, self.out_features):
            raise ValueError(
                f"block_scores takes the global ({self.in_features}, {self.out_features}) "
                f"array, got shape {dense.shape}"
            )
        bm, bn = s.local.data.shape[-2:]
        scores = []
        for d in range(self.parts):
            piece = self._slice(dense, d).astype(jnp.float32)
            r, c = piece.shape
            blocks = piece.reshape(r // bm, bm, c // bn, bn)
            scores.append(jnp.sqrt(jnp.sum(blocks**2, axis=(1, 3))).reshape(-1))
        return jnp.stack(scores)

    def _bcsr_split(self, what: str) -> Split:
        s = self.split
        if not isinstance(s.local, BCSR):
            raise TypeError(
                f"ParallelLinear.{what} needs a BCSR layer, this one is {self.format!r}"
            )
        return s

    def grow_and_drop(
        self,
        *,
        k,
        k_max: int,
        grow_scores: jax.Array,
        optimizer: nnx.Optimizer | None = None,
        path: Sequence[Any] = (),
    ) -> dict[str, ShardRemap]:
        """One dynamic-sparse-training step (SET / RigL) on every shard, in place: each
        device drops the ``k`` smallest blocks of its shard and grows ``k`` blocks of
        its own block grid, as :func:`jsparse.parallel.grow_and_drop` (padding blocks
        are dropped first and never grown into twice; the padding mask follows).

        Works eagerly and inside ``nnx.jit``; no shape changes, so a jitted step does
        not recompile. The optimizer state mirroring the values moves with them: kept
        blocks keep their moments, grown blocks restart at zero.

        Args:
          k: blocks to replace per shard (int, or ``(parts,)``), ``<= k_max``.
          k_max: static bound for ``k``.
          grow_scores: ``(parts, blocks per shard)``, e.g. :meth:`block_scores` of the
            dense gradient.
          optimizer: an ``nnx.Optimizer`` whose state to move (``None``: do it yourself
            with the returned remaps and :func:`jsparse.train.remap_optimizer`).
          path: this layer's path in the optimizer's model (``()`` if the layer is the
            model), e.g. ``("fc1",)``.

        Returns:
          ``{"kernel_data": ShardRemap}``: how the stored values moved.

        Raises:
          TypeError: not a BCSR layer.
          ValueError: ``optimizer`` given but no state leaf mirrors this layer's values
            at ``path``.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from flax import nnx
          >>> from jsparse.parallel import ParallelLinear
          >>> layer = ParallelLinear(8, 8, parts=2, sparsity=0.5, block_shape=(2, 2),
          ...                        rngs=nnx.Rngs(0))
          >>> opt = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)
          >>> remaps = layer.grow_and_drop(k=1, k_max=1, grow_scores=jnp.ones((2, 8)),
          ...                              optimizer=opt)
          >>> remaps["kernel_data"].reset.sum(axis=1).tolist()  # one block grown per shard
          [1, 1]
        """
        s = self._bcsr_split("grow_and_drop")
        k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (self.parts,))
        grow_scores = jnp.asarray(grow_scores)
        grid = (self.in_features // s.local.data.shape[-2]) * (
            self.out_features // s.local.data.shape[-1]
        )
        if grow_scores.shape != (self.parts, grid // self.parts):
            raise ValueError(
                f"grow_scores must be (parts, blocks per shard) = ({self.parts}, "
                f"{grid // self.parts}), got {grow_scores.shape}"
            )

        if optimizer is not None:
            _check_mirrors(optimizer, (*path, "kernel_data"), tuple(s.local.data.shape))

        def one(local, padding, k, scores):
            new, remap = bcsr_grow_and_drop(
                mask_padding(local, padding), k=k, k_max=k_max, grow_scores=scores
            )
            return new, padding[remap.source] & ~remap.reset, remap.source, remap.reset

        local, padding, source, reset = self._per_shard(
            jax.vmap(one), s.local, s.padding, k, grow_scores
        )
        remap = ShardRemap(source, reset, old_shape=tuple(s.local.data.shape))
        new = jax.tree.leaves(Split(local, padding, s.along, s.shape))
        for name, leaf in zip(self._split_leaf_names, new, strict=True):
            getattr(self, name).set_value(leaf)
        remaps = {"kernel_data": remap}
        if optimizer is not None:
            remap_optimizer(optimizer, {(*path, name): r for name, r in remaps.items()})
        return remaps

    def _per_shard(self, fn, *args):
        """``fn(*args)`` (every argument and result stacked by shard): on a mesh with
        the layer's axis, each device runs it on its own shard (one ``shard_map``)."""
        if _mesh_axis_size(self.axis) is None:
            return fn(*args)
        spec = P(self.axis)
        if jax.sharding.get_abstract_mesh().are_all_axes_explicit:
            args = jax.sharding.reshard(args, spec)
        # Manual over every axis (replicated over the others: each copy does the same).
        return jax.shard_map(fn, in_specs=spec, out_specs=spec)(*args)

    # ------------------------------------------------------------ the product
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``inputs @ W + b`` over the last axis of ``inputs`` (any leading shape).

        Inside a mesh with the layer's axis: one ``shard_map`` over that axis (column:
        output sharded on its last axis; row: one ``psum``, or ``psum_scatter``).
        Otherwise the same shard-wise products on one device.

        Example:
          >>> import jax.numpy as jnp
          >>> from flax import nnx
          >>> from jsparse.parallel import ParallelLinear
          >>> layer = ParallelLinear(8, 4, parallel="row", parts=2, format="nm",
          ...                        rngs=nnx.Rngs(0))
          >>> x = jnp.ones((3, 8))
          >>> bool(jnp.allclose(layer(x), x @ layer.dense_kernel() + layer.bias[...],
          ...                   atol=1e-5))
          True
        """
        inputs = jnp.asarray(inputs)
        if inputs.ndim < 1 or inputs.shape[-1] != self.in_features:
            raise ValueError(
                f"ParallelLinear: inputs must be (..., {self.in_features}), got {inputs.shape}"
            )
        s = self.split
        bias = self.bias[...] if self.bias is not None else None
        dtype = self.dtype if self.dtype is not None else jnp.promote_types(inputs.dtype, s.dtype)
        inputs = inputs.astype(dtype)
        if s.dtype != dtype:
            s = Split(s.local.astype(dtype), s.padding, s.along, s.shape)
        size = _mesh_axis_size(self.axis)
        if size is None:
            y = self._one_device(s, inputs)
        else:
            if size != self.parts:
                raise ValueError(
                    f"ParallelLinear has {self.parts} parts but mesh axis {self.axis!r} has "
                    f"{size} devices"
                )
            y = self._sharded(s, inputs)
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return y

    def _sharded(self, s: Split, x: jax.Array) -> jax.Array:
        lead = (None,) * (x.ndim - 1)
        split_x = self.parallel == "row"
        split_y = self.parallel == "column" or self.scatter
        x_spec = P(*lead, self.axis) if split_x else P()
        y_spec = P(*lead, self.axis) if split_y else P()
        axis, scatter, impl = self.axis, self.scatter, self.impl

        def local(s, x):
            return split_matmul(x, s, axis_name=axis, scatter=scatter, impl=impl)

        if not jax.sharding.get_abstract_mesh().are_all_axes_explicit:
            # Automatic axes: manual over the layer's axis only; the compiler lays out
            # the rest (it may gather a batch sharded over another axis).
            run = jax.shard_map(
                local, in_specs=(P(axis), x_spec), out_specs=y_spec, axis_names={axis}
            )
            return run(s, x)
        # Explicit axes: every axis manual, x laid out as it comes for its batch axes
        # (sharded over "data" ... without a gather) and on the layer's axis for its
        # features; the output keeps the batch layout.
        batch = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
        batch = tuple(None if a == axis else a for a in batch[: x.ndim - 1])
        x_spec = P(*batch, axis if split_x else None)
        y_spec = P(*batch, axis if split_y else None)
        x = jax.sharding.reshard(x, x_spec)
        s = jax.sharding.reshard(s, P(axis))
        run = jax.shard_map(local, in_specs=(P(axis), x_spec), out_specs=y_spec)
        return run(s, x)

    def _one_device(self, s: Split, x: jax.Array) -> jax.Array:
        """The shard-wise products without a mesh: the same sums the devices do."""
        outs = []
        for d in range(self.parts):
            mine = jax.tree.map(lambda leaf, d=d: leaf[d], s)
            w = mask_padding(mine.local, mine.padding)
            xd = x
            if self.parallel == "row":
                n = self.in_features // self.parts
                xd = x[..., d * n : (d + 1) * n]
            outs.append(sparse_matmul(xd, w, impl=self.impl))
        if self.parallel == "column":
            return jnp.concatenate(outs, axis=-1)
        return functools.reduce(jnp.add, outs)
