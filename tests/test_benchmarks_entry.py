"""The benchmark runner and its ``python -m jsparse.bench`` entry point, without
running (or timing) any section."""

from __future__ import annotations

import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = {"bcsr", "nm", "monarch", "pallas", "layer_call"}


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.__main__")


def test_runner_discovers_the_sections(runner):
    sections = runner.discover()
    assert SECTIONS <= set(sections), sections
    assert "timing" not in sections  # a helper module: no run(quick)
    assert sections == sorted(sections)


def test_discovery_reads_sources_and_imports_nothing(tmp_path, runner):
    boom = "raise RuntimeError('imported')\n"
    (tmp_path / "alpha.py").write_text(boom + "def run(quick: bool) -> str:\n    return ''\n")
    (tmp_path / "helper.py").write_text(boom + "def median(x):\n    return x\n")
    (tmp_path / "wrong.py").write_text(boom + "def run(n):\n    return ''\n")
    (tmp_path / "_private.py").write_text(boom + "def run(quick):\n    return ''\n")
    assert runner.discover(tmp_path) == ["alpha"]


def test_runner_cli_lists_discovered_sections(runner, capsys):
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--help"], prog="python -m jsparse.bench")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "python -m jsparse.bench" in out
    assert all(name in out for name in SECTIONS)
    with pytest.raises(SystemExit):
        runner.main(["--only", "no_such_section"])


def test_jsparse_bench_finds_the_benchmarks_folder():
    from jsparse import bench

    assert bench.find_benchmarks() == ROOT / "benchmarks"
    runner = bench.load_runner()
    assert pathlib.Path(runner.__file__).resolve() == ROOT / "benchmarks" / "__main__.py"
    assert SECTIONS <= set(runner.discover())


def test_jsparse_bench_without_the_folder_says_where_benchmarks_live(tmp_path, monkeypatch):
    from jsparse import bench

    monkeypatch.setattr(bench, "BENCHMARKS_DIR", tmp_path / "benchmarks")
    assert bench.find_benchmarks() is None
    with pytest.raises(SystemExit, match="source repository"):
        bench.main(["--quick"])
