"""Per-layer one-shot pruning of a kernel given its calibration statistics: magnitude,
Wanda and SparseGPT, into any :mod:`~jsparse.prune.structure` target.

Every function takes the kernel in :class:`flax.nnx.Linear`'s layout ``(in, out)``
(inputs ``X (tokens, in)``, outputs ``X @ W``) and returns ``(pruned, mask)``: the
pruned kernel (zeros outside the mask, SparseGPT's kept weights updated) in the
kernel's dtype, and the boolean mask of kept weights. Computation is float32.

Scores and comparison groups:

- magnitude: ``|W|``, compared across the whole layer (blocks by their L2 norm);
- Wanda (Sun et al. 2023): ``|W_ij|·‖x_i‖``, compared within each output (blocks:
  within each block-column of outputs, by the L2 norm of the scores);
- SparseGPT (Frantar & Alistarh 2023): the OBS saliency ``w²/[H⁻¹]_ii²`` with
  ``H = XᵀX + λI``, selected adaptively per lazy batch of ``block_size`` inputs (blocks:
  the blocks of smallest summed saliency in the batch) or per group of ``m`` inputs
  (N:M), each pruned weight's error propagated to the inputs not yet pruned.

N:M groups run along the input axis; transposable N:M picks, per ``m x m`` block, the
best of all patterns with exactly ``n`` per row and column (sum of ``|W|``, of the
Wanda scores, or of the SparseGPT saliencies).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from jsparse.core.checks import check_sparsity
from jsparse.formats import nm_mask
from jsparse.prune.statistics import LayerStatistics
from jsparse.prune.structure import (
    NMStructure,
    keep_count,
    parse_structure,
    transposable_nm_mask,
    transposable_patterns,
)

__all__ = [
    "METHODS",
    "corrected_kernel",
    "magnitude_prune",
    "prune_weight",
    "reconstruction_error",
    "select_mask",
    "sparsegpt_prune",
    "wanda_prune",
]

#: The method names :func:`prune_weight` and :func:`~jsparse.prune.oneshot` accept.
METHODS = ("magnitude", "wanda", "sparsegpt")


def _label(name: str | None) -> str:
    return f"layer {name!r}" if name else "the kernel"


def _check_kernel(kernel, name: str | None) -> jax.Array:
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 2:
        raise ValueError(f"{_label(name)}: the kernel must be 2-D (in, out), got {kernel.shape}")
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f"{_label(name)}: the kernel must be floating, got {kernel.dtype}")
    return kernel


def _check_sparsity(sparsity, name: str | None) -> float:
    try:
        return check_sparsity(sparsity)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{_label(name)}: {e}") from None


def _prepare(kernel, sparsity, structure, name):
    kernel = _check_kernel(kernel, name)
    structure = parse_structure(structure)
    structure.check(tuple(kernel.shape), name or "kernel")
    sparsity = 1.0 - structure.density if isinstance(structure, NMStructure) else sparsity
    return kernel, _check_sparsity(sparsity, name), structure


def _rank_keep(x: jax.Array, k, axis: int | None) -> jax.Array:
    """True for the ``k`` largest entries of ``x`` (along ``axis``, or overall), ties to
    the lower index; ``k`` may be traced."""
    if axis is None:
        return _rank_keep(x.reshape(-1), k, axis=0).reshape(x.shape)
    order = jnp.argsort(-x, axis=axis, stable=True)
    ranks = jnp.argsort(order, axis=axis, stable=True)
    return ranks < k


@functools.partial(jax.jit, static_argnames=("bm", "bn", "squared", "per_output"))
def _block_mask(scores, keep, *, bm, bn, squared, per_output):
    rows, cols = scores.shape
    s = scores * scores if squared else scores
    block = s.reshape(rows // bm, bm, cols // bn, bn).sum(axis=(1, 3))
    if per_output:
        # ``keep`` blocks in all: ``keep // ncols`` in every block-column, and one more
        # in the ``keep % ncols`` columns whose next-best block scores highest.
        nrows, ncols = block.shape
        base, extra = keep // ncols, keep % ncols
        following = -jnp.sort(-block, axis=0)[jnp.minimum(base, nrows - 1)]
        per_column = base + _rank_keep(following, extra, axis=0).astype(keep.dtype)
        kept = _rank_keep(block, per_column[None, :], axis=0)
    else:
        kept = _rank_keep(block, keep, axis=None)
    return jnp.repeat(jnp.repeat(kept, bm, axis=0), bn, axis=1)


def select_mask(
    scores: jax.typing.ArrayLike,
    structure: Any = "unstructured",
    sparsity: float = 0.5,
    *,
    per_output: bool = False,
    squared_blocks: bool = True,
) -> jax.Array:
    """The mask keeping the best-scoring weights of an ``(in, out)`` score matrix.

    Args:
      scores: ``(in, out)`` non-negative scores (larger: more worth keeping).
      structure: the target (:func:`~jsparse.prune.parse_structure`).
      sparsity: the fraction pruned (blocks); ignored for N:M.
      per_output: compare within each output (each block-column of outputs) and keep
        the same count in each (Wanda's rule), instead of across the layer; when the
        count does not divide evenly, the remainder goes one block each to the
        columns whose next-best block scores highest, so the layer's sparsity is
        exact either way.
      squared_blocks: rank blocks by the sum of squared scores (their L2 norm) rather
        than the sum of scores.

    Returns:
      A boolean ``(in, out)`` mask: ``keep_count(candidates, sparsity)`` blocks kept
      (per output with ``per_output``), exactly ``n`` of every ``m`` inputs for N:M.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.prune import select_mask
      >>> s = jnp.array([[4.0, 1.0], [3.0, 2.0], [2.0, 3.0], [1.0, 4.0]])
      >>> select_mask(s, "unstructured", 0.5).sum(0).tolist()
      [2, 2]
      >>> select_mask(s, "1:2")[:, 0].tolist()
      [True, False, True, False]
    """
    scores = jnp.asarray(scores, jnp.float32)
    structure = parse_structure(structure)
    if isinstance(structure, NMStructure):
        if structure.transposable:
            return transposable_nm_mask(scores, structure.n, structure.m)
        return nm_mask(scores, structure.n, structure.m, axis=0)
    sparsity = check_sparsity(sparsity)
    bm, bn = structure.block_shape
    rows, cols = scores.shape
    candidates = (rows // bm) * (cols // bn)
    return _block_mask(
        scores, jnp.int32(keep_count(candidates, sparsity)), bm=bm, bn=bn,
        squared=squared_blocks and not structure.unstructured, per_output=per_output,
    )  # fmt: skip


def magnitude_prune(
    kernel: jax.typing.ArrayLike,
    *,
    sparsity: float = 0.5,
    structure: Any = "unstructured",
    name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Magnitude pruning: keep the weights (blocks: of largest L2 norm) of largest
    ``|W|`` across the layer; N:M keeps the ``n`` largest of every ``m`` inputs.

    Args:
      kernel: ``(in, out)``.
      sparsity: fraction pruned, in ``[0, 1)`` (ignored for N:M).
      structure: ``"unstructured"``, ``(bm, bn)``, ``"n:m"``, ``"n:mT"``.
      name: the layer's name, for error messages.

    Returns:
      ``(pruned kernel, kept mask)``.

    Raises:
      ValueError: a sparsity outside ``[0, 1)``, a structure that does not divide the
        kernel, ``n >= m`` (naming the layer).

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.prune import magnitude_prune
      >>> w = jnp.array([[1.0, -4.0], [3.0, 0.5]])
      >>> magnitude_prune(w, sparsity=0.5)[0].tolist()
      [[0.0, -4.0], [3.0, 0.0]]
    """
    kernel, sparsity, structure = _prepare(kernel, sparsity, structure, name)
    mask = select_mask(jnp.abs(kernel.astype(jnp.float32)), structure, sparsity)
    return jnp.where(mask, kernel, 0).astype(kernel.dtype), mask


def wanda_prune(
    kernel: jax.typing.ArrayLike,
    sq_norms: jax.typing.ArrayLike,
    *,
    sparsity: float = 0.5,
    structure: Any = "unstructured",
    name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Wanda: score ``|W_ij|·‖x_i‖`` and keep the best within each output (no weight
    update). Blocks are compared within each block-column of outputs by the L2 norm
    of their scores (the layer's block count exact:
    :func:`~jsparse.prune.select_mask`); N:M keeps the ``n`` best of every ``m``
    inputs of each output.

    Args:
      kernel: ``(in, out)``.
      sq_norms: ``(in,)`` squared input norms (``LayerStatistics.sq_norms``; any
        positive scale).
      sparsity, structure, name: as in :func:`magnitude_prune`.

    Returns:
      ``(pruned kernel, kept mask)``.

    Raises:
      ValueError: as :func:`magnitude_prune`, or ``sq_norms`` of the wrong shape.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.prune import wanda_prune
      >>> w = jnp.array([[1.0, 1.0], [2.0, 2.0]])
      >>> wanda_prune(w, jnp.array([16.0, 1.0]), sparsity=0.5)[1].tolist()
      [[True, True], [False, False]]
    """
    kernel, sparsity, structure = _prepare(kernel, sparsity, structure, name)
    sq_norms = jnp.asarray(sq_norms, jnp.float32)
    if sq_norms.shape != (kernel.shape[0],):
        raise ValueError(
            f"{_label(name)}: sq_norms must have shape (in,) = ({kernel.shape[0]},), got "
            f"{sq_norms.shape}"
        )
    scores = jnp.abs(kernel.astype(jnp.float32)) * jnp.sqrt(jnp.maximum(sq_norms, 0.0))[:, None]
    mask = select_mask(scores, structure, sparsity, per_output=True)
    return jnp.where(mask, kernel, 0).astype(kernel.dtype), mask


# ------------------------------------------------------------------ SparseGPT
@jax.jit
def _inverse_cholesky(hessian: jax.Array, damp: jax.Array) -> jax.Array:
    """Upper ``U`` with ``UᵀU = (H + damp·I)⁻¹`` (NaN when not positive definite)."""
    k = hessian.shape[0]
    h = hessian + damp * jnp.eye(k, dtype=hessian.dtype)
    lower = jnp.linalg.cholesky(h)
    inverse = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(k, dtype=h.dtype))
    inverse = (inverse + inverse.T) / 2
    return jnp.linalg.cholesky(inverse).T


@jax.jit
def _decoupled_hessian(gram: jax.Array):
    """``(H, dead, mean diagonal, finite)``: an input that is always zero has no
    influence; its diagonal is set to 1 so that it decouples."""
    hessian = gram.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(hessian))
    dead = jnp.diagonal(hessian) == 0
    hessian = hessian + jnp.diag(dead.astype(jnp.float32))
    return hessian, dead, jnp.mean(jnp.diagonal(hessian)), finite


@jax.jit
def _factor_ok(upper: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(upper)) & jnp.all(jnp.diagonal(upper) > 0)


def _damped_inverse_cholesky(gram, damping: float, name: str | None):
    hessian, dead, mean, finite = _decoupled_hessian(jnp.asarray(gram))
    if not bool(finite):
        raise ValueError(f"{_label(name)}: the Hessian (Gram matrix) holds NaN or inf")
    mean = float(mean)
    base = max(float(damping), 1e-4)
    schedule = [float(damping)] + [min(1.0, base * 10**i) for i in (1, 2, 3)]
    tried = []
    for fraction in dict.fromkeys(schedule):
        upper = _inverse_cholesky(hessian, jnp.float32(fraction * mean))
        tried.append(fraction)
        if bool(_factor_ok(upper)):
            return upper, dead
    raise ValueError(
        f"{_label(name)}: the Hessian XᵀX is not positive definite even with damping "
        f"{', '.join(f'{t:g}' for t in tried)} x its mean diagonal ({mean:g}); the "
        "calibration inputs are degenerate or the statistics are corrupted"
    )


def _obs_batch(w1, u1, *, kind, n, m, bm, bn, keep, transposable):
    """One lazy batch of SparseGPT on ``w1 (out, width)`` (columns = inputs) with the
    batch's block ``u1 (width, width)`` of the upper inverse-Hessian Cholesky factor.
    Returns the pruned, updated columns, the scaled errors and the mask."""
    rows, width = w1.shape
    d = jnp.diagonal(u1)
    if kind == "blocks":
        saliency = (w1 / d[None, :]) ** 2
        block = saliency.reshape(rows // bn, bn, width // bm, bm).sum(axis=(1, 3))
        kept = _rank_keep(block, keep, axis=None)
        mask = jnp.repeat(jnp.repeat(kept, bn, axis=0), bm, axis=1)
    else:
        mask = jnp.ones((rows, width), bool)
    patterns = jnp.asarray(transposable_patterns(n, m)) if transposable else None

    def choose_group(i, w1, mask):
        group = jax.lax.dynamic_slice(w1, (0, i), (rows, m))
        dg = jax.lax.dynamic_slice(d, (i,), (m,))
        saliency = (group / dg[None, :]) ** 2
        if transposable:
            blocks = saliency.reshape(rows // m, m, m).reshape(rows // m, m * m)
            gains = blocks @ patterns.reshape(-1, m * m).astype(jnp.float32).T
            chosen = patterns[jnp.argmax(gains, axis=-1)]
            group_mask = chosen.reshape(rows, m)
        else:
            group_mask = _rank_keep(saliency, n, axis=1)
        return jax.lax.dynamic_update_slice(mask, group_mask, (0, i))

    def body(i, carry):
        w1, mask, err = carry
        if kind == "nm":
            mask = jax.lax.cond(i % m == 0, lambda mk: choose_group(i, w1, mk), lambda mk: mk, mask)
        w = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
        kept = jax.lax.dynamic_index_in_dim(mask, i, axis=1, keepdims=False)
        e = (w - jnp.where(kept, w, 0.0)) / d[i]
        row = jax.lax.dynamic_index_in_dim(u1, i, axis=0, keepdims=False)
        w1 = w1 - e[:, None] * row[None, :]
        err = jax.lax.dynamic_update_index_in_dim(err, e, i, axis=1)
        return w1, mask, err

    w1, mask, err = jax.lax.fori_loop(0, width, body, (w1, mask, jnp.zeros_like(w1)))
    return jnp.where(mask, w1, 0.0), err, mask


@functools.partial(jax.jit, static_argnames=("kind", "n", "m", "bm", "bn", "width", "transposable"))
def _sparsegpt_core(kernel, upper, dead, keeps, *, kind, n, m, bm, bn, width, transposable):
    """SparseGPT on ``kernel (in, out)``: lazy batches of ``width`` inputs (unrolled),
    ``keeps[b]`` blocks kept in batch ``b`` (traced: no recompilation per sparsity)."""
    k = kernel.shape[0]
    rest = jnp.where(dead[None, :], 0.0, kernel.T.astype(jnp.float32))  # (out, in)
    done, masks = [], []
    for b, i1 in enumerate(range(0, k, width)):
        i2 = min(i1 + width, k)
        w1, err, mask = _obs_batch(
            rest[:, : i2 - i1], upper[i1:i2, i1:i2], kind=kind, n=n, m=m, bm=bm, bn=bn,
            keep=keeps[b], transposable=transposable,
        )  # fmt: skip
        done.append(w1)
        masks.append(mask)
        # The batch's errors reach every later input in one product.
        rest = rest[:, i2 - i1 :] - jnp.matmul(err, upper[i1:i2, i2:], precision="highest")
    return jnp.concatenate(done, axis=1).T, jnp.concatenate(masks, axis=1).T


def sparsegpt_prune(
    kernel: jax.typing.ArrayLike,
    gram: jax.typing.ArrayLike,
    *,
    sparsity: float = 0.5,
    structure: Any = "unstructured",
    damping: float = 0.01,
    block_size: int = 128,
    name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT: prune by the OBS saliency ``w²/[H⁻¹]_ii²`` and update the remaining
    weights to compensate, input by input, with ``H = XᵀX + λI``.

    The inverse Hessian is used through its upper Cholesky factor; inputs are
    processed in lazy batches of ``block_size`` (each batch's errors reach the later
    inputs in one matrix product). Unstructured and block targets choose the mask
    adaptively at the start of each batch (the fraction ``sparsity`` of its weights
    or blocks with the smallest saliency, from the weights updated so far); N:M
    chooses at the start of each group of ``m`` inputs. An input whose Hessian
    diagonal is zero (always-zero activations) gets zero weights. If the Cholesky
    factorisation fails, it is retried with the damping multiplied by 10, up to the
    mean diagonal itself, before a ``ValueError``.

    Args:
      kernel: ``(in, out)``.
      gram: ``(in, in)`` Gram matrix ``XᵀX`` (any positive scale;
        ``LayerStatistics.gram``).
      sparsity, structure, name: as in :func:`magnitude_prune`.
      damping: ``λ`` as a fraction of the mean diagonal of ``H`` (1% by default).
      block_size: lazy batch width (rounded to a multiple of the block or group
        width along the inputs).

    Returns:
      ``(pruned kernel, kept mask)``.

    Raises:
      ValueError: as :func:`magnitude_prune`; ``gram`` of the wrong shape, not finite,
        or not positive definite even with more damping (naming the layer).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jsparse.prune import reconstruction_error, sparsegpt_prune, wanda_prune
      >>> x = jax.random.normal(jax.random.key(0), (64, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> g = x.T @ x
      >>> pruned, mask = sparsegpt_prune(w, g, sparsity=0.5)
      >>> int(mask.sum()), int((pruned != 0).sum())
      (64, 64)
      >>> e_wanda = reconstruction_error(w, wanda_prune(w, jnp.diag(g))[0], g)
      >>> reconstruction_error(w, pruned, g) < e_wanda
      True
    """
    kernel, sparsity, structure = _prepare(kernel, sparsity, structure, name)
    k, out = kernel.shape
    gram = jnp.asarray(gram)
    if gram.shape != (k, k):
        raise ValueError(
            f"{_label(name)}: the Gram matrix must have shape (in, in) = ({k}, {k}), got "
            f"{gram.shape}"
        )
    try:
        block_size = int(block_size)
    except (TypeError, ValueError):
        raise TypeError(f"block_size must be an int, got {block_size!r}") from None
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    try:
        damping = float(damping)
    except (TypeError, ValueError):
        raise TypeError(f"damping must be a number, got {damping!r}") from None
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")

    upper, dead = _damped_inverse_cholesky(gram, damping, name)
    if isinstance(structure, NMStructure):
        kind, unit, (bm, bn) = "nm", structure.m, (1, 1)
        n, m, transposable = structure.n, structure.m, structure.transposable
    else:
        kind = "blocks"
        bm, bn = structure.block_shape
        unit, n, m, transposable = bm, 1, 2, False
    width = max(unit, block_size // unit * unit)
    keeps = [
        keep_count((out // bn) * ((min(i1 + width, k) - i1) // bm), sparsity)
        for i1 in range(0, k, width)
    ]
    pruned, mask = _sparsegpt_core(
        kernel, upper, dead, jnp.asarray(keeps, jnp.int32), kind=kind, n=n, m=m, bm=bm,
        bn=bn, width=width, transposable=transposable,
    )  # fmt: skip
    return pruned.astype(kernel.dtype), mask


# ------------------------------------------------------------------ dispatch
def prune_weight(
    kernel: jax.typing.ArrayLike,
    stats: LayerStatistics | None,
    *,
    method: str = "sparsegpt",
    sparsity: float = 0.5,
    structure: Any = "unstructured",
    name: str | None = None,
    **options: Any,
) -> tuple[jax.Array, jax.Array]:
    """Prune one kernel with ``method`` given its calibration statistics.

    Args:
      kernel: ``(in, out)``.
      stats: the layer's :class:`~jsparse.prune.LayerStatistics` (``None`` is fine for
        magnitude; Wanda needs ``sq_norms``, SparseGPT ``gram``).
      method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
      sparsity, structure, name: as in :func:`magnitude_prune`.
      **options: the method's options (SparseGPT: ``damping``, ``block_size``).

    Returns:
      ``(pruned kernel, kept mask)``.

    Raises:
      ValueError: an unknown method, missing statistics, or the method's errors.
      TypeError: an option the method does not take.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.prune import prune_weight
      >>> pruned, mask = prune_weight(jnp.eye(4), None, method="magnitude", structure="2:4")
      >>> int(mask.sum())
      8
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "sparsegpt" and options:
        raise TypeError(f"method {method!r} takes no options, got {sorted(options)}")
    unknown = set(options) - {"damping", "block_size"}
    if unknown:
        raise TypeError(
            f"unknown sparsegpt option(s) {sorted(unknown)}; it takes damping and block_size"
        )
    common = {"sparsity": sparsity, "structure": structure, "name": name}
    if method == "magnitude":
        return magnitude_prune(kernel, **common)
    if stats is None:
        raise ValueError(f"{_label(name)}: method {method!r} needs calibration statistics")
    if method == "wanda":
        return wanda_prune(kernel, stats.sq_norms, **common)
    if stats.gram is None:
        raise ValueError(
            f"{_label(name)}: sparsegpt needs the Gram matrix (collect with gram=True)"
        )
    if stats.cross is not None:
        kernel = corrected_kernel(
            kernel, stats.gram, stats.cross, damping=options.get("damping", 0.01)
        )
    return sparsegpt_prune(kernel, stats.gram, **common, **options)


def corrected_kernel(
    kernel: jax.typing.ArrayLike,
    gram: jax.typing.ArrayLike,
    cross: jax.typing.ArrayLike,
    *,
    damping: float = 0.01,
) -> jax.Array:
    """The dense kernel that best reproduces the dense layer's outputs ``X W`` from the
    inputs ``X̂`` it actually gets after earlier layers were pruned:
    ``W' = (X̂ᵀX̂ + λI)⁻¹ X̂ᵀX W``, with ``λ`` = ``damping`` times the mean diagonal.

    Since ``‖XW − X̂Ŵ‖² = ‖XW − X̂W'‖² + ‖X̂(W' − Ŵ)‖²`` (up to the damping), pruning
    ``W'`` with SparseGPT on ``X̂ᵀX̂`` minimises the layer's error against the *dense*
    model; with ``X̂ = X`` it is ``W`` (up to the damping). Computed in float64.

    Args:
      kernel: ``(in, out)`` dense kernel ``W``.
      gram: ``X̂ᵀX̂`` (``LayerStatistics.gram``).
      cross: ``X̂ᵀX`` (``LayerStatistics.cross``), on the same scale.
      damping: ``λ`` as a fraction of the mean diagonal of ``gram``.

    Returns:
      ``W'`` in ``kernel``'s dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.prune import corrected_kernel
      >>> w = jnp.array([[1.0], [2.0]])
      >>> corrected_kernel(w, jnp.eye(2), 2 * jnp.eye(2), damping=0.0).tolist()
      [[2.0], [4.0]]
    """
    kernel = jnp.asarray(kernel)
    g = np.asarray(gram, np.float64)
    c = np.asarray(cross, np.float64)
    lam = float(damping) * float(np.mean(np.diag(g)))
    h = g + max(lam, 1e-12) * np.eye(len(g))
    w = np.linalg.solve(h, c @ np.asarray(kernel, np.float64))
    return jnp.asarray(w, kernel.dtype)


def reconstruction_error(
    kernel: jax.typing.ArrayLike,
    pruned: jax.typing.ArrayLike,
    gram: jax.typing.ArrayLike,
    *,
    cross: jax.typing.ArrayLike | None = None,
    reference_gram: jax.typing.ArrayLike | None = None,
) -> float:
    """The relative reconstruction error ``‖XW − XŴ‖_F / ‖XW‖_F`` on the calibration
    inputs, from their Gram matrix ``G = XᵀX`` (any positive scale):
    ``sqrt(tr(ΔᵀGΔ) / tr(WᵀGW))`` with ``Δ = W − Ŵ``, in float64.

    With ``cross = X̂ᵀX`` and ``reference_gram = XᵀX`` (``gram`` then being
    ``X̂ᵀX̂``): ``‖XW − X̂Ŵ‖ / ‖XW‖``, the pruned layer on its actual inputs ``X̂``
    against the dense layer on the dense inputs ``X``.

    Args:
      kernel, pruned: ``(in, out)``, the original and the pruned kernel.
      gram: ``(in, in)``.
      cross, reference_gram: optional, as above (both or neither).

    Returns:
      A float (0.0 when ``XW`` is zero and so is the difference).

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.prune import reconstruction_error
      >>> reconstruction_error(jnp.ones((2, 1)), jnp.array([[1.0], [0.0]]), jnp.eye(2))
      0.7071067811865476
    """
    w = np.asarray(kernel, np.float64)
    p = np.asarray(pruned, np.float64)
    g = np.asarray(gram, np.float64)
    if (cross is None) != (reference_gram is None):
        raise ValueError("reconstruction_error: give both cross and reference_gram, or neither")
    if cross is None:
        delta = w - p
        num = float(np.sum(delta * (g @ delta)))
        den = float(np.sum(w * (g @ w)))
    else:
        c = np.asarray(cross, np.float64)
        den = float(np.sum(w * (np.asarray(reference_gram, np.float64) @ w)))
        num = den - 2.0 * float(np.sum(p * (c @ w))) + float(np.sum(p * (g @ p)))
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return float(np.sqrt(max(num, 0.0) / den))
