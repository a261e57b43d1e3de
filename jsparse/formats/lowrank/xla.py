"""LowRankSparse's implementations: the factored product ``U @ (V @ x) + S @ x``.

The low-rank part is two XLA dots; the sparse part is BCSR's product, run through
the registry with the implementation named here, so ``impl`` passes on to ``S``:

* ``"xla"`` / ``"pallas"``: ``S`` by BCSR's ``"xla"`` / ``"pallas"`` implementation;
* ``"factored"``: ``S`` by BCSR's own automatic choice (dense for a dense ``S``), the
  CPU default.

``"dense"`` (inherited) densifies the whole matrix.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jsparse.core.registry import register_impl, run
from jsparse.formats.bcsr.matrix import BCSR
from jsparse.formats.lowrank.matrix import LowRankSparse

__all__: list[str] = []


def _matmul(sparse_impl: str, a: LowRankSparse, x: jax.Array, *, transpose: bool) -> jax.Array:
    acc = jnp.promote_types(x.dtype, jnp.float32)
    first, second = (a.U.T, a.V.T) if transpose else (a.V, a.U)
    low = jnp.matmul(
        second, jnp.matmul(first, x, preferred_element_type=acc), preferred_element_type=acc
    )
    s = a.S
    order = s.auto_order("matmul") if sparse_impl == "auto" else ()
    sparse = run("matmul", BCSR, sparse_impl, order, s, x, transpose=transpose)
    return (low + sparse.astype(acc)).astype(x.dtype)


register_impl("matmul", LowRankSparse, "factored", functools.partial(_matmul, "auto"))
register_impl("matmul", LowRankSparse, "xla", functools.partial(_matmul, "xla"))
register_impl("matmul", LowRankSparse, "pallas", functools.partial(_matmul, "pallas"))


@register_impl("scale", LowRankSparse, "xla")
def _scale(a: LowRankSparse, s: jax.Array) -> LowRankSparse:
    dtype = jnp.result_type(a.U, s)
    return a._replace(
        U=(a.U * s).astype(dtype), V=a.V.astype(dtype), S_data=(a.S_data * s).astype(dtype)
    )
