"""docs/extending.md stays true: its Python code runs exactly as written, the format it
adds passes the whole shared dense-oracle suite (tests/test_oracle.py), and the
registrations it counts are the ones its code makes.

The page's code runs in a subprocess, so its format (and its layer's format name)
never joins this process's registries, which other test modules read.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "extending.md"
# The registration calls of the extension API the page counts.
REGISTRATIONS = ("register_format", "register_impl", "register_entrywise")


def code_blocks(text: str) -> list[str]:
    """The page's ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def page_code() -> str:
    return "\n\n".join(code_blocks(PAGE.read_text()))


def _called_name(node: ast.expr) -> str | None:
    target = node.func if isinstance(node, ast.Call) else node
    if isinstance(target, ast.Name):
        return target.id
    if isinstance(target, ast.Attribute):
        return target.attr
    return None


def test_the_page_counts_its_registrations():
    tree = ast.parse(page_code())
    calls = [_called_name(node) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    decorators = [
        _called_name(d)
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef | ast.FunctionDef)
        for d in node.decorator_list
    ]
    made = [name for name in calls + decorators if name in REGISTRATIONS]
    assert sorted(made) == sorted(REGISTRATIONS), made  # each exactly once: three
    text = PAGE.read_text()
    assert "one new file" in text and "**three registrations**" in text


def test_the_page_runs_and_its_format_passes_the_oracle_suite(tmp_path):
    # The page's code as a module that pytest loads as a plugin: it runs (registering
    # Banded) before tests/factories.py collects the registered formats' examples.
    (tmp_path / "extending_page.py").write_text(page_code())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "XDIST_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    result = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "extending_page", "-p", "no:cacheprovider",
            "-p", "no:xdist", "-v", "-k", "banded and not bf16 and not bfloat16",
            str(ROOT / "tests" / "test_oracle.py"),
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= 25, out[-3000:]  # float32 (CI time)
    for name in ("banded_b1", "banded_b3"):  # each of the page's oracle examples ran
        assert re.search(rf"\[{name}-.*PASSED", out), out[-3000:]
