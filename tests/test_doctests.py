"""The docstring examples: every ``>>>`` example of ``jsparse`` and ``pallas_kernels``
runs and prints what it says (one test per module), and every public name has one."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import jsparse
import pallas_kernels

MODULES = sorted(
    {pkg.__name__ for pkg in (jsparse, pallas_kernels)}
    | {
        info.name
        for pkg in (jsparse, pallas_kernels)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")
    }
)

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    report: list[str] = []
    for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
        runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


# ----------------------------------------------------------------- every public name
# The namespaces whose ``__all__`` is the public API.
NAMESPACES = [
    "jsparse",
    "jsparse.attention",
    "jsparse.checkpoint",
    "jsparse.core",
    "jsparse.core.checks",
    "jsparse.core.meshes",
    "jsparse.core.product",
    "jsparse.extend",
    "jsparse.nn",
    "jsparse.parallel",
    "jsparse.prune",
    "jsparse.train",
    "pallas_kernels",
    "pallas_kernels.common",
    "pallas_kernels.bcsr",
    "pallas_kernels.nm",
    "pallas_kernels.monarch",
]

# Public names without an example of their own, and why.
EXCEPTIONS = {
    "jsparse.attention": "a module: its names are checked one by one (jsparse.attention.__all__)",
    "jsparse.attention.DENSE_THRESHOLD": "a float constant (no docstring of its own)",
    "jsparse.checkpoint": "a module: its names are checked one by one (jsparse.checkpoint.__all__)",
    "jsparse.extend": "a module: its names are checked one by one (jsparse.extend.__all__)",
    "jsparse.nn": "a module: its names are checked one by one (jsparse.nn.__all__)",
    "jsparse.train": "a module: its names are checked one by one (jsparse.train.__all__)",
    "jsparse.prune": "a module: its names are checked one by one (jsparse.prune.__all__)",
    "jsparse.parallel": "a module: its names are checked one by one (jsparse.parallel.__all__)",
    "jsparse.extend.checks": "a module: checked as jsparse.core.checks.__all__",
    "jsparse.extend.product": "a module: checked as jsparse.core.product.__all__",
    "jsparse.extend.PLATFORMS": "a tuple constant (no docstring of its own)",
    "jsparse.nn.FORMATS": "a read-only mapping (no docstring of its own); FormatLinear's "
    "example looks a layer up in it",
    "pallas_kernels.common.BACKENDS": "a tuple constant (no docstring of its own)",
    "pallas_kernels.common.MIN_DOT": "an int constant (no docstring of its own)",
    "pallas_kernels.common.SUPPORTED_DTYPES": "a tuple constant (no docstring of its own)",
}

# The format classes whose public methods and properties each need an example.
FORMAT_CLASSES = [
    jsparse.AbstractSparseMatrix,
    jsparse.BCSR,
    jsparse.NM,
    jsparse.Monarch,
    jsparse.LowRankSparse,
]


def _public_names():
    for ns in NAMESPACES:
        module = importlib.import_module(ns)
        for name in module.__all__:
            yield f"{ns}.{name}", getattr(module, name)


def _own_doc(obj) -> str:
    """The object's own docstring (not its type's, nor a base class's)."""
    if isinstance(obj, property):
        return obj.fget.__doc__ or ""
    if isinstance(obj, classmethod | staticmethod):
        return obj.__func__.__doc__ or ""
    return getattr(obj, "__doc__", None) or ""


def _format_members():
    """``(qualified name, attribute)`` for the public methods and properties of the
    format classes, each where it is defined (inherited ones are checked once, on
    AbstractSparseMatrix)."""
    for cls in FORMAT_CLASSES:
        for name, attr in vars(cls).items():
            if name.startswith("_"):
                continue
            if inspect.isfunction(attr) or isinstance(attr, property | classmethod | staticmethod):
                yield f"{cls.__name__}.{name}", attr


def test_exceptions_are_public_names():
    public = {qualified for qualified, _ in _public_names()}
    assert set(EXCEPTIONS) <= public, set(EXCEPTIONS) - public


@pytest.mark.parametrize(
    "qualified,obj", list(_public_names()), ids=[q for q, _ in _public_names()]
)
def test_public_name_has_an_example(qualified, obj):
    if qualified in EXCEPTIONS:
        return
    assert inspect.isclass(obj) or callable(obj), (
        f"{qualified} is a {type(obj).__name__}: list it in EXCEPTIONS with a reason"
    )
    assert ">>>" in _own_doc(obj), f"{qualified} has no >>> example in its docstring"


@pytest.mark.parametrize(
    "qualified,attr", list(_format_members()), ids=[q for q, _ in _format_members()]
)
def test_format_member_has_an_example(qualified, attr):
    assert ">>>" in _own_doc(attr), f"{qualified} has no >>> example in its docstring"
