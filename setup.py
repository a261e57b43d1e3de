"""Build of jsparse's optional native CPU extension (``jsparse_native``).

The project's metadata lives in pyproject.toml; this file only adds the extension:
one plain shared library (no Python C API: Python loads it with ``ctypes`` and
registers its XLA FFI handlers with ``jax.ffi.register_ffi_target``), compiled from
``jsparse_native/src`` against the FFI headers of ``jaxlib`` (a build requirement).

No ``-march=native``: each ISA's kernels come from their own translation unit
(``#pragma GCC target``) and are chosen at run time. The extension is optional: a
failed build (no compiler) installs jsparse without it, and ``impl="cpu"`` then falls
back to ``"xla"`` with one warning.

``JSPARSE_NATIVE_SANITIZE=address`` builds with AddressSanitizer (CI runs the kernel
tests once that way; see .ci/run).
"""

from __future__ import annotations

import concurrent.futures
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_SRC = "jsparse_native/src"
_SANITIZE = os.environ.get("JSPARSE_NATIVE_SANITIZE", "")


def _ffi_include() -> str:
    """jaxlib's headers (``jax.ffi.include_dir()``), found without importing jax."""
    import jaxlib

    return os.path.join(os.path.dirname(jaxlib.__file__), "include")


class _BuildLibrary(build_ext):
    """Builds a plain shared library: no ``PyInit_`` symbol is exported or needed."""

    def get_export_symbols(self, ext):
        return []

    def build_extension(self, ext):
        _compile_in_parallel(self.compiler)
        if self.compiler.compiler_type == "unix":
            ext.extra_compile_args = [
                "-isystem", _ffi_include(),  # XLA's headers: their warnings are not ours
                "-std=c++17", "-O3", "-fvisibility=hidden", "-fno-math-errno",
                "-ffp-contract=fast",
            ]  # fmt: skip
            ext.extra_link_args = ["-lpthread"]
        else:
            ext.include_dirs.append(_ffi_include())
        if _SANITIZE:
            # -O0: the instrumented build only runs the kernel tests, whose time is
            # JAX's, not the kernels'; -O3 took ten times as long to compile.
            flags = [f"-fsanitize={_SANITIZE}", "-fno-omit-frame-pointer", "-g1"]
            ext.extra_compile_args += [*flags, "-O0"]
            ext.extra_link_args += flags
        super().build_extension(ext)


def _compile_in_parallel(compiler):
    """Compiles an extension's translation units side by side, one per core (setuptools
    compiles one extension's sources one after another)."""
    serial = compiler.compile

    def compile(sources, *args, **kwargs):
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            objects = pool.map(lambda src: serial([src], *args, **kwargs), sources)
            return [obj for objs in objects for obj in objs]

    compiler.compile = compile


_native = Extension(
    "jsparse_native._jsparse_native",
    # The longest to compile first (they compile in parallel).
    sources=[f"{_SRC}/{f}" for f in ("isa_avx512.cc", "isa_avx2.cc", "isa_generic.cc", "ffi.cc")],
    depends=[
        f"{_SRC}/{f}"
        for f in (
            "kernels.h",
            "kernels.inc",
            "bcsr_strips.inc",
            "nm_dot.inc",
            "nm_rowgather.inc",
            "nm_expand_avx2.inc",
            "nm_bucket.inc",
            "nm_sddmm.inc",
            "nm_sddmm_ffi.inc",
            "nm_prune.inc",
            "nm_prune_ffi.inc",
        )
    ],
    include_dirs=[_SRC],
    language="c++",
    optional=not _SANITIZE,  # a sanitizer build must fail loudly
)

setup(
    ext_modules=[] if sys.platform == "win32" else [_native],
    cmdclass={"build_ext": _BuildLibrary},
)
