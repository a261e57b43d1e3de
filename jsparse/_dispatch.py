"""Implementation registry: which implementation of an op runs for a format.

Every (op, format) pair has a table of named implementations:

* ``"xla"``    pure ``jnp``/``lax`` (always present; the CPU path and the reference),
* ``"dense"``  densify, then a dense op (the honest fallback for dense patterns),
* ``"pallas"`` Pallas kernels (GPU/TPU; interpret mode on CPU).

``impl="auto"`` asks the format for an ordered list of candidates; an implementation
that cannot handle a configuration raises :class:`NotImplementedError` and the next
candidate runs. An explicitly requested implementation never falls back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

IMPLS = ("auto", "xla", "dense", "pallas")

_REGISTRY: dict[tuple[str, type], dict[str, Callable[..., Any]]] = {}


def register_impl(op: str, fmt: type, name: str):
    """Decorator registering ``fn`` as implementation ``name`` of ``op`` for ``fmt``."""
    if name == "auto" or not name.isidentifier():
        raise ValueError(f"invalid implementation name {name!r}")

    def decorator(fn):
        _REGISTRY.setdefault((op, fmt), {})[name] = fn
        return fn

    return decorator


def implementations(op: str, fmt: type) -> tuple[str, ...]:
    """Names of the implementations registered for ``op`` on ``fmt``."""
    return tuple(_REGISTRY.get((op, fmt), {}))


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def run(op: str, fmt: type, impl: str, auto_order: Sequence[str], *args, **kwargs):
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
        return table[impl](*args, **kwargs)
    reasons = []
    for name in auto_order:
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
