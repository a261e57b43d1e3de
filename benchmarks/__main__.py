"""Speed benchmarks: ``python -m benchmarks [--only SECTION ...] [--quick]``, and
suites: ``python -m benchmarks --suite gpu [--output FILE] [--profile DIR]``.

Every figure is a ratio measured in one process (median of several runs after
warm-up), because absolute times on shared machines are noisy. Sections are the
modules of the ``benchmarks/`` folder that define ``run(quick: bool) -> str``
returning markdown; they are discovered, not listed here.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import pathlib
import platform

FOLDER = pathlib.Path(__file__).resolve().parent
# Suites: modules with ``run_suite(output, quick, profile)`` (not sections: they need
# a particular accelerator and write their own report file).
SUITES = ("gpu",)


def _defines_run(path: pathlib.Path) -> bool:
    """Whether the module at ``path`` defines ``run(quick, ...)`` at top level.

    Read from the source, so listing sections imports none of them (a section whose
    imports fail only fails when it is run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "run":
            args = node.args
            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
            return "quick" in names
    return False


def discover(folder: pathlib.Path = FOLDER) -> list[str]:
    """The section names (module names) in ``folder``, sorted."""
    return sorted(
        p.stem for p in folder.glob("*.py") if not p.stem.startswith("_") and _defines_run(p)
    )


def main(argv=None, prog: str = "python -m benchmarks") -> None:
    sections = discover()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--only", nargs="*", choices=sections, help="sections to run")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer cases")
    parser.add_argument("--suite", choices=SUITES, help="run a suite (e.g. gpu) instead")
    parser.add_argument("--output", help="the markdown file a suite writes")
    parser.add_argument("--profile", help="a suite's folder for profiler traces")
    args = parser.parse_args(argv)
    if args.suite:
        module = importlib.import_module(f"{__package__ or 'benchmarks'}.{args.suite}")
        module.run_suite(output=args.output, quick=args.quick, profile=args.profile)
        return

    import jax

    print(
        f"# jsparse benchmarks\n\njax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}, {platform.machine()}\n"
    )
    for name in args.only or sections:
        module = importlib.import_module(f"{__package__ or 'benchmarks'}.{name}")
        print(module.run(quick=args.quick), flush=True)
        print()


if __name__ == "__main__":
    main()
