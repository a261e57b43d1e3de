"""Dense-gradient probes: how RigL reads the dense gradient of a sparse layer.

Inside :func:`probing`, a sparse layer registered in the probe table adds
``inputs @ probe`` (``probe`` a zero ``(in, out)`` array) to its output. The gradient of
the loss with respect to ``probe`` is then the gradient with respect to the dense
kernel, ``inputs.T @ dy``, at every position, stored or not. The extra dense matmul
runs only where the probe is active (RigL's update steps), never in a normal step.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import jax

_DENSE_GRAD_PROBES: contextvars.ContextVar[Mapping[int, jax.Array] | None] = contextvars.ContextVar(
    "jsparse_dense_probes", default=None
)


@contextlib.contextmanager
def probing(probes: Mapping[int, jax.Array]) -> Iterator[None]:
    """Activate ``probes`` (``id(layer) -> (in, out) array``) for the enclosed calls."""
    token = _DENSE_GRAD_PROBES.set(probes)
    try:
        yield
    finally:
        _DENSE_GRAD_PROBES.reset(token)


def probe_for(layer) -> jax.Array | None:
    probes = _DENSE_GRAD_PROBES.get()
    if probes is None:
        return None
    return probes.get(id(layer))
