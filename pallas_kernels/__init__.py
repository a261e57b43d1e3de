"""Pallas kernels for jsparse: arrays in, arrays out; no autodiff, no formats.

One folder per format, one file per kernel, a pure-``jnp`` ``*_reference`` beside
each kernel:

* :mod:`pallas_kernels.bcsr`: block-sparse SpMM (``A @ X``, ``A.T @ X``) and SDDMM;
* :mod:`pallas_kernels.nm`: N:M SpMM, transposed SpMM and sampled product;
* :mod:`pallas_kernels.monarch`: the fused Monarch matmul;
* :mod:`pallas_kernels.common`: what every kernel uses (tile arithmetic, supported
  dtypes, :class:`~pallas_kernels.common.Unsupported`).

Each kernel has a frozen config and a ``plan_*`` planner that returns the default
config for a configuration or raises :class:`~pallas_kernels.common.Unsupported`
(a :class:`ValueError`) when the kernel cannot handle it, before anything is traced.
This package never imports :mod:`jsparse`.
"""

from pallas_kernels.common import Unsupported

__all__ = ["Unsupported"]
