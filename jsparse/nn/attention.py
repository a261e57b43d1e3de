"""``SparseMultiHeadAttention``: :class:`flax.nnx.MultiHeadAttention` computed by
block-sparse attention (:func:`jsparse.attention.block_sparse_attention`).

The layer *is* an ``nnx.MultiHeadAttention`` (a subclass: same constructor
arguments, same parameters and submodules ``query``, ``key``, ``value``, ``out``,
same call signature), so it loads the same weights and replaces the dense layer in
a model. What it adds is the attention pattern: a
:class:`~jsparse.attention.BlockMask` or mask functions, given at construction
and/or at call time, over which attention is computed without an ``L x S`` score
matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.module import first_from
from flax.nnx.nn import dtypes

from jsparse.attention import BlockMask, as_mask_fn, block_sparse_attention, causal, full

__all__ = ["AttentionMask", "SparseMultiHeadAttention"]


class AttentionMask(nnx.Variable):
    """The :class:`~jsparse.attention.BlockMask` a :class:`SparseMultiHeadAttention`
    stores (a non-trainable variable: ``nnx.Optimizer(..., wrt=nnx.Param)`` never sees
    it). Replacing it by a mask of the same array shapes does not recompile a jitted
    step (:meth:`~jsparse.attention.BlockMask.unify` pads masks to common shapes).

    Example:
      >>> from flax import nnx
      >>> import jsparse.attention as ja
      >>> from jsparse.nn import AttentionMask, SparseMultiHeadAttention
      >>> mask = ja.BlockMask.from_fn(ja.causal(), 8, 8, block_size=(4, 4))
      >>> layer = SparseMultiHeadAttention(2, 8, mask=mask, rngs=nnx.Rngs(0))
      >>> list(nnx.state(layer, AttentionMask))
      ['block_mask']
    """


# A mask the layer was given: a BlockMask, mask function(s) (block masks are built
# per sequence length, at trace time), or None (every key).
MaskSpec = BlockMask | Callable | Sequence[Callable] | None


def _is_mask_fns(mask) -> bool:
    return callable(mask) or (
        isinstance(mask, list | tuple) and len(mask) > 0 and all(callable(f) for f in mask)
    )


def _check_mask_spec(mask, what: str) -> None:
    if mask is None or isinstance(mask, BlockMask) or _is_mask_fns(mask):
        return
    raise TypeError(
        f"{what} must be a jsparse.attention.BlockMask, a mask function f(q_idx, kv_idx), "
        f"a list of mask functions (one per head) or None; got {type(mask).__name__}"
    )


def _and_causal(mask):
    """``mask & causal()`` for mask functions (one or one per head)."""
    if mask is None:
        return causal()
    if isinstance(mask, list | tuple):
        return [as_mask_fn(f) & causal() for f in mask]
    return as_mask_fn(mask) & causal()


class SparseMultiHeadAttention(nnx.MultiHeadAttention):
    """Multi-head attention over a block-sparse pattern; a drop-in for
    :class:`flax.nnx.MultiHeadAttention`.

    Same constructor arguments as ``nnx.MultiHeadAttention`` (``num_heads``,
    ``in_features``, ``qkv_features``, ``out_features``, ``num_kv_heads`` for
    grouped-query attention, ``in_kv_features``, ``dtype``, ``param_dtype``,
    ``kernel_init`` ... ``rngs``; see its documentation), the same parameters
    (``query``, ``key``, ``value``, ``out``, optional ``query_ln``/``key_ln``) and the
    same call, ``layer(inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
    deterministic=None, rngs=None, sow_weights=False, decode=None, is_causal=False,
    out_sharding=None, qkv_sharding=None)``. Attention runs through
    :func:`jsparse.attention.block_sparse_attention` over the stored blocks of the
    pattern only.

    **The pattern.** ``mask`` at construction and/or at call time is a
    :class:`~jsparse.attention.BlockMask` (its lengths must be the call's), a mask
    function ``f(q_idx, kv_idx) -> bool`` (:func:`~jsparse.attention.causal`,
    :func:`~jsparse.attention.local` ... combined with ``&`` and ``|``) or a list of
    them (one per head); mask functions are turned into block masks of
    ``block_size`` for each call's lengths, when the call is traced (no ``L x S``
    array). A call's ``mask`` replaces the layer's; ``is_causal=True`` intersects the
    mask functions with ``causal()``. No mask: every key (then ``impl="auto"`` runs
    dense attention). For compatibility, a call's ``mask`` may also be a dense
    boolean array as ``nnx.MultiHeadAttention`` takes it (broadcastable to
    ``(batch..., heads, L, S)``): it is combined with the layer's pattern and
    attention is computed densely (``L x S``; no sparsity gain).

    **Projections** are the parent's ``nnx.LinearGeneral`` layers;
    :func:`jsparse.nn.sparsify` turns them into any jsparse layer (BCSR, N:M,
    Monarch ...), e.g. ``sparsify(layer, format="bcsr", sparsity=0.5, block_shape=(16,
    16))``.

    **Decoding** (``decode=True`` after :meth:`init_cache`, one token per call) works
    as for ``nnx.MultiHeadAttention``: the token at cache position ``i`` attends to
    the cached keys ``j <= i`` that the pattern allows (row ``i`` of a block mask of
    the cache's length, or the mask functions at ``(i, j)``), densely over that one
    row.

    Not supported (a ``ValueError`` says so): attention dropout while not
    deterministic and ``sow_weights=True`` (the attention weights are never formed),
    a custom ``attention_fn``, ``is_causal=True`` with a prebuilt ``BlockMask``
    (build it with ``causal()`` instead).

    Args (besides ``nnx.MultiHeadAttention``'s):
      mask: the layer's pattern (see above), or None.
      block_size: ``(bq, bk)`` of the block masks built from mask functions.
      logits_soft_cap: ``c``: logits become ``c * tanh(logits / c)`` (None: off).
      impl: :func:`~jsparse.attention.block_sparse_attention`'s ``impl``
        (``"auto"``, ``"xla"``, ``"dense"``, ``"pallas"``).

    Raises:
      TypeError: a mask of another type, or a custom ``attention_fn``.
      ValueError: as ``nnx.MultiHeadAttention`` (heads that do not divide), or a bad
        ``block_size``.

    Example:
      Local + global-token attention; with a full pattern it is
      ``nnx.MultiHeadAttention`` exactly (the same parameters):

      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import jsparse.attention as ja
      >>> from jsparse.nn import SparseMultiHeadAttention
      >>> layer = SparseMultiHeadAttention(
      ...     num_heads=4, in_features=32, mask=ja.local(15, 15) | ja.global_tokens(4),
      ...     block_size=(16, 16), decode=False, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(1), (2, 128, 32))
      >>> layer(x).shape
      (2, 128, 32)
      >>> dense = nnx.MultiHeadAttention(num_heads=4, in_features=32, decode=False,
      ...                                rngs=nnx.Rngs(0))
      >>> bool(jnp.allclose(layer(x, mask=ja.full()), dense(x), atol=1e-5))
      True
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        num_kv_heads: int | None = None,
        in_kv_features: int | None = None,
        *,
        mask: MaskSpec = None,
        block_size: tuple[int, int] = (128, 128),
        logits_soft_cap: float | None = None,
        impl: str = "auto",
        attention_fn: Callable[..., jax.Array] | None = None,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ):
        if attention_fn is not None:
            raise TypeError(
                "SparseMultiHeadAttention computes attention with "
                "jsparse.attention.block_sparse_attention; it takes no attention_fn "
                "(use nnx.MultiHeadAttention for a custom one)"
            )
        _check_mask_spec(mask, "mask")
        try:
            bq, bk = block_size
        except (TypeError, ValueError):
            raise ValueError(f"block_size must be a pair (bq, bk), got {block_size!r}") from None
        if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in (bq, bk)):
            raise ValueError(f"block_size must be two positive ints, got {block_size!r}")
        if logits_soft_cap is not None and not logits_soft_cap > 0:
            raise ValueError(f"logits_soft_cap must be positive, got {logits_soft_cap}")
        super().__init__(
            num_heads, in_features, qkv_features, out_features, num_kv_heads,
            in_kv_features, rngs=rngs, **kwargs,
        )  # fmt: skip
        self.block_size = (int(bq), int(bk))
        self.logits_soft_cap = None if logits_soft_cap is None else float(logits_soft_cap)
        self.impl = impl
        if isinstance(mask, BlockMask):
            self._check_heads(mask)
            self.block_mask = AttentionMask(mask)
            self.mask_fn = None
        else:
            self.block_mask = nnx.data(None)
            self.mask_fn = mask

    # ------------------------------------------------------------------ masks
    def _check_heads(self, mask: BlockMask) -> None:
        if mask.num_heads not in (1, self.num_heads):
            raise ValueError(
                f"the block mask has {mask.num_heads} heads; it must have 1 (shared) or "
                f"num_heads={self.num_heads}"
            )

    def _layer_mask(self):
        return self.block_mask.get_value() if self.block_mask is not None else self.mask_fn

    def _block_mask(self, spec, q_len: int, kv_len: int, is_causal: bool) -> BlockMask:
        """The block mask of one call from a mask spec (BlockMask, fns or None)."""
        if isinstance(spec, BlockMask):
            if is_causal:
                raise ValueError(
                    "is_causal=True cannot be combined with a prebuilt BlockMask; build the "
                    "mask with jsparse.attention.causal() & ... instead"
                )
            self._check_heads(spec)
            if (spec.q_len, spec.kv_len) != (q_len, kv_len):
                raise ValueError(
                    f"the block mask was built for q_len={spec.q_len}, kv_len={spec.kv_len}, "
                    f"but the inputs have lengths {q_len} and {kv_len}"
                )
            return spec
        fns = _and_causal(spec) if is_causal else (full() if spec is None else spec)
        if isinstance(fns, list | tuple) and len(fns) not in (1, self.num_heads):
            raise ValueError(
                f"got {len(fns)} mask functions; pass one, or one per head "
                f"(num_heads={self.num_heads})"
            )
        return BlockMask.from_fn(fns, q_len, kv_len, block_size=self.block_size)

    def _dense_mask(self, spec, q_len: int, kv_len: int, q_pos=None) -> jax.Array | None:
        """``(Hm, Lq, S)`` boolean of a mask spec (rows ``q_pos`` only if given)."""
        if spec is None:
            return None
        if isinstance(spec, BlockMask):
            if q_pos is None:
                return spec.to_dense()
            return _block_mask_row(spec, q_pos)[:, None, :]
        fns = spec if isinstance(spec, list | tuple) else [spec]
        rows = jnp.arange(q_len)[:, None] if q_pos is None else jnp.reshape(q_pos, (1, 1))
        cols = jnp.arange(kv_len)[None, :]
        return jnp.stack(
            [jnp.broadcast_to(jnp.asarray(f(rows, cols), bool), (rows.shape[0], kv_len))
             for f in fns]
        )  # fmt: skip

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_k: jax.Array | None = None,
        inputs_v: jax.Array | None = None,
        *,
        mask=None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
        out_sharding=None,
        qkv_sharding=None,
        segment_ids=None,
    ) -> jax.Array:
        """Project, attend over the pattern, project back.

        Args:
          inputs_q: ``(batch..., L, in_features)``.
          inputs_k, inputs_v: ``(batch..., S, in_kv_features)``; default: ``inputs_q``
            (self-attention) and ``inputs_k``.
          mask: this call's pattern (replaces the layer's): a ``BlockMask``, mask
            function(s), or a dense boolean array (dense attention; see the class).
          deterministic, rngs: as ``nnx.MultiHeadAttention`` (dropout must be off).
          sow_weights: must be False (the weights are never formed).
          decode: autoregressive decoding with the cache (see the class).
          is_causal: intersect the mask functions with ``causal()``.
          out_sharding, qkv_sharding: passed to the projections.
          segment_ids: ``block_sparse_attention``'s (``(batch, L)`` or a pair), for
            packed sequences; only with one batch axis.

        Returns:
          ``(batch..., L, out_features)``.

        Raises:
          ValueError: wrong input features, dropout or ``sow_weights`` requested, a
            block mask for other lengths, an uninitialised or mismatched cache.
          TypeError: a mask of another type.

        Example:
          >>> import jax.numpy as jnp
          >>> from flax import nnx
          >>> import jsparse.attention as ja
          >>> from jsparse.nn import SparseMultiHeadAttention
          >>> layer = SparseMultiHeadAttention(2, 8, block_size=(4, 4), decode=False,
          ...                                  rngs=nnx.Rngs(0))
          >>> layer(jnp.ones((3, 16, 8)), mask=ja.local(3), is_causal=True).shape
          (3, 16, 8)
        """
        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError(
                    "inputs_k cannot be None if inputs_v is not None; to use one array for "
                    "both, pass it as inputs_k and leave inputs_v None"
                )
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(
                f"inputs_q has {inputs_q.shape[-1]} features, but the layer expects "
                f"in_features={self.in_features}"
            )
        if sow_weights:
            raise ValueError(
                "SparseMultiHeadAttention never forms the attention weights: sow_weights=True "
                "is not supported (use nnx.MultiHeadAttention to inspect them)"
            )
        if not hasattr(mask, "shape"):  # a dense array is the other accepted form
            _check_mask_spec(mask, "mask")
        dropout_rng = self._dropout_rng(deterministic, rngs)

        query = self.query(inputs_q, out_sharding=qkv_sharding)
        key = self.key(inputs_k, out_sharding=qkv_sharding)
        value = self.value(inputs_v, out_sharding=qkv_sharding)
        if self.normalize_qk:
            query, key = self.query_ln(query), self.key_ln(key)
        # as nnx.dot_product_attention does
        query, key, value = dtypes.promote_dtype((query, key, value), dtype=self.dtype)

        decode = first_from(
            decode, self.decode,
            error_msg="No `decode` argument was provided to SparseMultiHeadAttention as "
            "either a __call__ argument, class attribute, or nnx.flag.",
        )  # fmt: skip
        spec = self._layer_mask() if mask is None else mask
        if decode:
            x = self._decode_step(query, key, value, spec, is_causal)
        elif hasattr(spec, "shape") and not isinstance(spec, BlockMask):
            x = self._dense_attention(query, key, value, spec, is_causal, dropout_rng)
        else:
            if dropout_rng is not None:
                raise ValueError(
                    "SparseMultiHeadAttention has no attention dropout (the weights are never "
                    "formed): use dropout_rate=0, or deterministic=True"
                )
            x = self._sparse_attention(query, key, value, spec, is_causal, segment_ids)
        return self.out(x, out_sharding=out_sharding)

    def _dropout_rng(self, deterministic, rngs):
        if not self.dropout_rate > 0.0:
            return None
        deterministic = first_from(
            deterministic, self.deterministic,
            error_msg="No `deterministic` argument was provided to SparseMultiHeadAttention "
            "as either a __call__ argument, class attribute, or nnx.flag.",
        )  # fmt: skip
        if deterministic:
            return None
        if rngs is None:
            rngs = self.rngs
        elif isinstance(rngs, nnx.Rngs):
            rngs = rngs.dropout
        if rngs is None:
            raise ValueError(
                "rngs must be given to __call__ when dropout is active and the layer was made "
                "with keep_rngs=False"
            )
        return rngs()

    def _sparse_attention(self, query, key, value, spec, is_causal, segment_ids):
        *batch, q_len, h, d = query.shape
        kv_len = key.shape[-3]
        block_mask = self._block_mask(spec, q_len, kv_len, is_causal)
        if segment_ids is not None and len(batch) != 1:
            raise ValueError(
                f"segment_ids needs inputs with exactly one batch axis, got batch shape "
                f"{tuple(batch)}"
            )
        b = math.prod(batch)
        q4 = query.reshape(b, q_len, h, d)
        k4 = key.reshape(b, kv_len, *key.shape[-2:])
        v4 = value.reshape(b, kv_len, *value.shape[-2:])
        out = block_sparse_attention(
            q4, k4, v4, block_mask, segment_ids=segment_ids,
            logits_soft_cap=self.logits_soft_cap, impl=self.impl,
        )  # fmt: skip
        return out.reshape(*batch, q_len, h, d)

    def _dense_attention(self, query, key, value, dense_mask, is_causal, dropout_rng):
        """A dense boolean mask (nnx's form): combined with the layer's pattern and
        computed densely, as ``nnx.MultiHeadAttention`` would."""
        q_len, kv_len = query.shape[-3], key.shape[-3]
        layer = self._layer_mask()
        if isinstance(layer, BlockMask) and (layer.q_len, layer.kv_len) != (q_len, kv_len):
            raise ValueError(
                f"the layer's block mask was built for q_len={layer.q_len}, kv_len="
                f"{layer.kv_len}, but the inputs have lengths {q_len} and {kv_len}"
            )
        pattern = self._dense_mask(layer, q_len, kv_len)
        combined = jnp.asarray(dense_mask, bool)
        if pattern is not None:
            combined = jnp.logical_and(combined, pattern)
        return self._dense_call(query, key, value, combined, is_causal, dropout_rng)

    def _dense_call(self, query, key, value, mask, is_causal, dropout_rng):
        cap = self.logits_soft_cap
        if cap is not None:
            raise ValueError(
                "logits_soft_cap is not available on the dense path (a dense mask array or "
                "decoding); pass the mask as a BlockMask or mask function"
            )
        return nnx.dot_product_attention(
            query, key, value, mask=mask, dropout_rng=dropout_rng,
            dropout_rate=self.dropout_rate, broadcast_dropout=self.broadcast_dropout,
            deterministic=dropout_rng is None, dtype=self.dtype, precision=self.precision,
            is_causal=is_causal,
        )  # fmt: skip

    def _decode_step(self, query, key, value, spec, is_causal):
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError("Autoregressive cache not initialized, call ``init_cache`` first.")
        *batch, max_length, num_kv_heads, head_dim = self.cached_key.shape
        expected = (*batch, 1, num_kv_heads, head_dim)
        if key.shape != expected:
            raise ValueError(
                f"Autoregressive cache shape error, expected key shape {expected} instead got "
                f"{key.shape}."
            )
        if hasattr(spec, "shape") and not isinstance(spec, BlockMask):
            raise ValueError(
                "a dense mask array cannot be combined with decoding; pass a BlockMask of the "
                "cache's length or mask functions"
            )
        if isinstance(spec, BlockMask) and (spec.q_len, spec.kv_len) != (max_length,) * 2:
            raise ValueError(
                f"decoding needs a block mask of the cache's length {max_length}, got q_len="
                f"{spec.q_len}, kv_len={spec.kv_len}"
            )
        if isinstance(spec, BlockMask) and is_causal:
            raise ValueError(
                "is_causal=True cannot be combined with a prebuilt BlockMask; build the mask "
                "with jsparse.attention.causal() & ... instead"
            )
        index = self.cache_index[...]
        zero = jnp.zeros((), index.dtype)
        at = (zero,) * len(batch) + (index, zero, zero)
        key = jax.lax.dynamic_update_slice(self.cached_key[...], key, at)
        value = jax.lax.dynamic_update_slice(self.cached_value[...], value, at)
        self.cached_key[...] = key
        self.cached_value[...] = value
        self.cache_index[...] += 1
        cols = jnp.arange(max_length)
        row = (cols <= index)[None, None, :]  # (1, 1, S): the cached positions
        pattern = self._dense_mask(spec, 1, max_length, q_pos=index)
        if pattern is not None:
            row = jnp.logical_and(row, pattern)  # (Hm, 1, S)
        mask = jnp.broadcast_to(row, (*batch, row.shape[0], 1, max_length))
        return self._dense_call(query, key, value, mask, False, None)


def _block_mask_row(mask: BlockMask, q_pos) -> jax.Array:
    """Row ``q_pos`` (traced int) of a block mask, ``(Hm, kv_len)`` bool, in ``O(S)``."""
    bq, bk = mask.block_size
    nq, nk = mask.num_blocks
    hm = mask.num_heads
    i, r = q_pos // bq, q_pos % bq
    h = jnp.arange(hm)[:, None]

    def scatter(ids, count, values, fill):
        valid = jnp.arange(ids.shape[-1]) < count[:, i, None]
        cols = jnp.where(valid, ids[:, i], nk)  # out of range: dropped
        return jnp.full((hm, nk), fill, values.dtype).at[h, cols].set(values, mode="drop")

    is_full = scatter(mask.full_kv, mask.full_count, jnp.ones_like(mask.full_kv[:, i], bool),
                      False)  # fmt: skip
    tile = scatter(mask.partial_kv, mask.partial_count, mask.partial_mask[:, i], -1)
    rows = mask.mask_blocks[jnp.maximum(tile, 0), r]  # (Hm, nk, bk)
    keep = jnp.where((tile >= 0)[..., None], rows, is_full[..., None])
    return keep.reshape(hm, nk * bk)[:, : mask.kv_len]
