"""Speed benchmarks: ``python -m jsparse.bench [--only SECTION ...] [--quick]``.

The benchmarks live in the source repository, in the top-level ``benchmarks/``
folder next to the ``jsparse`` package (``python -m benchmarks`` there is the same
command); they are not part of the installed package. This entry point finds that
folder in a source checkout and runs its runner.
"""

from __future__ import annotations

import importlib
import pathlib
import sys

#: Where the benchmarks are in a source checkout: ``<repo>/benchmarks``, next to the
#: ``jsparse`` package folder (in an installed wheel: next to it in site-packages).
BENCHMARKS_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def find_benchmarks() -> pathlib.Path | None:
    """The ``benchmarks/`` folder of the source checkout, or None (installed package)."""
    ok = all((BENCHMARKS_DIR / name).is_file() for name in ("__main__.py", "timing.py"))
    return BENCHMARKS_DIR if ok else None


def load_runner():
    """The runner module ``benchmarks.__main__`` of the source checkout.

    Raises:
      SystemExit: jsparse is installed, not a source checkout.
    """
    folder = find_benchmarks()
    if folder is None:
        raise SystemExit(
            "jsparse.bench: no benchmarks/ folder next to the jsparse package "
            f"({BENCHMARKS_DIR} does not exist). The benchmarks are not shipped with the "
            "installed package; they live in the jsparse source repository. Clone it and "
            "run `python -m benchmarks` (or `python -m jsparse.bench`) in the checkout."
        )
    root = str(folder.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    runner = importlib.import_module("benchmarks.__main__")
    found = pathlib.Path(runner.__file__).resolve().parent
    if found != folder:
        raise SystemExit(
            f"jsparse.bench: `benchmarks` was imported from {found}, not from {folder}; "
            "another module named `benchmarks` shadows the checkout's folder."
        )
    return runner


def main(argv=None) -> None:
    load_runner().main(argv, prog="python -m jsparse.bench")


if __name__ == "__main__":
    main()
