"""The hardware a kernel is planned for: on-chip memory budgets per GPU and TPU.

Planners size tiles so that what a kernel keeps on chip fits the chip it compiles
for: Triton stages dot operands through *shared memory* (the opt-in limit per
block: 227 KiB on H100, 163 KiB on A100, 99 KiB on sm_86/sm_89 cards), Mosaic
double-buffers every block in *scoped VMEM* (16 MiB by default on v4/v5e, 32 MiB
on v5p/v6e). A :class:`Target` records those limits; :func:`current_target` picks
one at trace time:

1. the kind of ``jax.config.jax_default_device`` when it is a device of the
   kernel family (``with jax.default_device(d)``, also a compile-only device of a
   TPU topology or a GPU target config);
2. else the kind of ``jax.devices()[0]`` when the default backend is that family
   (a real GPU or TPU);
3. else a conservative default (:data:`DEFAULT_GPU`, :data:`DEFAULT_TPU`): the
   smallest budget of the chips the kernels support, so a plan that fits it fits
   every chip.

Unknown device kinds get the default of their family. The default device is part
of ``jax.jit``'s cache key, so a function traced under one target is traced again
under another. Planners also take ``target=`` explicitly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax

from pallas_kernels.common import Unsupported, check_backend

__all__ = [
    "DEFAULT_GPU",
    "DEFAULT_TPU",
    "KNOWN_TARGETS",
    "Target",
    "current_target",
    "fit_tiles",
    "target_for_kind",
]

_KIB, _MIB = 1024, 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Target:
    """On-chip limits of one accelerator, as the planners use them.

    Attributes:
      name: short name (``"h100"``, ``"v5e"``, ``"gpu-default"`` ...).
      backend: the kernel family, ``"gpu"`` (Triton) or ``"tpu"`` (Mosaic).
      smem_bytes: GPU: opt-in shared memory per thread block.
      registers: GPU: 32-bit registers per thread block.
      vmem_bytes: TPU: the scoped VMEM limit a kernel compiles under by default.
      bf16_matmul: TPU: whether Mosaic takes bfloat16 matmul operands (not on v2/v3:
        their kernels multiply in float32).
      kinds: lower-case substrings of ``jax.Device.device_kind`` naming this chip.

    Example:
      >>> from pallas_kernels.targets import target_for_kind
      >>> t = target_for_kind("NVIDIA H100 80GB HBM3")
      >>> t.name, t.smem_bytes
      ('h100', 232448)
    """

    name: str
    backend: str
    smem_bytes: int = 0
    registers: int = 65536
    vmem_bytes: int = 0
    bf16_matmul: bool = True
    kinds: tuple[str, ...] = ()

    def __post_init__(self):
        check_backend(self.backend)

    @property
    def budget(self) -> int:
        """The on-chip bytes a plan may use: shared memory (GPU) or scoped VMEM (TPU)."""
        return self.smem_bytes if self.backend == "gpu" else self.vmem_bytes

    @property
    def memory_name(self) -> str:
        return "shared memory" if self.backend == "gpu" else "scoped VMEM"


# GPUs: the opt-in shared memory per block of each compute capability (CUDA
# programming guide, "Technical Specifications per Compute Capability").
DEFAULT_GPU = Target("gpu-default", "gpu", smem_bytes=101376)
DEFAULT_TPU = Target("tpu-default", "tpu", vmem_bytes=16 * _MIB)
KNOWN_TARGETS: tuple[Target, ...] = (
    Target("h100", "gpu", smem_bytes=232448, kinds=("h100", "h200", "h800", "gh200")),
    Target("b200", "gpu", smem_bytes=232448, kinds=("b200", "b100", "gb200")),
    Target("a100", "gpu", smem_bytes=166912, kinds=("a100", "a800", "a30")),
    Target(
        "sm86",
        "gpu",
        smem_bytes=101376,
        kinds=("a10", "a40", "l4", "l40", "rtx", "geforce", "a6000", "a5000", "a4000"),
    ),
    Target("v3", "tpu", vmem_bytes=16 * _MIB, bf16_matmul=False, kinds=("tpu v3", "tpu v2")),
    Target("v4", "tpu", vmem_bytes=16 * _MIB, kinds=("tpu v4",)),
    Target("v5e", "tpu", vmem_bytes=16 * _MIB, kinds=("tpu v5 lite", "tpu v5e")),
    Target("v5p", "tpu", vmem_bytes=16 * _MIB, kinds=("tpu v5p", "tpu v5")),
    Target("v6e", "tpu", vmem_bytes=32 * _MIB, kinds=("tpu v6", "tpu v6e")),
    Target("v7x", "tpu", vmem_bytes=32 * _MIB, kinds=("tpu7x", "tpu 7", "tpu v7")),
)


def target_for_kind(kind: str, backend: str | None = None) -> Target:
    """The :class:`Target` for a ``jax.Device.device_kind`` string.

    Args:
      kind: e.g. ``"NVIDIA A100-SXM4-80GB"``, ``"TPU v5 lite"``.
      backend: the family to fall back to for an unknown kind (``"gpu"`` when the
        kind is not recognisably a TPU).

    Example:
      >>> from pallas_kernels.targets import target_for_kind
      >>> target_for_kind("TPU v5 lite").name, target_for_kind("Some new GPU").name
      ('v5e', 'gpu-default')
    """
    k = kind.lower()
    for t in KNOWN_TARGETS:
        if any(s in k for s in t.kinds):
            return t
    if backend is None:
        backend = "tpu" if k.startswith("tpu") else "gpu"
    return DEFAULT_TPU if backend == "tpu" else DEFAULT_GPU


def _device_backend(device) -> str | None:
    platform = getattr(device, "platform", "")
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "tpu" if platform == "tpu" else None


def current_target(backend: str) -> Target:
    """The :class:`Target` kernels of ``backend`` are planned for now (see the module
    docstring for the order: the default device, the default backend's first
    device, the conservative default).

    Example:
      >>> from pallas_kernels.targets import current_target
      >>> current_target("tpu").name  # on a CPU-only machine
      'tpu-default'
    """
    check_backend(backend)
    candidates = [jax.config.jax_default_device]
    try:
        candidates.append(jax.devices()[0])
    except RuntimeError:  # no backend at all
        pass
    for device in candidates:
        if device is not None and not isinstance(device, str):
            if _device_backend(device) == backend:
                return target_for_kind(device.device_kind, backend)
    return DEFAULT_TPU if backend == "tpu" else DEFAULT_GPU


def _tile_candidates(side: int, backend: str, cap: int) -> list[int]:
    """Tiles of one block side, largest first: powers of two (GPU, at least 16 or
    the whole side), or the whole side and its multiples of 128 (TPU)."""
    if backend == "gpu":
        out, t = [], min(side, cap)
        while t >= min(side, 16):
            out.append(t)
            t //= 2
        return out
    tiles = [side] if side <= cap else []
    return tiles + [
        t for t in range(min(side, cap) // 128 * 128, 0, -128) if t != side and side % t == 0
    ]


def fit_tiles(
    out_side: int,
    in_side: int,
    onchip_bytes: Callable[[int, int], int],
    target: Target,
    *,
    kernel: str,
    request: str,
    cap: int = 128,
) -> tuple[int, int]:
    """The largest ``(tm, tk)`` tiles of an ``out_side x in_side`` block whose
    ``onchip_bytes(tm, tk)`` fits ``target`` (all of shared memory on a GPU, 3/4 of
    the scoped VMEM limit on a TPU: Mosaic keeps its own scratch there).

    GPU tiles are powers of two of at most ``cap`` (Triton's dots and registers);
    TPU tiles are the whole side (up to ``cap``) or a multiple of 128 dividing it.
    A side with no such tile (e.g. a TPU side over ``cap`` that 128 does not
    divide) is refused.

    Raises:
      Unsupported: no tiling fits; the message names the target's limit and the
        smallest request.

    Example:
      >>> from pallas_kernels.targets import fit_tiles, target_for_kind
      >>> a100 = target_for_kind("NVIDIA A100-SXM4-80GB")
      >>> fit_tiles(256, 256, lambda tm, tk: 2 * (tm * tk + tk * 128) * 4, a100,
      ...           kernel="a kernel", request="256x256 blocks")
      (128, 64)
    """
    budget = target.budget if target.backend == "gpu" else target.budget * 3 // 4
    tms = _tile_candidates(out_side, target.backend, cap)
    tks = _tile_candidates(in_side, target.backend, cap)
    if not tms or not tks:
        raise Unsupported(
            f"{kernel} cannot tile {request} for {target.name}: a block side over {cap} "
            "must be a multiple of 128"
        )
    pairs = sorted(((tm, tk) for tm in tms for tk in tks), key=lambda p: (-p[0] * p[1], -p[0]))
    for tm, tk in pairs:
        if onchip_bytes(tm, tk) <= budget:
            return tm, tk
    tm, tk = pairs[-1]
    raise Unsupported(
        f"{kernel} cannot fit {request} in the {target.memory_name} of {target.name} "
        f"({target.budget} bytes, {budget} usable): its smallest tiling ({tm}x{tk}) needs "
        f"{onchip_bytes(tm, tk)} bytes"
    )
