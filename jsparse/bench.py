"""Speed benchmarks: ``python -m jsparse.bench [--only SECTION ...] [--quick]``.

Every figure is a ratio measured in one process (median of several runs after
warm-up), because absolute times on shared machines are noisy. Sections live in
``jsparse/_benchmarks/`` (one module per format); each exposes
``run(quick: bool) -> str`` returning markdown.
"""

from __future__ import annotations

import argparse
import importlib
import platform

import jax

# section name -> module under jsparse._benchmarks
SECTIONS = {
    "bcsr": "bcsr",
    "nm": "nm",
    "monarch": "monarch",
    "pallas": "pallas",
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jsparse.bench", description=__doc__)
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="sections to run")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer cases")
    args = parser.parse_args(argv)
    print(
        f"# jsparse benchmarks\n\njax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}, {platform.machine()}\n"
    )
    for name in args.only or SECTIONS:
        module = importlib.import_module(f"jsparse._benchmarks.{SECTIONS[name]}")
        print(module.run(quick=args.quick), flush=True)
        print()


if __name__ == "__main__":
    main()
