"""What every Pallas kernel uses: tile arithmetic, the supported dtypes, the
"unsupported configuration" signal.

Planners and configs answer "does this kernel handle this configuration?" *before
anything is traced* by raising :class:`Unsupported` (a :class:`ValueError`) with a
message that names the limit and the request. Arguments that contradict each other
(a config for another block shape, an ``x`` of the wrong height) are plain
:class:`ValueError`. Neither is :class:`NotImplementedError`, so a bug inside a
kernel can never pass for a configuration it does not support.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import ManualAxisType

__all__ = [
    "BACKENDS",
    "MIN_DOT",
    "SUPPORTED_DTYPES",
    "Unsupported",
    "check_backend",
    "check_dtype",
    "is_pow2",
    "next_pow2",
    "out_struct",
    "round_up",
    "tpu_sublane",
]

# Kernel families: "gpu" (Triton) and "tpu" (Mosaic).
BACKENDS = ("gpu", "tpu")
# dtypes the kernels accept (no float64 on accelerators' matrix units).
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Triton's tensor-core dot needs every dimension >= 16; below that a GPU kernel
# multiplies with a broadcast and a reduction (or, where it cannot, is Unsupported).
MIN_DOT = 16


class Unsupported(ValueError):
    """A configuration (dtype, tile, block shape, backend) a kernel cannot handle.

    Raised by planners and configs; the message names the limit and the request,
    e.g. ``the TPU BCSR kernel needs bm and bn multiples of 8, got (4, 8)``.

    Example:
      >>> from pallas_kernels.bcsr import plan_spmm
      >>> from pallas_kernels.common import Unsupported
      >>> try:
      ...     plan_spmm((4, 8), 16, "float32", backend="tpu")
      ... except Unsupported as e:
      ...     print(e)
      the TPU BCSR kernel needs bm and bn multiples of 8, got (4, 8)
      >>> issubclass(Unsupported, ValueError)
      True
    """


def is_pow2(v: int) -> bool:
    """Whether ``v`` is a positive power of two.

    Example:
      >>> from pallas_kernels.common import is_pow2
      >>> is_pow2(16), is_pow2(24), is_pow2(0)
      (True, False, False)
    """
    return v > 0 and (v & (v - 1)) == 0


def next_pow2(v: int) -> int:
    """The smallest power of two ``>= v`` (1 for ``v <= 1``).

    Example:
      >>> from pallas_kernels.common import next_pow2
      >>> next_pow2(17), next_pow2(16), next_pow2(0)
      (32, 16, 1)
    """
    return 1 << max(0, int(v) - 1).bit_length()


def round_up(v: int, m: int) -> int:
    """``v`` rounded up to a multiple of ``m``.

    Example:
      >>> from pallas_kernels.common import round_up
      >>> round_up(17, 8), round_up(16, 8)
      (24, 16)
    """
    return -(-v // m) * m


def check_backend(backend: str) -> None:
    """ValueError for a backend name that is not one of :data:`BACKENDS`.

    Example:
      >>> from pallas_kernels.common import check_backend
      >>> check_backend("gpu")
      >>> check_backend("cuda")
      Traceback (most recent call last):
      ...
      ValueError: backend must be one of ('gpu', 'tpu'), got 'cuda'
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_dtype(*dtypes, kernel: str = "Pallas kernels") -> None:
    """Unsupported for a dtype no kernel handles (e.g. float64).

    Args:
      dtypes: the dtypes of the operands.
      kernel: how the message names the kernels (plural: "... support only ...").

    Raises:
      Unsupported: a dtype outside :data:`SUPPORTED_DTYPES`.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.common import check_dtype
      >>> check_dtype(jnp.float32, jnp.bfloat16)
      >>> check_dtype("float64", kernel="Pallas BCSR kernels")
      Traceback (most recent call last):
      ...
      pallas_kernels.common.Unsupported: Pallas BCSR kernels support only float32, bfloat16, ...
    """
    for d in dtypes:
        if jnp.dtype(d) not in SUPPORTED_DTYPES:
            names = ", ".join(t.name for t in SUPPORTED_DTYPES)
            raise Unsupported(f"{kernel} support only {names}; got {jnp.dtype(d).name}")


def tpu_sublane(dtype) -> int:
    """Second-minor tile of a TPU vreg for ``dtype`` (8 for 32-bit, 16 for 16-bit).

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.common import tpu_sublane
      >>> tpu_sublane(jnp.float32), tpu_sublane(jnp.bfloat16)
      (8, 16)
    """
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def out_struct(shape, dtype) -> jax.ShapeDtypeStruct:
    """A kernel's output shape, declared invariant over manual mesh axes.

    Kernels are written for one device; ``jax.shard_map(check_vma=True)`` asks a
    ``pallas_call`` to say how each output varies over the mesh. jsparse lowers its
    kernels on operand types stripped of that variance (``jsparse.core.meshes``), so
    "varies over no axis" is the declaration that matches; outside ``shard_map`` it
    changes nothing.

    Example:
      >>> import jax.numpy as jnp
      >>> from pallas_kernels.common import out_struct
      >>> out_struct((2, 3), jnp.float32).manual_axis_type.varying
      frozenset()
    """
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=ManualAxisType())
