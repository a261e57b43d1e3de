"""The implementation registry: which implementation of an op runs for a format.

Every ``(op, format)`` pair has a table of named implementations, for example

* ``"xla"``    pure ``jnp``/``lax`` (always present; the CPU path and the reference),
* ``"dense"``  densify, then a dense op (registered once, on the base class),
* ``"pallas"`` Pallas kernels (GPU/TPU; the interpreter on other platforms).

Tables are looked up along the format's MRO, so an implementation registered for
:class:`~jsparse.core.AbstractSparseMatrix` serves every format that does not
register its own.

**Capability, not exceptions.** An implementation may come with a
``supports(*args, **kwargs) -> str | None`` check that returns ``None`` when it
handles the configuration and otherwise a sentence saying why not. ``impl="auto"``
takes, per platform, the first candidate of the format's order whose check passes,
and logs the candidates it skipped with their reasons to the ``"jsparse.dispatch"``
logger (level INFO); an explicit ``impl`` whose check fails raises
:class:`ValueError` with the reason (on a platform whose check alone fails, when
the program is lowered for it).
An exception raised while an implementation *runs* is a bug and propagates: it is
never turned into a fallback.

**Platforms.** An implementation may have per-platform versions
(``register_impl(op, fmt, "pallas", fn, platform="cuda")``) and the ``auto`` order may
differ per platform (:func:`with_pallas`). The choice is staged with
:func:`jax.lax.platform_dependent`, so it is made when lowering (also for
``jax.export`` to several platforms), never from ``jax.devices()`` at trace time.
Checks are plain Python on shapes and dtypes: nothing is traced to find out whether
an implementation applies.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

__all__ = [
    "PLATFORMS",
    "AutoOrder",
    "Implementation",
    "check_impl",
    "implementations",
    "on_platform",
    "register_impl",
    "run",
    "with_pallas",
]

# Where ``auto`` records the candidates it skipped and why (INFO; off by default).
_log = logging.getLogger("jsparse.dispatch")

# Platforms that jax.lax.platform_dependent distinguishes ("gpu" is not one).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

# An order for impl="auto": one list for every platform, or a mapping from platform
# name (and "default") to a list.
AutoOrder = Sequence[str] | Mapping[str, Sequence[str]]
Supports = Callable[..., "str | None"]


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One registered implementation: the function and its capability check.

    Example:
      >>> from jsparse.core.registry import Implementation
      >>> impl = Implementation(print, supports=lambda n: None if n > 0 else "n must be > 0")
      >>> impl.why_not((0,), {})
      'n must be > 0'
    """

    fn: Callable[..., Any]
    supports: Supports | None = None

    def why_not(self, args, kwargs) -> str | None:
        """``None`` if this implementation handles the arguments, else the reason.

        Example:
          >>> from jsparse.core.registry import Implementation
          >>> Implementation(print).why_not((1, 2), {}) is None  # no check: handles all
          True
        """
        return None if self.supports is None else self.supports(*args, **kwargs)


# (op, fmt) -> name -> Implementation (platform-independent version)
_TABLES: dict[tuple[str, type], dict[str, Implementation]] = {}
# (op, fmt, name) -> platform -> Implementation (platform-specific versions)
_SPECIALISED: dict[tuple[str, type, str], dict[str, Implementation]] = {}


def register_impl(
    op: str,
    fmt: type,
    name: str,
    fn: Callable[..., Any] | None = None,
    *,
    supports: Supports | None = None,
    platform: str | None = None,
):
    """Register ``fn`` as implementation ``name`` of ``op`` for the format ``fmt``.

    Usable as a call (``register_impl("matmul", Fmt, "xla", fn)``) or as a decorator
    (``@register_impl("matmul", Fmt, "xla")``).

    Args:
      op: the op name (``"matmul"``, ``"sddmm"``, ``"scale"`` ...).
      fmt: the format class (a subclass of ``AbstractSparseMatrix``); subclasses
        inherit the registration unless they register their own.
      name: the implementation's name, a Python identifier other than ``"auto"``.
      fn: the implementation; receives the op's arguments.
      supports: ``supports(*args, **kwargs) -> str | None`` with the same arguments:
        ``None`` when ``fn`` handles them, else the reason it does not.
      platform: ``"cpu"``, ``"cuda"``, ``"rocm"`` or ``"tpu"``: ``fn`` is the version
        of ``name`` that runs when lowering for that platform; the version registered
        without ``platform`` runs on the others.

    Raises:
      ValueError: a bad ``name`` or ``platform``.

    Example:
      A second ``scale`` for a subclass of BCSR (BCSR's own table is left alone),
      with a ``supports`` check:

      >>> import jax.numpy as jnp, jsparse
      >>> class Tagged(jsparse.BCSR):
      ...     pass
      >>> def float32_only(a, s):
      ...     return None if a.dtype == jnp.float32 else f"float32 only, got {a.dtype}"
      >>> @jsparse.extend.register_impl("scale", Tagged, "doc_example", supports=float32_only)
      ... def _(a, s):
      ...     return a.with_values(a.data * s)
      >>> jsparse.implementations("scale", Tagged)  # BCSR's "xla" is inherited
      ('xla', 'doc_example')
      >>> t = Tagged(jnp.ones((1, 2, 2)), [0], [0, 1], shape=(2, 2))
      >>> jsparse.scale(t, 3.0, impl="doc_example").todense()[0].tolist()
      [3.0, 3.0]
      >>> jsparse.scale(t.astype(jnp.bfloat16), 3.0, impl="doc_example")
      Traceback (most recent call last):
      ...
      ValueError: impl='doc_example' cannot run scale for Tagged with these arguments: ...
    """
    if name == "auto" or not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"invalid implementation name {name!r}")
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")

    def decorator(fn):
        entry = Implementation(fn, supports)
        if platform is None:
            _TABLES.setdefault((op, fmt), {})[name] = entry
        else:
            _SPECIALISED.setdefault((op, fmt, name), {})[platform] = entry
        return fn

    return decorator if fn is None else decorator(fn)


def _table(op: str, fmt: type) -> dict[str, Implementation]:
    """The implementations of ``op`` for ``fmt``, inherited along the MRO."""
    table: dict[str, Implementation] = {}
    for cls in reversed(fmt.__mro__):
        table.update(_TABLES.get((op, cls), {}))
    return table


def _versions(op: str, fmt: type, name: str) -> dict[str, Implementation]:
    for cls in fmt.__mro__:
        if (op, cls, name) in _SPECIALISED:
            return _SPECIALISED[(op, cls, name)]
    return {}


def implementations(op: str, fmt: type) -> tuple[str, ...]:
    """Names of the implementations registered for ``op`` on ``fmt`` (inherited too).

    Example:
      >>> import jsparse
      >>> sorted(jsparse.implementations("matmul", jsparse.BCSR))
      ['cpu', 'dense', 'pallas', 'xla']
    """
    return tuple(_table(op, fmt))


def with_pallas(order: Sequence[str]) -> dict[str, list[str]]:
    """A per-platform ``auto`` order from a CPU order: on GPU/TPU the Pallas kernels
    take the place of ``"xla"`` (XLA stays right behind them as the fallback), so a
    pattern dense enough to prefer ``"dense"`` on CPU prefers it there too.

    Example:
      >>> from jsparse.core.registry import with_pallas
      >>> with_pallas(["xla", "dense"])["cuda"]
      ['pallas', 'xla', 'dense']
    """
    accelerator = []
    for name in order:
        if name == "xla":
            accelerator.append("pallas")
        accelerator.append(name)
    return {"cuda": accelerator, "tpu": accelerator, "default": list(order)}


def check_impl(impl: Any) -> None:
    """TypeError unless ``impl`` is a string (the name is checked by :func:`run`).

    Example:
      >>> from jsparse.core.registry import check_impl
      >>> check_impl("xla")
      >>> check_impl(None)
      Traceback (most recent call last):
      ...
      TypeError: impl must be a string such as 'auto' or 'xla', got None
    """
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a string such as 'auto' or 'xla', got {impl!r}")


def run(op: str, fmt: type, impl: str, auto_order: AutoOrder, *args, **kwargs):
    """Run implementation ``impl`` of ``op`` for ``fmt`` on ``args``.

    ``impl="auto"`` takes, per platform, the first name of ``auto_order`` that is
    registered and whose ``supports`` check passes.

    The verbs check that ``impl`` is a string (:func:`check_impl`) before calling.

    Args:
      op: the op name.
      fmt: the format class whose table (inherited along its MRO) is searched.
      impl: ``"auto"`` or an implementation's name.
      auto_order: the candidates for ``"auto"``: a list, or a mapping from platform
        (and ``"default"``) to a list (see ``AbstractSparseMatrix.auto_order``).
      *args, **kwargs: the implementation's arguments (and its ``supports`` check's).

    Returns:
      What the implementation returns (a ``jax.lax.platform_dependent`` over the
      platforms' choices when they differ).

    Raises:
      ValueError: ``impl`` is not registered for this op and format, or no
        implementation (for ``auto``) / not ``impl`` (explicit) handles the
        configuration on any platform; the message gives every reason. An explicit
        ``impl`` that handles the configuration on some platforms only raises it
        when the program is lowered for one of the others (``jit`` on that device,
        ``.lower``, ``jax.export``), naming that platform and the reason.

    Example:
      >>> import jax.numpy as jnp, jsparse
      >>> a = jsparse.BCSR.fromdense(jnp.eye(4), block_shape=(2, 2))
      >>> y = jsparse.extend.run("matmul", jsparse.BCSR, "auto", ["xla"], a, jnp.ones((4, 1)),
      ...                        transpose=False)
      >>> y[:, 0].tolist()
      [1.0, 1.0, 1.0, 1.0]
    """
    table = _table(op, fmt)
    if impl != "auto":
        if impl not in table:
            raise ValueError(
                f"{fmt.__name__} has no {impl!r} implementation of {op}: impl must be one "
                f"of {['auto', *sorted(table)]}, got {impl!r}"
            )
        branches, reasons = _resolve(op, fmt, table, {p: [impl] for p in PLATFORMS}, args, kwargs)
        if not branches:
            raise ValueError(
                f"impl={impl!r} cannot run {op} for {fmt.__name__} with these arguments: "
                + "; ".join(dict.fromkeys(reasons.values()))
            )
        # Platforms whose check failed raise the reason when lowered for (a kernel
        # that fits the interpreter may not fit an H100's shared memory).
        like = next(iter(branches.values()))
        for platform, reason in reasons.items():
            message = f"impl={impl!r} cannot run {op} for {fmt.__name__} on {platform}: {reason}"
            branches[platform] = _refusal(platform, message, like)
        return _stage(branches, args, kwargs)
    branches, reasons = _resolve(op, fmt, table, _per_platform(auto_order), args, kwargs)
    if not branches:
        raise ValueError(
            f"no implementation of {op} for {fmt.__name__} handles these arguments: "
            + "; ".join(dict.fromkeys(reasons.values()))
        )
    return _stage(branches, args, kwargs)


def _refusal(platform: str, message: str, like: Callable[..., Any]) -> Callable[..., Any]:
    """A branch that raises ``ValueError(message)`` when lowered for ``platform``.

    It types itself after ``like`` (another platform's branch) without tracing a
    kernel. ``lax.platform_dependent`` differentiates and batches every branch, also
    those that never run, so the refusal has derivatives that refuse in turn: a
    gradient program for ``platform`` raises too instead of compiling to zeros.
    """

    def branch(*args, **kwargs):
        out = jax.eval_shape(functools.partial(like, **kwargs), *args)
        avals = tuple(jax.core.ShapedArray(o.shape, o.dtype) for o in jax.tree.leaves(out))
        outs = _refused_p.bind(
            *jax.tree.leaves(args), message=message, platform=platform, out_avals=avals
        )
        return jax.tree.unflatten(jax.tree.structure(out), outs)

    return branch


_refused_p = jex_core.Primitive("jsparse_refused")
_refused_p.multiple_results = True
_refused_p.def_abstract_eval(lambda *args, out_avals, **_: out_avals)


def _refused_impl(*args, message, platform, out_avals):
    raise ValueError(message)


def _refused_lowering(lowering_platform, ctx, *args, message, platform, out_avals):
    if lowering_platform == platform:
        raise ValueError(message)
    return _placeholder_lowering(
        ctx, *args, kernel=None, platform=platform, fallback=None, out_avals=out_avals
    )


def _refused_jvp(primals, tangents, *, message, platform, out_avals):
    outs = _refused_p.bind(*primals, message=message, platform=platform, out_avals=out_avals)
    linear = [
        ad.instantiate_zeros(t)
        for x, t in zip(primals, tangents, strict=True)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    tangent_avals = tuple(a.to_tangent_aval() for a in out_avals)
    if not linear:
        return outs, [ad.Zero(a) for a in tangent_avals]
    # Linear in the tangents, so that transposing it (grad) keeps a refusal too.
    return outs, _refused_p.bind(
        *linear, message=message, platform=platform, out_avals=tangent_avals
    )


def _refused_transpose(cts, *args, message, platform, out_avals):
    del out_avals
    undefined = [x for x in args if ad.is_undefined_primal(x)]
    ct_avals = tuple(x.aval.to_tangent_aval() for x in undefined)
    outs = iter(
        _refused_p.bind(
            *[ad.instantiate_zeros(c) for c in cts],
            message=message,
            platform=platform,
            out_avals=ct_avals,
        )
    )
    return [next(outs) if ad.is_undefined_primal(x) else None for x in args]


def _refused_batch(args, dims, *, message, platform, out_avals):
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
    out_avals = tuple(jax.core.ShapedArray((size, *a.shape), a.dtype) for a in out_avals)
    outs = _refused_p.bind(*args, message=message, platform=platform, out_avals=out_avals)
    return outs, [0] * len(outs)


_refused_p.def_impl(_refused_impl)
ad.primitive_jvps[_refused_p] = _refused_jvp
ad.primitive_transposes[_refused_p] = _refused_transpose
batching.primitive_batchers[_refused_p] = _refused_batch
for _p in PLATFORMS:
    mlir.register_lowering(_refused_p, functools.partial(_refused_lowering, _p), platform=_p)


def _per_platform(auto_order: AutoOrder) -> dict[str, list[str]]:
    if isinstance(auto_order, Mapping):
        unknown = set(auto_order) - set(PLATFORMS) - {"default"}
        if unknown:
            raise ValueError(f"auto_order has unknown platforms {sorted(unknown)}")
        default = list(auto_order.get("default", ()))
        return {p: list(auto_order.get(p, default)) for p in PLATFORMS}
    return {p: list(auto_order) for p in PLATFORMS}


def _resolve(op, fmt, table, orders, args, kwargs):
    """``({platform: fn}, {platform: reason})``: per platform, the first candidate of
    its order that handles the arguments. Each check runs once per implementation."""
    verdicts: dict[int, str | None] = {}
    branches: dict[str, Callable[..., Any]] = {}
    reasons: dict[str, str] = {}
    for platform, names in orders.items():
        why_all = []
        for name in names:
            entry = _versions(op, fmt, name).get(platform, table.get(name))
            if entry is None:
                continue
            key = id(entry)
            if key not in verdicts:
                verdicts[key] = entry.why_not(args, kwargs)
            if verdicts[key] is None:
                branches[platform] = entry.fn
                if why_all:
                    _log.info(
                        "%s for %s on %s: %r runs; skipped %s",
                        op,
                        fmt.__name__,
                        platform,
                        name,
                        "; ".join(why_all),
                    )
                break
            why_all.append(f"{name} ({platform}): {verdicts[key]}")
        else:
            reasons[platform] = "; ".join(why_all) or f"nothing registered for {platform}"
    return branches, reasons


def _stage(branches: dict[str, Callable[..., Any]], args, kwargs):
    """Call the one function every platform chose, or stage a
    :func:`jax.lax.platform_dependent` over the choices (platforms with no branch
    fail when lowered for)."""
    fns = list(dict.fromkeys(branches.values()))
    if len(fns) == 1 and len(branches) == len(PLATFORMS):
        return fns[0](*args, **kwargs)
    bound = {fn: functools.partial(fn, **kwargs) for fn in fns}
    return jax.lax.platform_dependent(*args, **{p: bound[fn] for p, fn in branches.items()})


# ------------------------------------------------------------------ platform-only code
# ``lax.platform_dependent`` lowers each branch for *every* platform of a
# multi-platform export (only the choice among branches is per platform), so a
# branch holding a CUDA-only Pallas kernel fails to lower for CPU ("Only interpret
# mode is supported on CPU backend") or TPU. ``on_platform`` wraps such a kernel in a
# primitive whose lowering is registered for its own platform only.
_on_platform_p = jex_core.Primitive("jsparse_on_platform")
_on_platform_p.multiple_results = True


def on_platform(
    platform: str,
    fn: Callable[..., Any],
    *,
    export_fallback: Callable[..., Any] | None = None,
    shapes_like: Callable[..., Any] | None = None,
) -> Callable[..., Any]:
    """``fn`` (arrays in, arrays out) marked as code for ``platform`` only.

    Lowered for ``platform``, the wrapper is ``fn``. In a lowering for several
    platforms at once (``jax.export(..., platforms=[...])``), the other platforms get
    a NaN-filled placeholder of the same shapes instead of lowering ``fn`` for them:
    use it inside the ``platform`` branch of a :func:`jax.lax.platform_dependent`
    (as :func:`run` stages it), which never executes that branch elsewhere. Lowered
    for another platform alone, it raises. Keyword arguments are static. ``vmap``
    works; differentiate around it (``custom_vjp``), not through it.

    ``fn`` is traced only when lowered for ``platform`` (or run eagerly): the call's
    result types come from ``shapes_like`` or ``export_fallback`` when given, so a
    program for another platform never traces a kernel that will not run there.

    Args:
      platform: one of :data:`PLATFORMS`.
      fn: a function of arrays (pytrees of arrays) returning arrays.
      export_fallback: a function with ``fn``'s signature and result shapes that
        replaces it when lowering for ``jax.export`` (for kernels whose compiled form
        has no export compatibility guarantee, such as Triton's: JAX refuses to
        serialize them).
      shapes_like: a function with ``fn``'s signature and result shapes and dtypes
        (a reference implementation), traced instead of ``fn`` to type the call
        (default: ``export_fallback``, else ``fn`` itself).

    Returns:
      The wrapped function, with ``fn``'s signature.

    Raises:
      ValueError: an unknown ``platform``, or (when ``fn`` is traced) a fallback whose
        results differ in shape.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jsparse.core.registry import on_platform
      >>> double = on_platform("cpu", lambda x: 2 * x)
      >>> jax.jit(double)(jnp.ones(2)).tolist()
      [2.0, 2.0]
    """
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        leaves, in_tree = jax.tree.flatten(args)
        kernel = _Flat(fn, in_tree, tuple(sorted(kwargs.items())))
        fallback = None if export_fallback is None else kernel.replace(export_fallback)
        # The result types come from a reference when there is one, so that ``fn``
        # is traced only when lowered for its own platform (or run eagerly).
        reference = shapes_like or export_fallback
        shapes_from = kernel if reference is None else kernel.replace(reference)
        out_avals, out_tree = shapes_from.result_types(leaves)
        outs = _on_platform_p.bind(
            *leaves, kernel=kernel, platform=platform, fallback=fallback, out_avals=out_avals
        )
        return jax.tree.unflatten(out_tree, outs)

    return wrapped


@dataclasses.dataclass(frozen=True, eq=False)
class _Flat:
    """A function of pytrees with static keyword arguments, called on flat leaves."""

    fn: Callable[..., Any]
    in_tree: Any
    kwargs: tuple

    def replace(self, fn):
        return dataclasses.replace(self, fn=fn)

    def __call__(self, *leaves):
        args = jax.tree.unflatten(self.in_tree, leaves)
        return jax.tree.leaves(self.fn(*args, **dict(self.kwargs)))

    def result_types(self, leaves):
        structs = [jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)) for x in leaves]
        out = jax.eval_shape(
            lambda *xs: self.fn(*jax.tree.unflatten(self.in_tree, xs), **dict(self.kwargs)),
            *structs,
        )
        avals = tuple(jax.core.ShapedArray(o.shape, o.dtype) for o in jax.tree.leaves(out))
        return avals, jax.tree.structure(out)


def _checked(kernel, fallback, out_avals):
    """``kernel``, after checking that it returns the shapes its fallback promised."""
    if fallback is None:
        return kernel

    def run(*xs):
        outs = kernel(*xs)
        got = [tuple(a.shape) for a in out_avals]
        want = [tuple(jnp.shape(o)) for o in outs]
        if got != want:
            raise ValueError(
                f"on_platform: the export fallback returns shapes {got}, the kernel {want}"
            )
        return outs

    return run


def _on_platform_impl(*args, kernel, platform, fallback, out_avals):
    del platform
    return _checked(kernel, fallback, out_avals)(*args)


def _on_platform_abstract_eval(*args, kernel, platform, fallback, out_avals):
    del args, kernel, platform, fallback
    return out_avals


def _on_platform_lowering(lowering_platform, ctx, *args, kernel, platform, fallback, out_avals):
    if platform != lowering_platform:
        return _placeholder_lowering(
            ctx, *args, kernel=kernel, platform=platform, fallback=None, out_avals=out_avals
        )
    fn = _checked(kernel, fallback, out_avals)
    if fallback is not None and ctx.module_context.lowering_parameters.for_export:
        dtypes = [a.dtype for a in out_avals]

        def fn(*xs):
            return [y.astype(d) for y, d in zip(fallback(*xs), dtypes, strict=True)]

    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


def _placeholder_lowering(ctx, *args, kernel, platform, fallback, out_avals):
    del kernel, fallback
    platforms = ctx.module_context.platforms
    if len(platforms) == 1:
        raise ValueError(
            f"code for {platform} only (a {platform} kernel) cannot be lowered for "
            f"{platforms[0]}; it runs inside the {platform} branch of a platform-dependent "
            "choice"
        )

    def nans(*_):
        return [
            jnp.full(a.shape, jnp.nan if jnp.issubdtype(a.dtype, jnp.inexact) else 0, a.dtype)
            for a in out_avals
        ]

    return mlir.lower_fun(nans, multiple_results=True)(ctx, *args)


def _on_platform_batch(args, dims, *, kernel, platform, fallback, out_avals):
    in_axes = list(dims)  # None: not mapped
    size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)

    def batched(flat):
        vmapped = jax.vmap(lambda *xs: flat(*xs), in_axes=in_axes)
        return _Flat(vmapped, jax.tree.structure(tuple(args)), ())

    out_avals = tuple(jax.core.ShapedArray((size, *a.shape), a.dtype) for a in out_avals)
    outs = _on_platform_p.bind(
        *args,
        kernel=batched(kernel),
        platform=platform,
        fallback=None if fallback is None else batched(fallback),
        out_avals=out_avals,
    )
    return outs, [0] * len(outs)


_on_platform_p.def_impl(_on_platform_impl)
_on_platform_p.def_abstract_eval(_on_platform_abstract_eval)
mlir.register_lowering(_on_platform_p, _placeholder_lowering)
for _p in PLATFORMS:
    mlir.register_lowering(
        _on_platform_p, functools.partial(_on_platform_lowering, _p), platform=_p
    )
batching.primitive_batchers[_on_platform_p] = _on_platform_batch
