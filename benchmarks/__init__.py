"""jsparse speed benchmarks (source checkout only; not shipped in the wheel).

Run ``python -m benchmarks [--only SECTION ...] [--quick]`` from the repository root,
or ``python -m jsparse.bench ...`` from anywhere in a source checkout.

A section is any module of this folder (name not starting with ``_``) that defines
``run(quick: bool) -> str`` returning markdown; the section's name is the module's
name. Adding a section is adding a file: the runner (``benchmarks/__main__.py``)
discovers them. Sections import jsparse through its public names only.
"""
