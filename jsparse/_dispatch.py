"""Implementation registry: which implementation of an op runs for a format.

Every (op, format) pair has a table of named implementations:

* ``"xla"``    pure ``jnp``/``lax`` (always present; the CPU path and the reference),
* ``"dense"``  densify, then a dense op (the honest fallback for dense patterns),
* ``"pallas"`` Pallas kernels (GPU/TPU; interpret mode on CPU).

``impl="auto"`` asks the format for an ordered list of candidates; an implementation
that cannot handle a configuration raises :class:`NotImplementedError` and the next
candidate runs. An explicitly requested implementation never falls back.

Platforms. The candidate list may differ per platform (a mapping such as
``{"cuda": [...], "tpu": [...], "default": [...]}``) and an implementation may be
*specialised* per platform (``register_impl(op, fmt, "pallas", platform="cuda")``).
The choice is then made at lowering time with :func:`jax.lax.platform_dependent`,
never from ``jax.devices()`` at trace time. Each platform's candidates are probed
with :func:`jax.eval_shape` (tracing only): the first that does not raise
:class:`NotImplementedError` becomes that platform's branch, so a kernel that cannot
handle a configuration drops out before anything is staged. When every platform
resolves to the same function, it is called directly (no conditional at all).
See docs/pallas.md.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

IMPLS = ("auto", "xla", "dense", "pallas")
# Platforms that jax.lax.platform_dependent distinguishes ("gpu" is not one).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")

_REGISTRY: dict[tuple[str, type], dict[str, Callable[..., Any]]] = {}
# (op, fmt, name) -> platform -> specialised implementation
_PLATFORM_REGISTRY: dict[tuple[str, type, str], dict[str, Callable[..., Any]]] = {}

# An order for impl="auto": one list for every platform, or a mapping from
# platform name (and "default") to a list.
AutoOrder = Sequence[str] | Mapping[str, Sequence[str]]


def register_impl(op: str, fmt: type, name: str, *, platform: str | None = None):
    """Decorator registering ``fn`` as implementation ``name`` of ``op`` for ``fmt``.

    With ``platform`` (``"cpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``), ``fn`` is the
    version of ``name`` that runs when lowering for that platform; the version
    registered without ``platform`` runs on the other platforms.
    """
    if name == "auto" or not name.isidentifier():
        raise ValueError(f"invalid implementation name {name!r}")
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")

    def decorator(fn):
        if platform is None:
            _REGISTRY.setdefault((op, fmt), {})[name] = fn
        else:
            _PLATFORM_REGISTRY.setdefault((op, fmt, name), {})[platform] = fn
        return fn

    return decorator


def implementations(op: str, fmt: type) -> tuple[str, ...]:
    """Names of the implementations registered for ``op`` on ``fmt``."""
    return tuple(_REGISTRY.get((op, fmt), {}))


def with_pallas(order: Sequence[str]) -> dict[str, list[str]]:
    """A per-platform ``auto`` order from a CPU order: on GPU/TPU the Pallas kernels
    take the place of ``"xla"`` (XLA stays as the fallback right behind them), so a
    pattern dense enough to prefer ``"dense"`` on CPU prefers it there too."""
    accelerator = []
    for name in order:
        if name == "xla":
            accelerator.append("pallas")
        accelerator.append(name)
    return {"cuda": accelerator, "tpu": accelerator, "default": list(order)}


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def run(op: str, fmt: type, impl: str, auto_order: AutoOrder, *args, **kwargs):
    """Run implementation ``impl`` of ``op`` for ``fmt`` (``auto``: try ``auto_order``).

    Raises:
      ValueError: ``impl`` is unknown or not registered for this op and format.
      NotImplementedError: no candidate could handle the configuration.
    """
    check_impl(impl)
    table = _REGISTRY.get((op, fmt), {})
    if impl != "auto":
        if impl not in table:
            raise ValueError(
                f"{fmt.__name__} has no {impl!r} implementation of {op}; available: {sorted(table)}"
            )
        specialised = _PLATFORM_REGISTRY.get((op, fmt, impl), {})
        if not specialised:
            return table[impl](*args, **kwargs)
        return _run_explicit(op, fmt, impl, table[impl], specialised, args, kwargs)
    orders = _per_platform(auto_order)
    if all(_plain_order(op, fmt, names) for names in orders.values()) and (
        len({tuple(names) for names in orders.values()}) == 1
    ):
        # One order everywhere and nothing platform-specific: try in turn, no probe.
        return _first_that_handles(op, fmt, table, orders["default"], args, kwargs)
    branches: dict[str, Callable[..., Any]] = {}
    reasons: dict[str, str] = {}
    resolved: dict[tuple[Callable[..., Any], ...], tuple[Callable[..., Any] | None, str]] = {}
    for platform, names in orders.items():
        cands = tuple(_candidates(op, fmt, table, names, platform))
        key = tuple(fn for _, fn in cands)
        if key not in resolved:  # platforms with the same candidates are probed once
            resolved[key] = _probe_first(cands, args, kwargs)
        fn, why = resolved[key]
        if fn is None:
            reasons[platform] = why
        else:
            branches[platform] = fn
    if not branches:
        raise NotImplementedError(
            f"no implementation of {op} for {fmt.__name__} handles this configuration "
            f"({'; '.join(f'{p}: {r}' for p, r in reasons.items())})"
        )
    return _platform_dependent(branches, args, kwargs)


def _per_platform(auto_order: AutoOrder) -> dict[str, list[str]]:
    """``{platform: names}`` for every platform, ``"default"`` included."""
    if isinstance(auto_order, Mapping):
        default = list(auto_order.get("default", ()))
        unknown = set(auto_order) - set(PLATFORMS) - {"default"}
        if unknown:
            raise ValueError(f"auto_order has unknown platforms {sorted(unknown)}")
        out = {p: list(auto_order.get(p, default)) for p in PLATFORMS}
    else:
        default = list(auto_order)
        out = {p: default for p in PLATFORMS}
    out["default"] = default
    return out


def _has_specialised(op, fmt, names) -> bool:
    return any((op, fmt, n) in _PLATFORM_REGISTRY for n in names)


def _plain_order(op, fmt, names) -> bool:
    return not _has_specialised(op, fmt, names)


def _candidates(op, fmt, table, names, platform):
    for name in names:
        fn = _PLATFORM_REGISTRY.get((op, fmt, name), {}).get(platform, table.get(name))
        if fn is not None:
            yield name, fn


def _first_that_handles(op, fmt, table, names, args, kwargs):
    reasons = []
    for name in names:
        if name not in table:
            continue
        try:
            return table[name](*args, **kwargs)
        except NotImplementedError as e:
            reasons.append(f"{name}: {e}")
    raise NotImplementedError(
        f"no implementation of {op} for {fmt.__name__} handles this configuration "
        f"({'; '.join(reasons) or 'none registered'})"
    )


# Probe results by (implementation, argument structure, shapes and dtypes, kwargs):
# whether a kernel handles a configuration depends on nothing else, and tracing a
# Pallas kernel on every (eager) call would cost far more than the call itself.
_PROBES: dict[Any, str | None] = {}
_MAX_PROBES = 4096


def _probe_key(fn, args, kwargs):
    try:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (
            fn,
            treedef,
            tuple(
                (tuple(np.shape(x)), np.dtype(x.dtype if hasattr(x, "dtype") else type(x)))
                for x in leaves
            ),
            tuple(sorted(kwargs.items())),
        )
        hash(key)
    except (TypeError, ValueError):
        return None
    return key


def _handles(fn, args, kwargs) -> str | None:
    """``None`` if ``fn`` traces on these arguments, else the NotImplementedError text."""
    key = _probe_key(fn, args, kwargs)
    if key is not None and key in _PROBES:
        return _PROBES[key]
    try:
        jax.eval_shape(functools.partial(fn, **kwargs), *args)
        why = None
    except NotImplementedError as e:
        why = str(e) or type(e).__name__
    if key is not None:
        if len(_PROBES) >= _MAX_PROBES:
            _PROBES.clear()
        _PROBES[key] = why
    return why


def _probe_first(cands, args, kwargs):
    reasons = []
    for name, fn in cands:
        why = _handles(fn, args, kwargs)
        if why is None:
            return fn, ""
        reasons.append(f"{name}: {why}")
    return None, "; ".join(reasons) or "none registered"


def _run_explicit(op, fmt, impl, generic, specialised, args, kwargs):
    """An explicit ``impl`` with per-platform versions: a platform whose version cannot
    handle the configuration gets no branch (lowering for it fails), never another
    implementation."""
    branches: dict[str, Callable[..., Any]] = {}
    reasons: dict[str, str] = {}
    generic_ok = None
    for platform in PLATFORMS:
        fn = specialised.get(platform)
        if fn is None:
            if generic_ok is None:
                generic_ok = _handles(generic, args, kwargs)
            fn, why = generic, generic_ok
        else:
            why = _handles(fn, args, kwargs)
        if why is None:
            branches[platform] = fn
        else:
            reasons[platform] = why
    if not branches:
        raise NotImplementedError(
            f"the {impl!r} implementation of {op} for {fmt.__name__} cannot handle this "
            f"configuration ({'; '.join(f'{p}: {r}' for p, r in reasons.items())})"
        )
    return _platform_dependent(branches, args, kwargs)


def _platform_dependent(branches: dict[str, Callable[..., Any]], args, kwargs):
    """``jax.lax.platform_dependent`` over ``branches`` (``"default"`` allowed);
    platforms mapped to the same function share one branch."""
    fns = list(dict.fromkeys(branches.values()))
    if len(fns) == 1 and ("default" in branches or all(p in branches for p in PLATFORMS)):
        return fns[0](*args, **kwargs)
    bound = {fn: functools.partial(fn, **kwargs) for fn in fns}
    default_fn = branches.get("default")
    per_platform = {
        p: bound[fn] for p, fn in branches.items() if p != "default" and fn is not default_fn
    }
    default = bound[default_fn] if default_fn is not None else None
    return jax.lax.platform_dependent(*args, default=default, **per_platform)
