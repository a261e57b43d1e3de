"""jsparse's native CPU kernels: a shared library of XLA FFI handlers.

The library (``_jsparse_native*.so``, built by ``pip install`` from ``src/``) holds
block-sparse (BCSR) and N:M product and SDDMM kernels for float32 and bfloat16, compiled for
three instruction sets (AVX-512, AVX2 + FMA and a portable baseline) and chosen at
run time. This package loads it with :mod:`ctypes`, registers its handlers with
``jax.ffi.register_ffi_target`` (platform ``"cpu"``) and exposes the controls the
tests and benchmarks use. It knows nothing of jsparse's formats: the adapters live in
``jsparse/formats/<format>/cpu.py``.

Example:
  >>> import jsparse_native
  >>> jsparse_native.available() in (True, False)
  True
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

__all__ = [
    "ISAS",
    "available",
    "best_isa",
    "forced_isa",
    "isa",
    "last_threads",
    "load_error",
    "set_isa",
    "set_bcsr_strips",
    "set_huge_pages",
    "set_max_threads",
    "set_nm_gather_from",
    "set_nm_gather_upto",
    "set_nm_permute_from",
    "set_nm_rowgather_from",
    "set_nm_bucket_from",
    "nm_last_permuted",
    "nm_last_rowgathered",
    "nm_last_bucketed",
    "nm_last_groupdotted",
    "nm_last_rowpermuted",
    "set_nm_sddmm_blocking",
    "supported_isas",
]

# Bits of jsparse_native_nm_last_ran: the kernels the last N:M product ran (kernels.h).
_RAN_PERMUTE, _RAN_ROWGATHER, _RAN_BUCKET, _RAN_GROUPDOT, _RAN_ROWPERM = 1, 2, 4, 8, 16

# Instruction sets, slowest first; an index into this tuple is the C library's code.
ISAS = ("generic", "avx2", "avx512")

# FFI targets of the library (name -> exported handler symbol).
TARGETS = {
    name: name
    for name in ("jsparse_bcsr_spmm", "jsparse_bcsr_sddmm", "jsparse_nm_spmm", "jsparse_nm_sddmm",
                 "jsparse_nm_prune")
}


def _library_path() -> str | None:
    """The built library: ``$JSPARSE_NATIVE_LIBRARY`` when set (CI's sanitizer build),
    else the one installed beside this file."""
    override = os.environ.get("JSPARSE_NATIVE_LIBRARY")
    if override:
        return override
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_jsparse_native*.so")))
    found += sorted(glob.glob(os.path.join(here, "_jsparse_native*.dylib")))
    return found[0] if found else None


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)`` once loaded and registered, else ``(None, reason)``."""
    path = _library_path()
    if path is None:
        return None, "the native extension was not built (no compiler at install time?)"
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        return None, f"the native extension failed to load: {e}"
    import jax

    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    for name in ("jsparse_native_isa", "jsparse_native_best_isa", "jsparse_native_set_isa",
                 "jsparse_native_max_threads", "jsparse_native_last_threads",
                 "jsparse_native_nm_gather_from", "jsparse_native_nm_gather_upto",
                 "jsparse_native_nm_permute_from", "jsparse_native_nm_rowgather_from",
                 "jsparse_native_nm_bucket_from",
                 "jsparse_native_nm_last_ran",
                 "jsparse_native_nm_sddmm_kc", "jsparse_native_nm_sddmm_gblock"):  # fmt: skip
        getattr(lib, name).restype = ctypes.c_int
    lib.jsparse_native_bcsr_strips.restype = ctypes.c_int
    lib.jsparse_native_huge_pages.restype = ctypes.c_int
    return lib, None


def available() -> bool:
    """Whether the native library is built, loaded and its FFI targets registered.

    Example:
      >>> import jsparse_native
      >>> isinstance(jsparse_native.available(), bool)
      True
    """
    return _load()[0] is not None


def load_error() -> str | None:
    """Why the library is not available (``None`` when it is).

    Example:
      >>> import jsparse_native
      >>> jsparse_native.load_error() is None or jsparse_native.available() is False
      True
    """
    return _load()[1]


def _lib() -> ctypes.CDLL:
    lib, why = _load()
    if lib is None:
        raise RuntimeError(why)
    return lib


def best_isa() -> str:
    """The fastest instruction set of this CPU the library was built for.

    Example:
      >>> import jsparse_native
      >>> jsparse_native.best_isa() in jsparse_native.ISAS if jsparse_native.available() else True
      True
    """
    return ISAS[_lib().jsparse_native_best_isa()]


def supported_isas() -> tuple[str, ...]:
    """Every instruction set the kernels can run here, slowest first.

    Example:
      >>> import jsparse_native
      >>> "generic" in jsparse_native.supported_isas() if jsparse_native.available() else True
      True
    """
    return ISAS[: ISAS.index(best_isa()) + 1]


def isa() -> str:
    """The instruction set the kernels use now (``JSPARSE_NATIVE_ISA`` at load, or
    :func:`set_isa`).

    Example:
      >>> import jsparse_native
      >>> jsparse_native.isa() in jsparse_native.ISAS if jsparse_native.available() else True
      True
    """
    return ISAS[_lib().jsparse_native_isa()]


def set_isa(name: str | None) -> str:
    """Force the kernels' instruction set (``None``: the best one); returns the previous.

    Takes effect at the next call of a kernel (compiled functions need no retracing).

    Raises:
      ValueError: an unknown name, or one this CPU cannot run.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     old = jsparse_native.set_isa("generic")
      ...     assert jsparse_native.isa() == "generic"
      ...     _ = jsparse_native.set_isa(old)
    """
    previous = isa()
    if name is None:
        name = best_isa()
    if name not in ISAS:
        raise ValueError(f"isa must be one of {ISAS} or None, got {name!r}")
    if name not in supported_isas():
        raise ValueError(f"this CPU cannot run the {name!r} kernels (it runs {supported_isas()})")
    _lib().jsparse_native_set_isa(ISAS.index(name))
    return previous


@functools.wraps(set_isa)
def forced_isa(name: str | None):
    """A context manager running the kernels with instruction set ``name``.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     with jsparse_native.forced_isa("generic"):
      ...         assert jsparse_native.isa() == "generic"
    """
    import contextlib

    @contextlib.contextmanager
    def manager():
        previous = set_isa(name)
        try:
            yield
        finally:
            set_isa(previous)

    return manager()


def set_max_threads(n: int) -> int:
    """Cap the threads of XLA's intra-op pool one kernel call uses (``0``: all of them);
    returns the previous cap.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     old = jsparse_native.set_max_threads(1)
      ...     _ = jsparse_native.set_max_threads(old)
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    lib = _lib()
    previous = lib.jsparse_native_max_threads()
    lib.jsparse_native_set_max_threads(n)
    return previous


def last_threads() -> int:
    """Threads the most recent kernel call ran on (0 before any call).

    Example:
      >>> import jsparse_native
      >>> jsparse_native.last_threads() >= 0 if jsparse_native.available() else True
      True
    """
    return _lib().jsparse_native_last_threads()


def set_nm_gather_from(n: int) -> int:
    """Width of ``X`` from which an N:M product that contracts the groups multiplies only
    the stored entries (the gather kernel) instead of expanding tiles of ``W`` and
    multiplying them densely (docs/native.md); returns the previous width. For tests
    and benchmarks: the default is the measured crossover.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     old = jsparse_native.set_nm_gather_from(1)
      ...     _ = jsparse_native.set_nm_gather_from(old)
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    lib = _lib()
    previous = lib.jsparse_native_nm_gather_from()
    lib.jsparse_native_set_nm_gather_from(n)
    return previous


def _swap_optional_width(name: str, n: int | None, least: int) -> int | None:
    """Set the C library's ``jsparse_native_set_<name>`` to ``n`` (``None``: -1, the
    measured default) after checking it; returns the previous setting (``None`` for
    the default)."""
    if n is not None and (not isinstance(n, int) or n < least):
        raise ValueError(f"n must be None or an int >= {least}, got {n!r}")
    lib = _lib()
    previous = getattr(lib, f"jsparse_native_{name}")()
    getattr(lib, f"jsparse_native_set_{name}")(-1 if n is None else n)
    return None if previous < 0 else previous


def set_nm_gather_upto(n: int | None) -> int | None:
    """Width of ``X`` up to which (from 2 columns) an N:M product runs the narrow-``X``
    kernels (the row-dot, column-axpy, dot, outer-product and stored-entries gather
    kernels, each over the widths where it was measured fastest; docs/native.md) instead
    of expanded tiles; ``0``: never, ``None``: the measured default of the instruction
    set. The row-gather kernel has its own control, :func:`set_nm_rowgather_from`.
    Returns the previous setting. For tests and benchmarks.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     old = jsparse_native.set_nm_gather_upto(0)
      ...     _ = jsparse_native.set_nm_gather_upto(old)
    """
    return _swap_optional_width("nm_gather_upto", n, 0)


def set_nm_permute_from(n: int | None) -> int | None:
    """Width of ``X`` from which ``W.T @ X`` for an N:M ``W`` grouped along axis 0 (the
    product of ``NMLinear``'s forward, ``x @ W``) runs the permute kernel: stored entries
    only, each lane's entry of ``X`` picked by a 512-bit permute (docs/native.md). It
    runs on AVX-512 only, for ``m`` dividing 16. ``None``: the measured default (from
    2 columns on AMD CPUs, whose permutes largely overlap the FMAs; never elsewhere).
    Returns the previous setting. For tests and benchmarks.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     old = jsparse_native.set_nm_permute_from(2)
      ...     _ = jsparse_native.set_nm_permute_from(old)
    """
    return _swap_optional_width("nm_permute_from", n, 1)


def set_nm_rowgather_from(n: int | None) -> int | None:
    """Width of ``X`` from which ``W @ X`` for an N:M ``W`` grouped along axis 1 runs the
    row-gather kernel: stored entries only, row by row against a chunk of ``X``'s rows
    held in L1 (docs/native.md), for 1:2, 1:4, 2:4, 1:8 and 2:8; past four vectors of
    columns (64 on AVX-512, 32 on AVX2) in passes of four vectors and one over the rest.
    ``None``: the measured default (from 5 columns with AVX2 or AVX-512; not on the
    portable path). A number forces it from that width on every instruction set.
    Returns the previous setting. For tests and benchmarks.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     old = jsparse_native.set_nm_rowgather_from(2)
      ...     _ = jsparse_native.set_nm_rowgather_from(old)
    """
    return _swap_optional_width("nm_rowgather_from", n, 1)


def set_nm_bucket_from(n: int | None) -> int | None:
    """Width of ``X`` from which ``W @ X`` for a 2:4 ``W`` grouped along axis 0 runs the
    pattern-bucket kernel (AVX-512 with VBMI and VBMI2): stored entries only, each
    group's columns sorted by their pair of stored rows so that each pair's loop keeps
    its two output rows in registers (docs/native.md). ``None``: the measured default.
    Returns the previous setting. For tests and benchmarks.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     old = jsparse_native.set_nm_bucket_from(2)
      ...     _ = jsparse_native.set_nm_bucket_from(old)
    """
    return _swap_optional_width("nm_bucket_from", n, 1)


def nm_last_bucketed() -> bool:
    """Whether the last N:M product ran the pattern-bucket kernel
    (:func:`set_nm_bucket_from`) on some of its rows. For tests.

    Example:
      >>> import jsparse_native
      >>> jsparse_native.nm_last_bucketed() in (True, False) if jsparse_native.available() else True
      True
    """
    return bool(_lib().jsparse_native_nm_last_ran() & _RAN_BUCKET)


def nm_last_groupdotted() -> bool:
    """Whether the last N:M product ran the group-dot kernel (``W @ X`` along axis 0,
    1 to 8 columns; docs/native.md) on some of its rows. For tests.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     assert jsparse_native.nm_last_groupdotted() in (True, False)
    """
    return bool(_lib().jsparse_native_nm_last_ran() & _RAN_GROUPDOT)


def nm_last_rowpermuted() -> bool:
    """Whether the last N:M product ran the row-permute kernel (``W @ x`` along axis 1,
    one column, 2:4 with AVX-512; docs/native.md) on some of its rows. For tests.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     assert jsparse_native.nm_last_rowpermuted() in (True, False)
    """
    return bool(_lib().jsparse_native_nm_last_ran() & _RAN_ROWPERM)


def nm_last_rowgathered() -> bool:
    """Whether the last N:M product ran the row-gather kernel
    (:func:`set_nm_rowgather_from`) on some of its rows. For tests.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     assert jsparse_native.nm_last_rowgathered() in (True, False)
    """
    return bool(_lib().jsparse_native_nm_last_ran() & _RAN_ROWGATHER)


def nm_last_permuted() -> bool:
    """Whether the last N:M product ran the permute kernel (:func:`set_nm_permute_from`)
    on some of its rows. For tests.

    Example:
      >>> import jsparse_native
      >>> jsparse_native.nm_last_permuted() in (True, False) if jsparse_native.available() else True
      True
    """
    return bool(_lib().jsparse_native_nm_last_ran() & _RAN_PERMUTE)


def _set_switch(name: str, on: bool) -> bool:
    """Sets the library's on/off switch ``name`` (C: ``jsparse_native_set_<name>``),
    returning its previous setting."""
    if not isinstance(on, bool):
        raise ValueError(f"on must be a bool, got {on!r}")
    lib = _lib()
    previous = getattr(lib, f"jsparse_native_{name}")()
    getattr(lib, f"jsparse_native_set_{name}")(int(on))
    return previous != 0


def set_bcsr_strips(on: bool) -> bool:
    """Whether BCSR products with one output row per block-row (1 x k blocks in
    ``A @ X``, k x 1 in ``A.T @ X``) run the row-strip kernel (the default) or the
    general register tile, like any other block shape (docs/native.md); returns the
    previous setting. For tests and benchmarks; takes effect at the next call, compiled
    functions included.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     old = jsparse_native.set_bcsr_strips(False)
      ...     _ = jsparse_native.set_bcsr_strips(old)
    """
    return _set_switch("bcsr_strips", on)


def set_huge_pages(on: bool) -> bool:
    """Whether the kernels advise the operating system to back their outputs of 8 MiB or
    more with 2 MiB pages (``madvise(MADV_HUGEPAGE)`` on the whole huge pages inside the
    output, before writing it; the default) or not; returns the previous setting.

    An output of 32 MiB or more is freshly mapped memory at every call, so writing it
    costs a page fault per 4 KiB page unless the system's transparent huge pages are
    ``always``; with ``madvise`` (a common default) the advice makes it one fault per
    2 MiB. Where transparent huge pages are off the advice does nothing. For tests and
    benchmarks; takes effect at the next call, compiled functions included
    (docs/native.md, *Huge pages for the outputs*).

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     old = jsparse_native.set_huge_pages(False)
      ...     _ = jsparse_native.set_huge_pages(old)
    """
    return _set_switch("huge_pages", on)


def set_nm_sddmm_blocking(kc: int = 0, rows: int = 0) -> tuple[int, int]:
    """Blocking of the N:M SDDMM kernel: ``kc`` elements of the contraction per chunk and
    ``rows`` rows of the grouped operand per block (``0``: the defaults, 512 and the rows
    of 256 KiB of one chunk; docs/native.md). Returns the previous pair. For tests (small
    blocks reach every chunk and block boundary) and benchmarks.

    Example:
      >>> import jsparse_native
      >>> if jsparse_native.available():
      ...     old = jsparse_native.set_nm_sddmm_blocking(32, 8)
      ...     _ = jsparse_native.set_nm_sddmm_blocking(*old)
    """
    for name, value in (("kc", kc), ("rows", rows)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    lib = _lib()
    previous = (lib.jsparse_native_nm_sddmm_kc(), lib.jsparse_native_nm_sddmm_gblock())
    lib.jsparse_native_set_nm_sddmm_blocking(kc, rows)
    return previous
