"""The XLA implementation of block-sparse attention (the CPU path and the reference),
and the ``"dense"`` implementation.

Every pass is a ``lax.scan`` over the slots of the mask's :class:`XlaPlan
<jsparse.attention.block_mask.XlaPlan>`: each step gathers one key (or query) block
per virtual row and updates every virtual row at once, so XLA runs large batched
dots (batch ``B * H * R``, ``bq x D x bk`` each). Nothing of size ``L x S`` is formed:

* **forward**: online softmax per virtual row (running max ``m``, sum ``l``,
  accumulator), full blocks without an element mask, partial blocks with theirs;
  the virtual rows of a query block are merged by log-sum-exp;
* **backward** (the transpose of the tangent): ``dq`` over the row view, ``dk`` and
  ``dv`` over the transposed view, probabilities recomputed from the saved ``lse``;
* **tangent** (forward mode): one pass over the row view.

Accumulation is in float32 (float64 for float64 inputs); results are in the input
dtype. A row that attends to nothing gets output 0 and ``lse = -inf``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jsparse.attention.block_mask import BlockMask
from jsparse.attention.kernels import (
    OP,
    AttentionKernels,
    register_attention_impl,
    set_tangent_kernel,
)
from jsparse.core.registry import register_impl

__all__ = ["XLA_KERNELS", "backward", "dense", "forward", "tangent"]


# ------------------------------------------------------------------ layout helpers
class _Geo:
    """Shapes and layouts of one call.

    Inside, query-side data are ``(B, Hx, n, Gx * bq, ...)``: with a shared mask
    ``Hx = H_kv`` and the ``Gx = H / H_kv`` query heads of a key head are stacked
    along the rows (one dot serves the whole group); with per-head masks ``Hx = H``,
    ``Gx = 1``. Key-side data are ``(B, H_kv, nk, bk, D)``, gathered per step into
    ``(B, Hx, R, bk, D)``. Every dot is a batched 3-D ``dot_general`` over
    ``B * Hx * R``: XLA:CPU runs those fastest.
    """

    def __init__(self, q, k, mask: BlockMask, config):
        self.b, lp, self.h, self.d = q.shape
        self.hkv = k.shape[2]
        self.g = self.h // self.hkv
        self.bq, self.bk = config.block_size
        self.nq, self.nk = lp // self.bq, k.shape[1] // self.bk
        self.hm = mask.num_heads
        self.shared = self.hm == 1
        self.hx = self.hkv if self.shared else self.h
        self.gx = self.g if self.shared else 1
        self.cdt = jnp.promote_types(q.dtype, jnp.float32)
        self.scale = config.scale
        self.cap = config.logits_soft_cap
        self.h_idx = jnp.arange(self.h)[:, None]
        self.kv_head = (jnp.arange(self.h) // self.g)[:, None]

    # public layouts <-> internal ones
    def q_blocks(self, x):  # (B, Lp, H, D) -> (B, Hx, nq, Gx*bq, D)
        x = x.astype(self.cdt).reshape(self.b, self.nq, self.bq, self.hkv, self.g, self.d)
        x = x.transpose(0, 3, 1, 4, 2, 5) if self.shared else x.transpose(0, 3, 4, 1, 2, 5)
        return x.reshape(self.b, self.hx, self.nq, self.gx * self.bq, self.d)

    def q_unblocks(self, x, dtype):  # inverse of q_blocks
        if self.shared:
            x = x.reshape(self.b, self.hkv, self.nq, self.g, self.bq, self.d)
            x = x.transpose(0, 2, 4, 1, 3, 5)
        else:
            x = x.reshape(self.b, self.hkv, self.g, self.nq, self.bq, self.d)
            x = x.transpose(0, 3, 4, 1, 2, 5)
        return x.reshape(self.b, self.nq * self.bq, self.h, self.d).astype(dtype)

    def row_blocks(self, x):  # (B, H, Lp) -> (B, Hx, nq, Gx*bq)
        x = x.astype(self.cdt).reshape(self.b, self.hkv, self.g, self.nq, self.bq)
        if self.shared:
            x = x.transpose(0, 1, 3, 2, 4)
        return x.reshape(self.b, self.hx, self.nq, self.gx * self.bq)

    def row_unblocks(self, x):
        x = x.reshape(self.b, self.hkv, self.nq, self.g, self.bq) if self.shared else x
        if self.shared:
            x = x.transpose(0, 1, 3, 2, 4)
        return x.reshape(self.b, self.h, self.nq * self.bq)

    def kv_blocks(self, x):  # (B, Sp, Hkv, D) -> (B, Hkv, nk, bk, D)
        x = x.astype(self.cdt).reshape(self.b, self.nk, self.bk, self.hkv, self.d)
        return x.transpose(0, 3, 1, 2, 4)

    def kv_unblocks(self, x, dtype):  # (B, Hx, nk, bk, D) -> (B, Sp, Hkv, D)
        if not self.shared:
            x = x.reshape(self.b, self.hkv, self.g, self.nk, self.bk, self.d).sum(2)
        x = x.transpose(0, 2, 3, 1, 4).reshape(self.b, self.nk * self.bk, self.hkv, self.d)
        return x.astype(dtype)

    # gathers by per-head block ids (Hm, R)
    def take_rows(self, x, idx):
        """Query-side blocks ``x`` (B, Hx, n, ...) at ``idx`` -> (B, Hx, R, ...)."""
        return x[:, :, idx[0]] if self.shared else x[:, self.h_idx, idx]

    def take_kv(self, x, idx):
        """Key-side blocks ``x`` (B, Hkv, n, ...) at ``idx`` -> (B, Hx, R, ...)."""
        return x[:, :, idx[0]] if self.shared else x[:, self.kv_head, idx]

    def heads(self, x):
        """A per-mask-head array (Hm, R, ...) broadcastable against (B, Hx, R, ...)."""
        return x[0][None, None] if self.shared else x[None]

    def take_seg(self, s, idx):
        """Segment ids per block ``s`` (B, n, b) at ``idx`` -> (B, 1 or Hx, R, b)."""
        return s[:, idx[0]][:, None] if self.shared else s[:, idx]

    # batched 3-D dots over the leading (B, Hx, R)
    def _dot(self, a, b, ca, cb):
        lead = a.shape[:3]
        out = lax.dot_general(
            a.reshape(-1, *a.shape[3:]),
            b.reshape(-1, *b.shape[3:]),
            (((ca,), (cb,)), ((0,), (0,))),
            preferred_element_type=self.cdt,
        )
        return out.reshape(*lead, *out.shape[1:])

    def qk(self, a, kb):  # (.., M, D) x (.., bk, D) -> (.., M, bk)
        return self._dot(a, kb, 2, 2)

    def pv(self, p, vb):  # (.., M, bk) x (.., bk, D) -> (.., M, D)
        return self._dot(p, vb, 2, 1)

    def kt(self, p, a):  # (.., M, bk)^T x (.., M, D) -> (.., bk, D)
        return self._dot(p, a, 1, 1)

    # scores of one step
    def scores(self, a, kb, valid, mid, mask_blocks, q_seg, kv_seg):
        """(logits, tanh or None, ok) for queries ``a`` (B, Hx, R, Gx*bq, D) against
        keys ``kb`` (B, Hx, R, bk, D); ``ok`` broadcasts against the logits."""
        s = self.qk(a, kb) * self.scale
        th = None
        if self.cap is not None:
            th = jnp.tanh(s / self.cap)
            s = self.cap * th
        ok = self.heads(valid)[..., None, None]  # (1, 1|H, R, 1, 1)
        if mid is not None:
            ok = ok & self.heads(mask_blocks[mid])  # (1, 1|H, R, bq, bk)
        if q_seg is not None:
            ok = ok & (q_seg[..., :, None] == kv_seg[..., None, :])  # (B, 1|H, R, bq, bk)
        if self.gx > 1 and ok.shape[3] != 1:  # the query heads of a group share the tile
            ok = jnp.tile(ok, (1, 1, 1, self.gx, 1))
        return s, th, ok


def _slots(ids, count, mask=None):
    """Scan inputs: per slot (T, Hm, R) ids, validity and mask ids."""
    t = ids.shape[-1]
    xs = (jnp.moveaxis(ids, -1, 0), jnp.arange(t)[:, None, None] < count[None])
    return xs + ((jnp.moveaxis(mask, -1, 0),) if mask is not None else ())


def _seg_blocks(seg, n, b):
    return None if seg is None else seg.reshape(seg.shape[0], n, b)


# ------------------------------------------------------------------ forward
def forward(q, k, v, mask: BlockMask, q_seg, kv_seg, *, config):
    """``(out, lse)`` of padded arrays (see :mod:`jsparse.attention.kernels`).

    Example:
      >>> import jax.numpy as jnp, jsparse.attention as ja
      >>> from jsparse.attention.kernels import AttentionConfig
      >>> from jsparse.attention.xla import forward
      >>> m = ja.BlockMask.from_fn(ja.causal(), 4, 4, block_size=(2, 2))
      >>> x = jnp.ones((1, 4, 1, 2))
      >>> out, lse = forward(x, x, x, m, None, None,
      ...                    config=AttentionConfig(1.0, None, 4, 4, (2, 2), 1, 1))
      >>> out[0, :, 0, 0].tolist(), jnp.exp(lse[0, 0] - 2.0).round().tolist()
      ([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])
    """
    geo = _Geo(q, k, mask, config)
    p = mask.plan
    qb, kb, vb = geo.q_blocks(q), geo.kv_blocks(k), geo.kv_blocks(v)
    qsb, ksb = _seg_blocks(q_seg, geo.nq, geo.bq), _seg_blocks(kv_seg, geo.nk, geo.bk)

    def grid(ids, count, owner, mids):
        qv = geo.take_rows(qb, owner)
        q_seg_r = None if qsb is None else geo.take_seg(qsb, owner)
        shape = qv.shape[:-1]
        init = (
            jnp.full(shape, -jnp.inf, geo.cdt),
            jnp.zeros(shape, geo.cdt),
            jnp.zeros((*shape, geo.d), geo.cdt),
        )

        def step(carry, xs):
            m, tot, acc = carry
            kid, valid, *mid = xs
            kv_seg_r = None if ksb is None else geo.take_seg(ksb, kid)
            s, _, ok = geo.scores(
                qv, geo.take_kv(kb, kid), valid, mid[0] if mid else None,
                mask.mask_blocks, q_seg_r, kv_seg_r,
            )  # fmt: skip
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            pr = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            tot = corr * tot + pr.sum(-1)
            acc = corr[..., None] * acc + geo.pv(pr, geo.take_kv(vb, kid))
            return (m_new, tot, acc), None

        (m, tot, acc), _ = lax.scan(step, init, _slots(ids, count, mids))
        return m, tot, acc

    mf, lf, af = grid(p.rf_ids, p.rf_count, p.rf_owner, None)
    mp, lp, ap = grid(p.rp_ids, p.rp_count, p.rp_owner, p.rp_mask)
    m = _merge_rows(geo, p.row_merge, mf, mp, -jnp.inf)
    tot = _merge_rows(geo, p.row_merge, lf, lp, 0.0)
    acc = _merge_rows(geo, p.row_merge, af, ap, 0.0)
    m_max = m.max(axis=3)
    m_safe = jnp.where(jnp.isneginf(m_max), 0.0, m_max)
    w = jnp.exp(m - m_safe[:, :, :, None])
    tot = (w * tot).sum(3)
    acc = (w[..., None] * acc).sum(3)
    has = tot > 0
    l_safe = jnp.where(has, tot, 1.0)
    out = jnp.where(has[..., None], acc / l_safe[..., None], 0.0)
    lse = jnp.where(has, m_safe + jnp.log(l_safe), -jnp.inf)
    return geo.q_unblocks(out, q.dtype), geo.row_unblocks(lse)


def _merge_rows(geo: _Geo, merge, full, part, fill):
    """Virtual-row results (B, Hx, R, ...) of both grids -> (B, Hx, n, V, ...) per
    query (or key) block, ``fill`` for padding; reduce over axis 3 afterwards."""
    empty = jnp.full(full.shape[:2] + (1,) + full.shape[3:], fill, full.dtype)
    rows = jnp.concatenate([full, part, empty], axis=2)
    n, v = merge.shape[1:]
    out = geo.take_rows(rows, merge.reshape(merge.shape[0], n * v))
    return out.reshape(*out.shape[:2], n, v, *out.shape[3:])


# ------------------------------------------------------------------ backward
def backward(q, k, v, out, lse, d_out, d_lse, mask: BlockMask, q_seg, kv_seg, *, config):
    """``(dq, dk, dv)`` of padded arrays: the transpose of the tangent.

    ``dq`` from the row view, ``dk, dv`` from the transposed view; probabilities are
    recomputed from ``lse`` (``p = exp(logits - lse)``), ``delta = rowsum(d_out * out)``.

    Example:
      >>> import jax.numpy as jnp, jsparse.attention as ja
      >>> from jsparse.attention.kernels import AttentionConfig
      >>> from jsparse.attention.xla import backward, forward
      >>> m = ja.BlockMask.from_fn(ja.causal(), 4, 4, block_size=(2, 2))
      >>> c = AttentionConfig(1.0, None, 4, 4, (2, 2), 1, 1)
      >>> x = jnp.ones((1, 4, 1, 2))
      >>> out, lse = forward(x, x, x, m, None, None, config=c)
      >>> dq, dk, dv = backward(x, x, x, out, lse, jnp.ones_like(out), jnp.zeros_like(lse),
      ...                       m, None, None, config=c)
      >>> [round(float(x), 3) for x in dv[0, :, 0, 0]]
      [2.083, 1.083, 0.583, 0.25]
    """
    geo = _Geo(q, k, mask, config)
    p = mask.plan
    qb, kb, vb = geo.q_blocks(q), geo.kv_blocks(k), geo.kv_blocks(v)
    dob = geo.q_blocks(d_out)
    ob = geo.q_blocks(out)
    lse_b = geo.row_blocks(lse)
    lse_b = jnp.where(jnp.isfinite(lse_b), lse_b, 0.0)
    dterm = (dob * ob).sum(-1) - geo.row_blocks(d_lse)  # delta - d_lse
    qsb, ksb = _seg_blocks(q_seg, geo.nq, geo.bq), _seg_blocks(kv_seg, geo.nk, geo.bk)

    def probs(s, th, ok, lse_r, dp, dterm_r):
        pr = jnp.where(ok, jnp.exp(s - lse_r[..., None]), 0.0)
        ds = pr * (dp - dterm_r[..., None])
        if th is not None:
            ds = ds * (1.0 - th * th)
        return pr, ds

    # dq over the row view
    def row_grid(ids, count, owner, mids):
        qv, dov = geo.take_rows(qb, owner), geo.take_rows(dob, owner)
        lse_r, dterm_r = geo.take_rows(lse_b, owner), geo.take_rows(dterm, owner)
        q_seg_r = None if qsb is None else geo.take_seg(qsb, owner)

        def step(acc, xs):
            kid, valid, *mid = xs
            kv_seg_r = None if ksb is None else geo.take_seg(ksb, kid)
            kg, vg = geo.take_kv(kb, kid), geo.take_kv(vb, kid)
            s, th, ok = geo.scores(
                qv, kg, valid, mid[0] if mid else None, mask.mask_blocks, q_seg_r, kv_seg_r
            )
            _, ds = probs(s, th, ok, lse_r, geo.qk(dov, vg), dterm_r)
            return acc + geo.pv(ds, kg), None

        acc, _ = lax.scan(step, jnp.zeros_like(qv), _slots(ids, count, mids))
        return acc

    dq_f = row_grid(p.rf_ids, p.rf_count, p.rf_owner, None)
    dq_p = row_grid(p.rp_ids, p.rp_count, p.rp_owner, p.rp_mask)
    dq = _merge_rows(geo, p.row_merge, dq_f, dq_p, 0.0).sum(3) * geo.scale

    # dk, dv over the transposed view
    def col_grid(ids, count, owner, mids):
        kc, vc = geo.take_kv(kb, owner), geo.take_kv(vb, owner)
        kv_seg_c = None if ksb is None else geo.take_seg(ksb, owner)

        def step(carry, xs):
            dk, dv = carry
            qid, valid, *mid = xs
            qg, dog = geo.take_rows(qb, qid), geo.take_rows(dob, qid)
            lse_g, dterm_g = geo.take_rows(lse_b, qid), geo.take_rows(dterm, qid)
            q_seg_g = None if qsb is None else geo.take_seg(qsb, qid)
            s, th, ok = geo.scores(
                qg, kc, valid, mid[0] if mid else None, mask.mask_blocks, q_seg_g, kv_seg_c
            )
            pr, ds = probs(s, th, ok, lse_g, geo.qk(dog, vc), dterm_g)
            return (dk + geo.kt(ds, qg), dv + geo.kt(pr, dog)), None

        init = (jnp.zeros_like(kc), jnp.zeros_like(vc))
        (dk, dv), _ = lax.scan(step, init, _slots(ids, count, mids))
        return dk, dv

    dk_f, dv_f = col_grid(p.cf_ids, p.cf_count, p.cf_owner, None)
    dk_p, dv_p = col_grid(p.cp_ids, p.cp_count, p.cp_owner, p.cp_mask)
    dk = _merge_rows(geo, p.col_merge, dk_f, dk_p, 0.0).sum(3) * geo.scale
    dv = _merge_rows(geo, p.col_merge, dv_f, dv_p, 0.0).sum(3)
    return (
        geo.q_unblocks(dq, q.dtype),
        geo.kv_unblocks(dk, k.dtype),
        geo.kv_unblocks(dv, v.dtype),
    )


# ------------------------------------------------------------------ forward mode
def tangent(q, k, v, out, lse, dq, dk, dv, mask: BlockMask, q_seg, kv_seg, *, config):
    """``(d_out, d_lse)``: the forward-mode tangent of attention, one pass over the row
    view (probabilities from the saved ``lse``).

    Example:
      >>> import jax.numpy as jnp, jsparse.attention as ja
      >>> from jsparse.attention.kernels import AttentionConfig
      >>> from jsparse.attention.xla import forward, tangent
      >>> m = ja.BlockMask.from_fn(ja.causal(), 4, 4, block_size=(2, 2))
      >>> c = AttentionConfig(1.0, None, 4, 4, (2, 2), 1, 1)
      >>> x, z = jnp.ones((1, 4, 1, 2)), jnp.zeros((1, 4, 1, 2))
      >>> out, lse = forward(x, x, x, m, None, None, config=c)
      >>> d_out, d_lse = tangent(x, x, x, out, lse, z, z, x, m, None, None, config=c)
      >>> bool(jnp.allclose(d_out[0, :, 0, 0], 1.0))
      True
    """
    geo = _Geo(q, k, mask, config)
    p = mask.plan
    qb, kb, vb = geo.q_blocks(q), geo.kv_blocks(k), geo.kv_blocks(v)
    dqb, dkb, dvb = geo.q_blocks(dq), geo.kv_blocks(dk), geo.kv_blocks(dv)
    lse_b = geo.row_blocks(lse)
    lse_b = jnp.where(jnp.isfinite(lse_b), lse_b, 0.0)
    qsb, ksb = _seg_blocks(q_seg, geo.nq, geo.bq), _seg_blocks(kv_seg, geo.nk, geo.bk)

    def grid(ids, count, owner, mids):
        qv, dqv = geo.take_rows(qb, owner), geo.take_rows(dqb, owner)
        lse_r = geo.take_rows(lse_b, owner)
        q_seg_r = None if qsb is None else geo.take_seg(qsb, owner)

        def step(carry, xs):
            a, c = carry
            kid, valid, *mid = xs
            kv_seg_r = None if ksb is None else geo.take_seg(ksb, kid)
            kg, vg = geo.take_kv(kb, kid), geo.take_kv(vb, kid)
            dkg, dvg = geo.take_kv(dkb, kid), geo.take_kv(dvb, kid)
            s, th, ok = geo.scores(
                qv, kg, valid, mid[0] if mid else None, mask.mask_blocks, q_seg_r, kv_seg_r
            )
            pr = jnp.where(ok, jnp.exp(s - lse_r[..., None]), 0.0)
            ds = (geo.qk(dqv, kg) + geo.qk(qv, dkg)) * geo.scale
            if th is not None:
                ds = ds * (1.0 - th * th)
            pds = pr * ds
            return (a + geo.pv(pds, vg) + geo.pv(pr, dvg), c + pds.sum(-1)), None

        init = (jnp.zeros_like(qv), jnp.zeros(qv.shape[:-1], geo.cdt))
        (a, c), _ = lax.scan(step, init, _slots(ids, count, mids))
        return a, c

    af, cf = grid(p.rf_ids, p.rf_count, p.rf_owner, None)
    ap, cp = grid(p.rp_ids, p.rp_count, p.rp_owner, p.rp_mask)
    a = _merge_rows(geo, p.row_merge, af, ap, 0.0).sum(3)
    c = _merge_rows(geo, p.row_merge, cf, cp, 0.0).sum(3)
    d_out = a - c[..., None] * geo.q_blocks(out)
    return geo.q_unblocks(d_out, out.dtype), geo.row_unblocks(c).astype(lse.dtype)


XLA_KERNELS = AttentionKernels(forward=forward, backward=backward)
set_tangent_kernel(tangent)
register_attention_impl("xla", XLA_KERNELS)


# ------------------------------------------------------------------ dense
def dense(q, k, v, mask: BlockMask, q_seg, kv_seg, *, config):
    """The ``"dense"`` implementation: the mask materialised (``mask.to_dense()``) and a
    masked softmax over the whole ``L x S`` score matrix (JAX's autodiff).

    Same arguments and results as the kernels' ``forward`` (padded arrays).

    Example:
      >>> import jax.numpy as jnp, jsparse.attention as ja
      >>> from jsparse.attention.kernels import AttentionConfig
      >>> from jsparse.attention.xla import dense
      >>> m = ja.BlockMask.from_fn(ja.causal(), 4, 4, block_size=(2, 2))
      >>> x = jnp.ones((1, 4, 1, 2))
      >>> out, lse = dense(x, x, x, m, None, None,
      ...                  config=AttentionConfig(1.0, None, 4, 4, (2, 2), 1, 1))
      >>> out[0, :, 0, 0].tolist()
      [1.0, 1.0, 1.0, 1.0]
    """
    b, lp, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    L, S = config.q_len, config.kv_len
    cdt = jnp.promote_types(q.dtype, jnp.float32)
    qs = q[:, :L].astype(cdt).reshape(b, L, hkv, g, d)
    ks, vs = k[:, :S].astype(cdt), v[:, :S].astype(cdt)
    s = jnp.einsum("blhgd,bshd->bhgls", qs, ks) * config.scale
    if config.logits_soft_cap is not None:
        s = config.logits_soft_cap * jnp.tanh(s / config.logits_soft_cap)
    dm = mask.to_dense()
    ok = dm[None, None] if mask.num_heads == 1 else dm.reshape(hkv, g, L, S)[None]
    if q_seg is not None:
        ok = ok & (q_seg[:, None, None, :L, None] == kv_seg[:, None, None, None, :S])
    s = jnp.where(ok, s, -jnp.inf)
    m = lax.stop_gradient(s.max(-1))
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    pr = jnp.exp(s - m[..., None])
    tot = pr.sum(-1)
    has = tot > 0
    l_safe = jnp.where(has, tot, 1.0)
    out = jnp.einsum("bhgls,bshd->blhgd", pr / l_safe[..., None], vs)
    lse = jnp.where(has, m + jnp.log(l_safe), -jnp.inf).reshape(b, h, L)
    out = jnp.pad(out.reshape(b, L, h, d), ((0, 0), (0, lp - L), (0, 0), (0, 0)))
    lse = jnp.pad(lse, ((0, 0), (0, 0), (0, lp - L)), constant_values=-jnp.inf)
    return out.astype(q.dtype), lse


register_impl(OP, BlockMask, "dense", dense)
