"""Every public name is importable and documented."""

import importlib

import jsparse


def test_every_public_name_imports():
    assert jsparse.__all__ == sorted(set(jsparse.__all__), key=jsparse.__all__.index)
    for name in jsparse.__all__:
        obj = getattr(jsparse, name)
        assert obj is not None, name
        assert getattr(obj, "__doc__", None), f"jsparse.{name} has no docstring"


def test_star_import():
    namespace = {}
    exec("from jsparse import *", namespace)
    missing = set(jsparse.__all__) - set(namespace)
    assert not missing


def test_bench_module_imports():
    bench = importlib.import_module("jsparse.bench")
    assert callable(bench.main)
