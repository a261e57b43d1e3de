"""The GPU suite (``python -m jsparse.bench --suite gpu``) without a GPU: its
correctness half in the Pallas interpreter on tiny shapes, its case list, and the
CLI wiring. The timings need a GPU and are not run here."""

from __future__ import annotations

import importlib
import pathlib

import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.gpu")


@pytest.mark.slow
def test_the_correctness_half_passes_in_interpret_mode(gpu):
    checks = gpu.check_correctness(gpu.tiny_cases())
    assert {c.case.fmt for c in checks} == {"bcsr", "nm", "monarch"}
    assert {c.case.dtype for c in checks} == {"float32", "bfloat16"}
    for c in checks:
        assert c.ok, (c.case.label, c.forward_error, c.grad_error)
        # a real comparison: float32 agrees far inside its tolerance
        if c.case.dtype == "float32":
            assert c.forward_error < 1e-4 and c.grad_error < 1e-4


def test_the_correctness_half_catches_a_wrong_kernel(gpu, monkeypatch):
    matmul = gpu.matmul

    def off_by_a_bit(a, x, *, impl):
        y = matmul(a, x, impl=impl)
        return y * 1.05 if impl == "pallas" else y

    monkeypatch.setattr(gpu, "matmul", off_by_a_bit)
    checks = gpu.check_correctness(gpu.tiny_cases()[:1])
    assert not checks[0].ok
    assert 0.04 < checks[0].forward_error < 0.06 and 0.04 < checks[0].grad_error < 0.06


def test_a_case_the_planners_refuse_is_reported_not_fatal(gpu, monkeypatch):
    def refuse(a, x, *, impl):
        if impl == "pallas":
            raise ValueError("impl='pallas' cannot run matmul: too big for the target")
        return gpu.jnp.zeros((a.shape[0], x.shape[1]), x.dtype)

    monkeypatch.setattr(gpu, "matmul", refuse)
    (check,) = gpu.check_correctness(gpu.tiny_cases()[:1])
    assert not check.ok and "too big for the target" in check.refused


def test_the_cases_are_the_issues(gpu):
    cases = gpu.cases()
    bcsr = {(c.param, c.n) for c in cases if c.fmt == "bcsr"}
    assert bcsr == {(b, n) for b in (32, 64, 128) for n in (1, 16, 256, 4096)}
    assert {c.n for c in cases if c.fmt == "nm"} == {1, 16, 64, 256}
    assert {(c.param, c.n) for c in cases if c.fmt == "monarch"} == {(4, 1024), (16, 1024)}
    assert {c.dtype for c in cases} == {"bfloat16", "float32"}
    assert all(c.size == 4096 for c in cases)
    targets = {(c.fmt, c.param, c.n): c.target for c in cases if c.target}
    assert targets[("bcsr", 64, 4096)] == 4.0 and targets[("bcsr", 64, 16)] == 6.0
    assert targets[("nm", (2, 4), 64)] == 1.5 and ("nm", (2, 4), 256) not in targets
    assert targets[("monarch", 16, 1024)] == 4.0
    assert all(c.dtype == "bfloat16" for c in cases if c.target)


def test_make_builds_each_format(gpu):
    for case in gpu.tiny_cases():
        a, x, c = gpu.make(case, gpu.jax.random.key(0))
        assert a.shape == (case.size, case.size) and x.shape == (case.size, case.n)
        assert a.dtype == jnp.dtype(case.dtype) == x.dtype and c.dtype == jnp.float32


def test_the_suite_command_without_a_gpu_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    runner = importlib.import_module("benchmarks.__main__")
    out = tmp_path / "suite.md"
    runner.main(["--suite", "gpu", "--output", str(out)])
    assert "No GPU here" in capsys.readouterr().out
    assert not out.exists()  # nothing measured, nothing written
    with pytest.raises(SystemExit):
        runner.main(["--suite", "no_such_suite"])


@pytest.mark.slow
def test_the_attention_correctness_half_passes_in_interpret_mode(gpu):
    checks = gpu.check_attention(gpu.tiny_attention_cases())
    assert {c.case.dtype for c in checks} == {"float32", "bfloat16"}
    for c in checks:
        assert c.ok, (c.case.label, c.forward_error, c.grad_error)
        if c.case.dtype == "float32":
            assert c.forward_error < 1e-4 and c.grad_error < 1e-4


def test_the_attention_cases_are_the_issues(gpu):
    labels = [c.label for c in gpu.attention_cases()]
    assert labels == [
        "attention local 512 causal L=8192 bfloat16",
        "attention causal L=4096 bfloat16",
        "attention strided L=8192 bfloat16",
    ]
    with pytest.raises(ValueError, match="unknown attention mask"):
        gpu.attention_mask("diagonal")
