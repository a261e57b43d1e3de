"""Sparse products on sharded operands: the typing rules every format's primitives
and verbs share, so that a product works on any mesh JAX offers.

* **Explicit axes** (``jax.make_mesh``'s default, with or without ``jax.set_mesh``):
  operand types carry their sharding, and scans, scatters and Pallas calls written
  for one device do not type-check on sharded operands. :func:`on_auto_axes` runs a
  product with those axes made automatic (``jax.sharding.auto_axes``): XLA
  partitions it like any jitted code, and the result gets a definite sharding
  type (the dense operand's batch axes keep theirs).
* **Manual axes** (``jax.shard_map``, ``check_vma=True``): operands of a primitive
  must vary over the same axes (:func:`vary_alike`, as JAX does for its own
  primitives), the result varies over all of them (:func:`varying_result`), and
  the kernel is traced as code of one device (:func:`invariant_lowering`): its loop
  carries start as constants and its Pallas outputs are declared invariant.
* **Automatic axes**: nothing to do; XLA partitions the lowered kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.interpreters import mlir
from jax.sharding import ManualAxisType, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "axis_names",
    "batch_parallel",
    "explicit_mesh",
    "invariant_lowering",
    "invariant_tracing",
    "on_auto_axes",
    "spec_of",
    "vary_alike",
    "varying_result",
]

_NO_MESH = jax.sharding.AbstractMesh((), ())


def spec_of(a) -> tuple:
    """The sharding spec of ``a``'s type, one entry per axis (``None``: unsharded).

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.core.meshes import spec_of
      >>> spec_of(jnp.ones((2, 3)))
      (None, None)
    """
    aval = jax.typeof(a)
    spec = tuple(aval.sharding.spec)
    return spec + (None,) * (aval.ndim - len(spec))


def axis_names(a) -> tuple:
    """The mesh axis names that shard ``a`` (any axis), in order.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.core.meshes import axis_names
      >>> axis_names(jnp.ones(3))
      ()
    """
    return tuple(_names(spec_of(a)))


def _names(spec) -> list:
    names = [n for e in spec if e is not None for n in (e if isinstance(e, tuple) else (e,))]
    return list(dict.fromkeys(names))


def explicit_mesh(leaves: Sequence[Any]):
    """The mesh whose *explicit* axes shard one of ``leaves`` (arrays), else ``None``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.core.meshes import explicit_mesh
      >>> explicit_mesh([jnp.ones(3)]) is None
      True
    """
    for a in leaves:
        sharding = jax.typeof(a).sharding
        mesh = sharding.mesh
        if mesh.empty or not mesh.explicit_axes:
            continue
        if set(_names(sharding.spec)) & set(mesh.explicit_axes):
            return mesh
    return None


def on_auto_axes(fn: Callable[..., Any], args: Sequence[Any], out_spec) -> Any:
    """``fn(*args)``, run with the explicit mesh axes that shard ``args`` made
    automatic, its result resharded to ``out_spec`` (a ``PartitionSpec`` or a pytree
    of them). Without such axes it is just ``fn(*args)``.

    Inside ``jax.jit`` without ``jax.set_mesh`` the context mesh is empty: the
    operands' mesh is used.

    Example:
      >>> import jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from jsparse.core.meshes import on_auto_axes
      >>> on_auto_axes(lambda x: 2 * x, [jnp.ones(2)], P()).tolist()
      [2.0, 2.0]
    """
    mesh = explicit_mesh(jax.tree.leaves(args))
    if mesh is None:
        return fn(*args)
    with contextlib.ExitStack() as stack:
        if jax.sharding.get_abstract_mesh().empty:
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
        return jax.sharding.auto_axes(fn, out_sharding=out_spec)(*args)


def batch_parallel(fn, args, mesh, in_specs, out_spec):
    """``fn`` run on each device's shard of ``args`` (``jax.shard_map`` over the axes
    named in ``in_specs``, ``check_vma=True``): for a product whose only sharded axis
    is the dense operand's batch, each device multiplies its own columns, with no
    collective; ``fn`` adds the reduction its result needs (``jax.lax.psum``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import PartitionSpec as P
      >>> from jsparse.core.meshes import batch_parallel
      >>> mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> batch_parallel(lambda x: 2 * x, [jnp.ones((2, 4))], mesh, [P(None, "d")],
      ...                P(None, "d")).shape
      (2, 4)
    """
    names = frozenset(n for spec in in_specs for n in _names(spec))
    concrete = mesh if isinstance(mesh, jax.sharding.Mesh) else None
    with contextlib.ExitStack() as stack:
        if concrete is None and jax.sharding.get_abstract_mesh().empty:
            stack.enter_context(jax.sharding.use_abstract_mesh(mesh))
        run = jax.shard_map(
            fn, mesh=concrete, in_specs=tuple(in_specs), out_specs=out_spec,
            axis_names=names, check_vma=True,
        )  # fmt: skip
        return run(*args)


def vary_alike(args: Sequence[Any]) -> list:
    """``args`` cast (``jax.lax.pcast(..., to="varying")``) to vary over the union of
    the manual mesh axes any of them varies over (inside ``jax.shard_map`` with
    ``check_vma=True``; a no-op elsewhere). The transpose of the cast is a ``psum``:
    a replicated operand's cotangent is summed over the devices.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.core.meshes import vary_alike
      >>> [a.shape for a in vary_alike([jnp.ones(2), jnp.ones(3)])]
      [(2,), (3,)]
    """
    varying = frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in args))
    if not varying:
        return list(args)
    out = []
    for a in args:
        missing = tuple(sorted(varying - jax.typeof(a).manual_axis_type.varying))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out


def varying_result(shape, dtype, avals) -> jax.core.ShapedArray:
    """The abstract value of a primitive's result of ``shape`` and ``dtype``, varying
    over the manual axes its operands' abstract values ``avals`` vary over.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jsparse.core.meshes import varying_result
      >>> varying_result((2, 3), jnp.float32, [jax.typeof(jnp.ones(2))])
      ShapedArray(float32[2,3])
    """
    varying = frozenset().union(*(a.manual_axis_type.varying for a in avals))
    if not varying:
        return jax.core.ShapedArray(shape, dtype)
    sharding = NamedSharding(jax.sharding.get_abstract_mesh(), P())
    return jax.core.ShapedArray(
        shape, dtype, sharding=sharding, manual_axis_type=ManualAxisType(varying=varying)
    )


def invariant_tracing():
    """A context in which code is traced as code of one device: outside any mesh,
    for finding a kernel's result shapes. (Pallas kernels declare their outputs
    invariant over manual axes, ``pallas_kernels.common.out_struct``, which is what a
    kernel traced this way computes.)

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jsparse.core.meshes import invariant_tracing
      >>> with invariant_tracing():
      ...     jax.eval_shape(jnp.sin, jax.ShapeDtypeStruct((2,), jnp.float32)).shape
      (2,)
    """
    stack = contextlib.ExitStack()
    stack.enter_context(jax.sharding.use_abstract_mesh(_NO_MESH))
    return stack


def invariant_lowering(impl: Callable[..., Any], multiple_results: bool = False):
    """A lowering rule (``mlir.lower_fun`` of ``impl``) that traces ``impl`` on operand
    types without manual-axis variance, outside any mesh: the variance is a type-level
    check, the lowered program is the same, and kernels written for one device (loop
    carries that start as constants, Pallas calls whose outputs are declared
    invariant) then lower inside ``jax.shard_map(check_vma=True)`` too.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.extend.core import Primitive
      >>> from jax.interpreters import mlir
      >>> from jsparse.core.meshes import invariant_lowering
      >>> double_p = Primitive("doc_double")
      >>> double_p.def_impl(lambda x: 2 * x)
      <function <lambda> at ...>
      >>> double_p.def_abstract_eval(lambda x: x)
      <function <lambda> at ...>
      >>> mlir.register_lowering(double_p, invariant_lowering(lambda x: 2 * x))
      >>> jax.jit(double_p.bind)(jnp.ones(2)).tolist()
      [2.0, 2.0]
    """
    lowered = mlir.lower_fun(impl, multiple_results=multiple_results)

    def rule(ctx, *args, **params):
        avals = [a.update(manual_axis_type=ManualAxisType()) for a in ctx.avals_in]
        with jax.sharding.use_abstract_mesh(_NO_MESH):
            return lowered(ctx.replace(avals_in=avals), *args, **params)

    return rule
