"""Compile facts per kernel and target: ``python -m benchmarks.compile_table [--write-docs]``.

Compiles each Pallas kernel for H100 and A100 (Triton + ``ptxas``) and TPU v5e and
v6e (Mosaic) with compile-only devices (``tests/compile_targets.py``; needs the
``accel`` extras: ``jax[tpu]``, ``jax-cuda12-plugin``, ``nvidia-cuda-nvcc-cu12``) and
prints a markdown table of

* **compile time**: lowering + compiling the one-kernel program, seconds;
* **GPU registers / spills**: ``ptxas -v`` on the PTX XLA emits (dumped with
  ``--xla_dump_to``), per thread;
* **GPU shared memory**: what Triton requests, read from the compiler itself by
  compiling once more for a probe device with 1 KiB of shared memory (the error
  names the request);
* **TPU VMEM**: the planner's estimate of scoped VMEM (Mosaic reports its use only
  when it runs out), against the generation's limit;
* the planner's tiles.

``--write-docs`` replaces the table between the ``compile-table`` markers in
``docs/pallas.md``. Not a benchmark section (it times compilers, not kernels).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
_DUMP = tempfile.mkdtemp(prefix="jsparse_compile_table_")
# XLA reads its flags once, when the first backend starts: set before importing jax.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP}").strip()
sys.path.insert(0, str(ROOT / "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.timing import markdown_table  # noqa: E402
from pallas_kernels.bcsr import bcsr_sddmm, bcsr_spmm, plan_sddmm, plan_spmm  # noqa: E402
from pallas_kernels.monarch import monarch_matmul  # noqa: E402
from pallas_kernels.nm import nm_sampled, nm_spmm, nm_spmm_t  # noqa: E402
from pallas_kernels.targets import target_for_kind  # noqa: E402

import compile_targets as ct  # noqa: E402

I32 = jnp.int32
DTYPE = jnp.bfloat16
N = 256
START, END = "<!-- compile-table:start -->", "<!-- compile-table:end -->"


def _sds(shape, dtype=DTYPE):
    return jax.ShapeDtypeStruct(shape, dtype)


def _bcsr(kind, block, backend):
    bm, bn = block
    m, k, nse = 4 * bm, 4 * bn, 6
    if kind == "spmm":
        return (lambda d, p, s, x: bcsr_spmm(d, p, s, x, shape=(m, k), backend=backend),
                (_sds((nse, bm, bn)), _sds((m // bm + 1,), I32), _sds((nse,), I32),
                 _sds((k, N))))  # fmt: skip
    if kind == "spmm_t":
        return (lambda d, p, s, x, q: bcsr_spmm(d, p, s, x, perm=q, shape=(m, k), transpose=True,
                                                backend=backend),
                (_sds((nse, bm, bn)), _sds((k // bn + 1,), I32), _sds((nse,), I32),
                 _sds((m, N)), _sds((nse,), I32)))  # fmt: skip
    return (lambda u, v, r, c: bcsr_sddmm(u, v, r, c, block_shape=block, backend=backend),
            (_sds((m, N)), _sds((k, N)), _sds((nse,), I32), _sds((nse,), I32)))  # fmt: skip


def _bcsr_plan(kind, block, target):
    if kind == "sddmm":
        cfg = plan_sddmm(block, N, DTYPE, backend=target.backend, target=target)
        return f"{cfg.tm}×{cfg.tn}, tj {cfg.tj}", cfg.onchip_bytes(DTYPE)
    cfg = plan_spmm(block, N, DTYPE, backend=target.backend, transpose=kind == "spmm_t",
                    target=target)  # fmt: skip
    return f"{cfg.tm}×{cfg.tk}, tn {cfg.tn}", cfg.onchip_bytes(DTYPE)


def _nm(kind, backend):
    rows, cols, n, m = 512, 512, 2, 4
    vals = (_sds((rows, cols // m * n)), _sds((rows, cols // m * n), I32))
    if kind == "nm_spmm":
        return lambda v, p, x: nm_spmm(v, p, x, n=n, m=m, backend=backend), (*vals, _sds((cols, N)))
    if kind == "nm_spmm_t":
        return (lambda v, p, x: nm_spmm_t(v, p, x, n=n, m=m, backend=backend),
                (*vals, _sds((rows, N))))  # fmt: skip
    return (lambda u, x, p: nm_sampled(u, x, p, n=n, m=m, backend=backend),
            (_sds((rows, N)), _sds((cols, N)), vals[1]))  # fmt: skip


def _monarch(backend, nb=16, size=1024):
    s = p = size // nb
    g = max(1, s // nb)
    return (lambda lf, rf, x: monarch_matmul(lf, rf, x, backend=backend),
            (_sds((nb, s, nb * g)), _sds((nb, nb * g, p)), _sds((size, N))))  # fmt: skip


def kernels(target):
    """``(name, plan-or-None, fn, args)`` for every kernel compiled for ``target``."""
    tgt = target_for_kind(ct.device(target).device_kind)
    blocks = [(64, 64), (256, 256)] + ([(2048, 2048)] if target.backend == "tpu" else [])
    out = []
    for block in blocks:
        for kind in ("spmm", "spmm_t", "sddmm"):
            fn, args = _bcsr(kind, block, target.backend)
            out.append((f"BCSR {kind} {block[0]}×{block[1]}", _bcsr_plan(kind, block, tgt), fn,
                        args))  # fmt: skip
    for kind in ("nm_spmm", "nm_spmm_t", "nm_sampled"):
        out.append((f"N:M 2:4 {kind.removeprefix('nm_')} 512²", None, *_nm(kind, target.backend)))
    out.append(("Monarch nblocks=16 1024²", None, *_monarch(target.backend)))
    return out


def _ptxas_facts(before: set[str]) -> str:
    """Registers and spills of the PTX files dumped since ``before``."""
    from nvidia import cuda_nvcc

    ptxas = pathlib.Path(list(cuda_nvcc.__path__)[0]) / "bin" / "ptxas"
    facts = []
    for path in sorted(set(os.listdir(_DUMP)) - before):
        full = pathlib.Path(_DUMP) / path
        if not path.endswith(".ptx") or full.stat().st_size == 0:
            continue
        arch = re.search(r"\.target\s+(sm_\w+)", full.read_text()).group(1)
        out = subprocess.run(
            [str(ptxas), f"-arch={arch}", "-v", str(full), "-o", os.devnull],
            capture_output=True, text=True, check=False,
        ).stderr  # fmt: skip
        for regs in re.findall(r"Used (\d+) registers", out):
            facts.append(regs)
        spills = re.findall(r"(\d+) bytes spill stores", out)
        if any(int(s) for s in spills):
            facts.append(f"spills {max(int(s) for s in spills)} B")
    return ", ".join(facts) or "?"


def _smem_request(target, fn, args) -> str:
    """Shared memory Triton requests: compile for a copy of ``target`` with 1 KiB."""
    text = re.sub(r"shared_memory_per_block_optin: \d+", "shared_memory_per_block_optin: 1024",
                  target.topology)  # fmt: skip
    probe = ct.CompileTarget(f"{target.name}-probe", "cuda", "gpu", text)
    try:
        ct.compile_for(fn, args, probe)
    except Exception as e:  # noqa: BLE001 - the compiler's error carries the figure
        found = re.search(r"requested (\d+)", str(e))
        if found:
            return found.group(1)
        return f"error: {str(e).splitlines()[0][:80]}"
    return "≤ 1024"


def table(names=None) -> str:
    rows = []
    for target in ct.targets(names):
        tgt = target_for_kind(ct.device(target).device_kind)
        for name, plan, fn, args in kernels(target):
            before = set(os.listdir(_DUMP))
            try:
                result = ct.compile_for(fn, args, target)
            except Exception as e:  # noqa: BLE001 - reported in the table
                rows.append([target.name, name, "FAILED: " + str(e).splitlines()[0][:120]]
                            + [""] * 4)  # fmt: skip
                continue
            tiles, estimate = plan if plan else ("", None)
            if target.backend == "gpu":
                regs = _ptxas_facts(before)
                mem = _smem_request(target, fn, args)
                mem = f"{mem} / {tgt.smem_bytes} smem"
            else:
                regs = "n/a"
                mem = (
                    f"~{estimate} / {tgt.vmem_bytes} VMEM"
                    if estimate
                    else f"— / {tgt.vmem_bytes} VMEM"
                )
            rows.append([target.name, name, f"{result.seconds:.2f}", regs, mem, tiles])
    header = ["target", "kernel (bf16, N=256)", "compile s", "registers/thread",
              "on-chip bytes / limit", "tiles"]  # fmt: skip
    return markdown_table(header, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="*", help="compile_targets names (default: 4)")
    parser.add_argument("--write-docs", action="store_true", help="update docs/pallas.md")
    args = parser.parse_args(argv)
    text = table(args.targets)
    print(text)
    if args.write_docs:
        doc = ROOT / "docs" / "pallas.md"
        content = doc.read_text(encoding="utf-8")
        if START not in content or END not in content:
            raise SystemExit(f"{doc} has no {START} ... {END} markers")
        head, rest = content.split(START, 1)
        _, tail = rest.split(END, 1)
        doc.write_text(f"{head}{START}\n{text}\n{END}{tail}", encoding="utf-8")
        print(f"(written to {doc})")


if __name__ == "__main__":
    main()
