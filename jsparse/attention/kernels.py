"""Attention kernels behind the registry, and their derivatives (defined once).

An implementation of block-sparse attention is a bundle of two array-level kernels,
:class:`AttentionKernels`:

* ``forward(q, k, v, mask, q_segment_ids, kv_segment_ids, *, config) -> (out, lse)``
* ``backward(q, k, v, out, lse, d_out, d_lse, mask, q_segment_ids, kv_segment_ids, *,
  config) -> (dq, dk, dv)``

on **padded** arrays: ``q (B, nq*bq, H, D)``, ``k, v (B, nk*bk, H_kv, D)`` (zero padded),
segment ids ``None`` or int32 ``(B, nq*bq)`` / ``(B, nk*bk)`` (padding -1); ``out`` is
``(B, nq*bq, H, D)`` in ``q.dtype`` and ``lse`` ``(B, H, nq*bq)`` float32 (``-inf`` for
a row that attends to nothing, whose ``out`` is 0). ``backward`` receives cotangents
of both outputs (``d_lse`` float32, maybe zeros) and returns gradients in the input
dtypes (``dk, dv`` summed over the query heads that share a key head).

:func:`register_attention_impl` registers a bundle under a name (``"pallas"``, ...)
in the registry (op ``"block_sparse_attention"``, format
:class:`~jsparse.attention.BlockMask`); this module adds the autodiff, so kernels know
nothing about it. Two JAX primitives, as for the sparse products:

* ``attention_p`` ``(q, k, v, *mask leaves, [segment ids]) -> (out, lse)`` runs the
  bundle's ``forward``. Its **JVP** is ``attention_tangent_p``, the forward-mode
  tangent computed by one sparse pass of the XLA kernels (over the row view, from the
  saved ``lse``): ``dlse = sum_j P_ij ds_ij`` and
  ``dout = sum_j P_ij (dv_j + ds_ij v_j) - dlse * out``.
* ``attention_tangent_p`` is linear in ``(dq, dk, dv)``; its **transpose** is the
  bundle's ``backward`` (dq from the row view, dk/dv from the transposed view,
  scores recomputed from ``lse``: no ``L x S`` residual). Reverse mode is JVP +
  transpose, so ``jax.grad``, ``jax.jvp``, ``jax.linearize`` and their compositions
  work; its own JVP (second order) differentiates the XLA tangent.
* **batching**: batched dense operands are folded into the batch axis (one call);
  a batched mask is a ``lax.map``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from jsparse.core.registry import register_impl

__all__ = [
    "OP",
    "AttentionConfig",
    "AttentionKernels",
    "attention",
    "register_attention_impl",
]

OP = "block_sparse_attention"


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """The static description of one attention call (hashable).

    Attributes:
      scale: multiplies ``q . k``.
      logits_soft_cap: ``c`` for ``c * tanh(logits / c)``, or None.
      q_len, kv_len: the unpadded lengths ``L`` and ``S``.
      block_size: ``(bq, bk)``.
      num_heads, num_kv_heads: ``H`` and ``H_kv`` (``H % H_kv == 0``).

    Example:
      >>> from jsparse.attention.kernels import AttentionConfig
      >>> c = AttentionConfig(0.125, None, 10, 10, (8, 8), 4, 2)
      >>> c.group, c.num_blocks
      (2, (2, 2))
    """

    scale: float
    logits_soft_cap: float | None
    q_len: int
    kv_len: int
    block_size: tuple[int, int]
    num_heads: int
    num_kv_heads: int

    @property
    def group(self) -> int:
        """Query heads per key head (``H // H_kv``)."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_blocks(self) -> tuple[int, int]:
        """``(nq, nk)``."""
        bq, bk = self.block_size
        return -(-self.q_len // bq), -(-self.kv_len // bk)


@dataclasses.dataclass(frozen=True)
class AttentionKernels:
    """One implementation's array-level kernels (hashable, static).

    Attributes:
      forward: ``forward(q, k, v, mask, q_segment_ids, kv_segment_ids, *, config)
        -> (out, lse)``.
      backward: ``backward(q, k, v, out, lse, d_out, d_lse, mask, q_segment_ids,
        kv_segment_ids, *, config) -> (dq, dk, dv)``.

    Example:
      >>> from jsparse.attention.kernels import AttentionKernels
      >>> from jsparse.attention.xla import XLA_KERNELS
      >>> isinstance(XLA_KERNELS, AttentionKernels)
      True
    """

    forward: Callable
    backward: Callable


# ------------------------------------------------------------------ primitives
attention_p = Primitive("jsparse_block_sparse_attention")
attention_p.multiple_results = True
attention_tangent_p = Primitive("jsparse_block_sparse_attention_tangent")
attention_tangent_p.multiple_results = True

# The forward-mode tangent (set by jsparse.attention.xla): tangent(q, k, v, out, lse,
# dq, dk, dv, mask, q_seg, kv_seg, *, config) -> (d_out, d_lse).
_TANGENT: list[Callable] = []


def set_tangent_kernel(fn: Callable) -> None:
    """Install the forward-mode tangent kernel (done by :mod:`jsparse.attention.xla`).

    Example:
      >>> from jsparse.attention import kernels, xla
      >>> kernels.set_tangent_kernel(xla.tangent)
    """
    _TANGENT[:] = [fn]


def _split(args, tree, has_seg):
    n = tree.num_leaves
    mask = tree.unflatten(args[:n])
    rest = args[n:]
    if has_seg:
        return mask, rest[0], rest[1], rest[2:]
    return mask, None, None, rest


def attention(kernels: AttentionKernels, config: AttentionConfig, q, k, v, mask, q_seg, kv_seg):
    """``(out, lse)`` of padded arrays through ``kernels``, with derivatives.

    Args:
      kernels: the implementation's bundle.
      config: the call's :class:`AttentionConfig`.
      q, k, v: padded inputs (see the module docstring).
      mask: the :class:`~jsparse.attention.BlockMask`.
      q_seg, kv_seg: padded segment ids or both None.

    Returns:
      ``(out, lse)`` padded.

    Example:
      >>> import jax, jax.numpy as jnp, jsparse.attention as ja
      >>> from jsparse.attention.kernels import AttentionConfig, attention
      >>> from jsparse.attention.xla import XLA_KERNELS
      >>> m = ja.BlockMask.from_fn(ja.causal(), 4, 4, block_size=(2, 2))
      >>> q = jnp.ones((1, 4, 1, 2))
      >>> out, lse = attention(XLA_KERNELS, AttentionConfig(1.0, None, 4, 4, (2, 2), 1, 1),
      ...                      q, q, q, m, None, None)
      >>> out.shape, lse.shape
      ((1, 4, 1, 2), (1, 1, 4))
    """
    leaves, tree = jax.tree.flatten(mask)
    has_seg = q_seg is not None
    segs = [q_seg, kv_seg] if has_seg else []
    return attention_p.bind(
        q, k, v, *leaves, *segs, kernels=kernels, config=config, tree=tree, has_seg=has_seg
    )


def _fwd_impl(q, k, v, *rest, kernels, config, tree, has_seg):
    mask, qs, ks, _ = _split(rest, tree, has_seg)
    out, lse = kernels.forward(q, k, v, mask, qs, ks, config=config)
    return [out, lse]


def _fwd_abstract(q, k, v, *rest, kernels, config, tree, has_seg):
    del k, v, rest, kernels, tree, has_seg
    b, lp, h, _ = q.shape
    return [
        jax.core.ShapedArray(q.shape, q.dtype),
        jax.core.ShapedArray((b, h, lp), jnp.promote_types(q.dtype, jnp.float32)),
    ]


def _tangent_impl(q, k, v, out, lse, *rest, kernels, config, tree, has_seg):
    del kernels
    mask, qs, ks, (dq, dk, dv) = _split(rest, tree, has_seg)
    d_out, d_lse = _TANGENT[0](q, k, v, out, lse, dq, dk, dv, mask, qs, ks, config=config)
    return [d_out, d_lse]


def _tangent_abstract(q, k, v, out, lse, *rest, kernels, config, tree, has_seg):
    del q, k, v, rest, kernels, config, tree, has_seg
    return [jax.core.ShapedArray(out.shape, out.dtype), jax.core.ShapedArray(lse.shape, lse.dtype)]


attention_p.def_impl(_fwd_impl)
attention_p.def_abstract_eval(_fwd_abstract)
mlir.register_lowering(attention_p, mlir.lower_fun(_fwd_impl, multiple_results=True))
attention_tangent_p.def_impl(_tangent_impl)
attention_tangent_p.def_abstract_eval(_tangent_abstract)
mlir.register_lowering(attention_tangent_p, mlir.lower_fun(_tangent_impl, multiple_results=True))


def _zeros_like_aval(x):
    aval = jax.typeof(x)
    return jnp.zeros(aval.shape, aval.dtype)


def _attention_jvp(primals, tangents, *, kernels, config, tree, has_seg):
    q, k, v, *rest = primals
    out, lse = attention_p.bind(
        *primals, kernels=kernels, config=config, tree=tree, has_seg=has_seg
    )
    dq, dk, dv = tangents[:3]
    if all(type(t) is ad.Zero for t in (dq, dk, dv)):
        return [out, lse], [ad.Zero.from_primal_value(out), ad.Zero.from_primal_value(lse)]
    dq, dk, dv = (
        _zeros_like_aval(p) if type(t) is ad.Zero else t
        for p, t in zip((q, k, v), (dq, dk, dv), strict=True)
    )
    d_out, d_lse = attention_tangent_p.bind(
        q, k, v, out, lse, *rest, dq, dk, dv,
        kernels=kernels, config=config, tree=tree, has_seg=has_seg,
    )  # fmt: skip
    return [out, lse], [d_out, d_lse]


def _tangent_transpose(cts, q, k, v, out, lse, *rest, kernels, config, tree, has_seg):
    *fixed, dq, dk, dv = rest
    mask, qs, ks, _ = _split(fixed, tree, has_seg)
    if any(ad.is_undefined_primal(x) for x in (q, k, v, out, lse, *fixed)):
        raise ValueError(
            "block_sparse_attention's tangent is linear in (dq, dk, dv) only; it cannot be "
            "transposed in q, k, v or the mask"
        )
    ct_out, ct_lse = cts
    if type(ct_out) is ad.Zero and type(ct_lse) is ad.Zero:
        return [None] * (5 + len(fixed)) + [None, None, None]
    ct_out = jnp.zeros(out.shape, out.dtype) if type(ct_out) is ad.Zero else ct_out
    ct_lse = jnp.zeros(lse.shape, lse.dtype) if type(ct_lse) is ad.Zero else ct_lse
    gq, gk, gv = kernels.backward(q, k, v, out, lse, ct_out, ct_lse, mask, qs, ks, config=config)
    result = []
    for primal, g in zip((dq, dk, dv), (gq, gk, gv), strict=True):
        result.append(g.astype(primal.aval.dtype) if ad.is_undefined_primal(primal) else None)
    return [None] * (5 + len(fixed)) + result


def _tangent_jvp(primals, tangents, *, kernels, config, tree, has_seg):
    """Second order: differentiate the (pure jnp) XLA tangent."""
    del kernels
    tangents = [
        _zeros_like_aval(p) if type(t) is ad.Zero else t
        for p, t in zip(primals, tangents, strict=True)
    ]
    float_idx = [
        i for i, p in enumerate(primals) if jnp.issubdtype(jax.typeof(p).dtype, jnp.floating)
    ]

    def fn(*floats):
        args = list(primals)
        for i, x in zip(float_idx, floats, strict=True):
            args[i] = x
        q, k, v, out, lse, *rest = args
        mask, qs, ks, (dq, dk, dv) = _split(rest, tree, has_seg)
        return _TANGENT[0](q, k, v, out, lse, dq, dk, dv, mask, qs, ks, config=config)

    primal_out, tangent_out = jax.jvp(
        fn, [primals[i] for i in float_idx], [tangents[i] for i in float_idx]
    )
    return list(primal_out), list(tangent_out)


ad.primitive_jvps[attention_p] = _attention_jvp
ad.primitive_jvps[attention_tangent_p] = _tangent_jvp
ad.primitive_transposes[attention_tangent_p] = _tangent_transpose


# ------------------------------------------------------------------ batching
def _batch(prim, args, dims, params, n_dense_front: int, n_dense_back: int):
    """Fold a batch of the dense operands (the first ``n_dense_front`` and the last
    ``n_dense_back`` arguments, and segment ids) into their batch axis; anything else
    batched (the mask) is a ``lax.map``."""
    n_leaves = params["tree"].num_leaves
    has_seg = params["has_seg"]
    dense_idx = list(range(n_dense_front))
    mask_idx = list(range(n_dense_front, n_dense_front + n_leaves))
    after = n_dense_front + n_leaves
    dense_idx += list(range(after, len(args)))  # segment ids and trailing tangents
    del has_seg, n_dense_back
    if any(dims[i] is not None for i in mask_idx):
        mapped = [i for i, d in enumerate(dims) if d is not None]
        moved = [jnp.moveaxis(args[i], dims[i], 0) for i in mapped]

        def one(sliced):
            full = list(args)
            for i, s in zip(mapped, sliced, strict=True):
                full[i] = s
            return prim.bind(*full, **params)

        return lax.map(one, moved), [0] * (2)
    size = next(args[i].shape[dims[i]] for i in dense_idx if dims[i] is not None)
    new = list(args)
    for i in dense_idx:
        x = args[i]
        x = (
            jnp.moveaxis(x, dims[i], 0)
            if dims[i] is not None
            else jnp.broadcast_to(x, (size, *x.shape))
        )
        new[i] = x.reshape(size * x.shape[1], *x.shape[2:])
    outs = prim.bind(*new, **params)
    return [o.reshape(size, o.shape[0] // size, *o.shape[1:]) for o in outs], [0, 0]


def _attention_batch(args, dims, **params):
    return _batch(attention_p, args, dims, params, 3, 0)


def _tangent_batch(args, dims, **params):
    return _batch(attention_tangent_p, args, dims, params, 5, 3)


batching.primitive_batchers[attention_p] = _attention_batch
batching.primitive_batchers[attention_tangent_p] = _tangent_batch


# ------------------------------------------------------------------ registration
def register_attention_impl(
    name: str,
    kernels: AttentionKernels,
    *,
    supports: Callable | None = None,
    platform: str | None = None,
) -> None:
    """Register ``kernels`` as implementation ``name`` of block-sparse attention.

    The registered function binds the primitives above, so the implementation gets
    ``grad``, ``jvp`` and ``vmap`` from this module.

    Args:
      name: the implementation's name (``impl=name``), e.g. ``"pallas"``.
      kernels: its :class:`AttentionKernels`.
      supports: ``supports(q, k, v, mask, q_segment_ids, kv_segment_ids, *, config)
        -> str | None`` on the padded arguments: None when the kernels handle them,
        else the reason.
      platform: ``"cuda"``, ``"rocm"``, ``"tpu"`` or ``"cpu"``, or None (every platform).

    Example:
      >>> from jsparse.attention.kernels import register_attention_impl
      >>> from jsparse.attention.xla import XLA_KERNELS
      >>> register_attention_impl("xla_again", XLA_KERNELS)
      >>> import jsparse, jsparse.attention as ja
      >>> "xla_again" in jsparse.implementations("block_sparse_attention", ja.BlockMask)
      True
    """
    from jsparse.attention.block_mask import BlockMask

    if not isinstance(kernels, AttentionKernels):
        raise TypeError(f"kernels must be an AttentionKernels, got {type(kernels).__name__}")

    def run(q, k, v, mask, q_seg, kv_seg, *, config):
        return attention(kernels, config, q, k, v, mask, q_seg, kv_seg)

    run.__name__ = f"attention_{name}"
    register_impl(OP, BlockMask, name, run, supports=supports, platform=platform)
