"""Test-session setup: the CPU platform only (the CUDA plugin, installed for
deviceless compilation, would otherwise try to initialise), and 8 host CPU devices,
so that the sharding tests (tests/test_sharding.py) have a mesh to run on, and
a collective timeout that a loaded machine does not reach; and a PRNG that compiles
faster than the default one.

The flags must be set before JAX initialises its CPU backend; the device count only
adds devices (single-device computations still run on device 0, as before). A flag
already in ``XLA_FLAGS`` is left alone.
"""

import os

_FLAGS = {
    "--xla_force_host_platform_device_count": 8,
    # XLA:CPU aborts the process when the devices of a collective do not all arrive
    # within 40 s; with two test workers and 8 virtual devices on 2 cores they can
    # lag that long, and the abort takes down whichever test the worker is running.
    "--xla_cpu_collective_call_terminate_timeout_seconds": 900,
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds": 300,
}
for _flag, _value in _FLAGS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}={_value}".strip()

# Compile-only GPU and TPU devices (tests/compile_targets.py) work with JAX_PLATFORMS=cpu.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The "rbg" PRNG (XLA's RngBitGenerator) rather than the default Threefry: most of the
# suite's time is XLA compiling small programs, and every new shape of random test data
# compiled a Threefry sampler (~0.5 s on these machines; the oracle's gradient tests
# spent about a third of their compilation there, and compile in 0.7x the time with
# "rbg"). No test depends on which values a key draws, only on them being random.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")

# One persistent compilation cache for the whole session, shared by the xdist workers
# (they inherit this process's environment) and the subprocesses some tests start:
# many tests compile the same small programs (an example through several test
# functions), and a hit skips XLA's compilation. A fresh folder per session, removed
# at exit by the process that made it, so a rebuilt native library or a changed kernel
# never meets an executable compiled before it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="jsparse-test-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
