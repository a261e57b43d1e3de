"""Test-session setup: the CPU platform only (the CUDA plugin, installed for
deviceless compilation, would otherwise try to initialise), and 8 host CPU devices,
so that the sharding tests (tests/test_sharding.py) have a mesh to run on.

The flag must be set before JAX initialises its CPU backend; it only adds devices
(single-device computations still run on device 0, as before). A flag already in
``XLA_FLAGS`` is left alone.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=8".strip()

# Compile-only GPU and TPU devices (tests/compile_targets.py) work with JAX_PLATFORMS=cpu.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
