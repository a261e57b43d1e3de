"""Compile JAX functions for real accelerators on a machine without one.

The accelerator compilers run ahead of time, without a device:

* **GPU**: the CUDA PJRT plugin (``jax-cuda12-plugin``, with ``ptxas`` from
  ``nvidia-cuda-nvcc-cu12``) gives a *compile-only* device from a
  ``GpuTargetConfigProto`` text (:data:`H100_TARGET_CONFIG`,
  :data:`A100_TARGET_CONFIG`, written from the public device specifications);
  XLA runs its whole pipeline ("deviceless compilation"): Triton for Pallas
  kernels, PTX for the target's compute capability, ``ptxas``.
* **TPU**: ``libtpu`` (``jax[tpu]``) gives compile-only devices of a TPU topology;
  its XLA and Mosaic pipelines run in full.

Usage::

    from compile_targets import compile_for, targets

    for target in targets():               # H100, A100 (GPU), v5e, v6e (TPU)
        result = compile_for(f, (x, y), target)   # raises the compiler's error
        result.seconds, result.memory

``args`` may be arrays or :class:`jax.ShapeDtypeStruct`; they are placed on the
target's compile-only device. :func:`compile_for` compiles inside
``jax.default_device(device)`` so that Pallas lowering rules asking the default
device for its kind see the target, and so do jsparse's kernel planners
(:func:`pallas_kernels.common.current_target`).

A helper module of the test suite (``tests/`` is on ``sys.path`` under pytest);
scripts add ``tests/`` to ``sys.path`` to use it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

# libtpu takes a process lock unless told that several processes may load it
# (pytest-xdist workers, other test runs on the machine); the two TPU_* variables
# silence a harmless log line about the missing TPU host list. Set before libtpu loads.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")

import jax  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

__all__ = [
    "A100_TARGET_CONFIG",
    "H100_TARGET_CONFIG",
    "TARGET_NAMES",
    "CompileTarget",
    "Compiled",
    "compile_for",
    "device",
    "target",
    "targets",
]

# NVIDIA H100 SXM5 80GB: compute capability 9.0, 132 SMs, 227 KiB (232448 B) of
# opt-in shared memory per block, 228 KiB per SM, 64K 32-bit registers per SM and
# per block, 50 MiB L2, 3.35 TB/s HBM3, 1.98 GHz boost.
H100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 85520809984
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
runtime_version { major: 12 minor: 8 }
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# NVIDIA A100 SXM4 80GB: compute capability 8.0, 108 SMs, 163 KiB (166912 B) of
# opt-in shared memory per block, 164 KiB per SM, 64K registers, 40 MiB L2,
# 2.04 TB/s HBM2e, 1.41 GHz boost.
A100_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 167936
  threads_per_core_limit: 2048
  core_count: 108
  fpus_per_core: 64
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 2039000000000
  l2_cache_size: 41943040
  clock_rate_ghz: 1.41
  device_memory_size: 85097971712
  shared_memory_per_block_optin: 166912
  cuda_compute_capability { major: 8 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
runtime_version { major: 12 minor: 8 }
dnn_version_info { major: 9 minor: 8 }
device_description_str: "NVIDIA A100-SXM4-80GB"
"""


@dataclasses.dataclass(frozen=True)
class CompileTarget:
    """One compile-only accelerator.

    Attributes:
      name: ``"h100"``, ``"a100"``, ``"v5e"``, ``"v6e"`` (or another of
        :data:`TARGET_NAMES`).
      platform: ``"cuda"`` or ``"tpu"`` (what ``jax.jit(...).lower`` lowers for).
      backend: the Pallas kernel family, ``"gpu"`` or ``"tpu"``.
      topology: the TPU topology name, or the GPU target config text.
    """

    name: str
    platform: str
    backend: str
    topology: str

    def __str__(self) -> str:  # pytest ids
        return self.name


_ALL = {
    "h100": CompileTarget("h100", "cuda", "gpu", H100_TARGET_CONFIG),
    "a100": CompileTarget("a100", "cuda", "gpu", A100_TARGET_CONFIG),
    "v5e": CompileTarget("v5e", "tpu", "tpu", "v5e:2x2"),
    "v6e": CompileTarget("v6e", "tpu", "tpu", "v6e:2x2"),
    # Beyond the four CI targets (the measurements: these topologies work).
    "v4": CompileTarget("v4", "tpu", "tpu", "v4:2x2x1"),
    "v5p": CompileTarget("v5p", "tpu", "tpu", "v5p:2x2x1"),
    "v3": CompileTarget("v3", "tpu", "tpu", "v3:2x2"),
}
TARGET_NAMES = tuple(_ALL)
_DEFAULT = ("h100", "a100", "v5e", "v6e")


def target(name: str) -> CompileTarget:
    """The target called ``name`` (one of :data:`TARGET_NAMES`)."""
    try:
        return _ALL[name]
    except KeyError:
        raise ValueError(f"unknown compile target {name!r}; known: {TARGET_NAMES}") from None


def targets(names: Sequence[str] | None = None) -> list[CompileTarget]:
    """The CI targets H100, A100, v5e, v6e (or the named ones)."""
    return [target(n) for n in (names or _DEFAULT)]


@functools.cache
def device(t: CompileTarget) -> jax.Device:
    """The first compile-only device of ``t`` (created once per process)."""
    from jax.experimental import topologies

    if t.platform == "tpu":
        topo = topologies.get_topology_desc(topology_name=t.topology, platform="tpu")
    else:
        topo = topologies.get_topology_desc(
            topology_name=t.name, platform="cuda", topology="1x1x1", target_config=t.topology
        )
    return topo.devices[0]


@dataclasses.dataclass(frozen=True)
class Compiled:
    """What :func:`compile_for` returns.

    Attributes:
      compiled: the :class:`jax.stages.Compiled` executable (not runnable here).
      lowered: the :class:`jax.stages.Lowered` it came from.
      seconds: wall time of lowering + compiling.
      device_kind: the target device's ``device_kind``.
    """

    compiled: Any
    lowered: Any
    seconds: float
    device_kind: str

    @property
    def memory(self):
        """``compiled.memory_analysis()`` (``None`` where the backend has none)."""
        try:
            return self.compiled.memory_analysis()
        except Exception:  # noqa: BLE001 - optional backend feature
            return None

    def text(self) -> str:
        """The compiled module's text (optimized HLO; on TPU with the Mosaic calls)."""
        try:
            return self.compiled.as_text() or ""
        except Exception:  # noqa: BLE001 - optional backend feature
            return ""


def _place(x, sharding):
    if isinstance(x, jax.ShapeDtypeStruct) or hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return x


def compile_for(
    fn: Callable[..., Any], args: Sequence[Any], t: CompileTarget | str, **jit_kwargs
) -> Compiled:
    """Lower and compile ``fn(*args)`` for the compile-only device of ``t``.

    Args:
      fn: a function of arrays (jitted here unless it already is a ``jax.jit``
        object; ``jit_kwargs`` go to ``jax.jit``, e.g. ``static_argnames``).
      args: a sequence of pytrees of arrays / ``jax.ShapeDtypeStruct`` (only shapes
        and dtypes are used) and static values (non-array leaves are kept as is).
      t: a :class:`CompileTarget` or its name.

    Returns:
      A :class:`Compiled` record.

    Raises:
      Whatever the lowering or the accelerator compiler raises (e.g.
      ``JaxRuntimeError: RESOURCE_EXHAUSTED: Shared memory size limit exceeded``).
    """
    t = target(t) if isinstance(t, str) else t
    dev = device(t)
    sharding = SingleDeviceSharding(dev)
    placed = jax.tree.map(lambda x: _place(x, sharding), tuple(args))
    jitted = fn if hasattr(fn, "lower") and not jit_kwargs else jax.jit(fn, **jit_kwargs)
    start = time.perf_counter()
    with jax.default_device(dev):
        lowered = jitted.lower(*placed)
        compiled = lowered.compile()
    return Compiled(compiled, lowered, time.perf_counter() - start, dev.device_kind)
