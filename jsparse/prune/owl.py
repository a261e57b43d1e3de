"""OWL: outlier-weighted layerwise sparsity (Yin et al. 2024)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jsparse.core.checks import check_sparsity

__all__ = ["OWL", "outlier_ratio", "owl_sparsities"]


class OWL(NamedTuple):
    """OWL's parameters: an outlier is a Wanda score above ``m`` times its layer's
    mean; layer densities spread over ``±lam`` around ``1 - sparsity``.

    Example:
      >>> from jsparse.prune import OWL
      >>> OWL(), OWL(lam=0.1).m
      (OWL(m=5.0, lam=0.08), 5.0)
    """

    m: float = 5.0
    lam: float = 0.08


def outlier_ratio(scores: jax.typing.ArrayLike, m: float = 5.0) -> float:
    """The fraction of ``scores`` above ``m`` times their mean (OWL's layer outlier
    ratio, with the Wanda scores ``|W|·‖x‖``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.prune import outlier_ratio
      >>> outlier_ratio(jnp.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 100.0]), m=5.0)
      0.125
    """
    scores = jnp.asarray(scores, jnp.float32)
    return float(jnp.mean(scores > m * jnp.mean(scores)))


def owl_sparsities(
    scores: Mapping[str, jax.typing.ArrayLike],
    sparsity: float,
    *,
    m: float = 5.0,
    lam: float = 0.08,
) -> dict[str, float]:
    """Per-layer sparsities from OWL: layers with more outliers keep more weights.

    With ``D_l`` the outlier ratio of layer ``l`` (:func:`outlier_ratio`), the layer
    densities are ``1 - sparsity + 2·lam·((D_l − min D)/(max D − min D) − mean)``
    (spread over ``2·lam``, mean ``1 - sparsity`` over layers, as in OWL's
    reference), clipped to sparsities in ``[0, 0.999]``. Equal ratios give uniform
    sparsity.

    Args:
      scores: ``{path: Wanda score matrix |W|·‖x‖}`` per layer.
      sparsity: the mean target sparsity, in ``[0, 1)``.
      m: the outlier threshold (OWL's ``M``, 5 by default).
      lam: the half spread (OWL's ``λ``, 0.08 by default).

    Returns:
      ``{path: sparsity}``.

    Raises:
      ValueError: ``sparsity`` outside ``[0, 1)``, ``lam`` negative, no layers.

    Example:
      >>> import jax.numpy as jnp
      >>> from jsparse.prune import owl_sparsities
      >>> flat, spiky = jnp.ones(8), jnp.ones(8).at[0].set(100.0)
      >>> s = owl_sparsities({"a": flat, "b": spiky}, 0.5)
      >>> round(s["a"], 2), round(s["b"], 2)
      (0.58, 0.42)
    """
    sparsity = check_sparsity(sparsity)
    if not scores:
        raise ValueError("owl_sparsities needs at least one layer")
    if not float(lam) >= 0:
        raise ValueError(f"OWL's lam must be >= 0, got {lam}")
    names = list(scores)
    ratios = np.array([outlier_ratio(scores[k], m) for k in names])
    spread = ratios.max() - ratios.min()
    if spread <= 0:
        return dict.fromkeys(names, sparsity)
    density = (ratios - ratios.min()) / spread * (2 * float(lam))
    density = density - density.mean() + (1.0 - sparsity)
    out = np.clip(1.0 - density, 0.0, 0.999)
    return {k: float(v) for k, v in zip(names, out, strict=True)}
