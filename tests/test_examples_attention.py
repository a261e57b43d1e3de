"""examples/sparse_attention.py: the data is what the docstring says, and the quick run
trains every method and prints the table."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def load_example():
    path = ROOT / "examples" / "sparse_attention.py"
    spec = importlib.util.spec_from_file_location("sparse_attention_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_task_is_answerable_inside_the_window_only():
    ex = load_example()
    tokens, targets, weights = ex.make_batch(np.random.default_rng(0), 4, 97, 16)
    assert tokens.shape == targets.shape == weights.shape == (4, 97)
    assert ((tokens[:, 0] >= ex.SHIFT0) & (tokens[:, 0] < ex.VOCAB)).all()
    assert 0.15 < weights[:, 1:].mean() < 0.35
    for b in range(4):
        shift = tokens[b, 0] - ex.SHIFT0
        for j in np.flatnonzero(weights[b]):
            key = tokens[b, j] - ex.QUERY0
            doc_start = 1 + (j - 1) // 16 * 16
            pairs = tokens[b, doc_start:j]
            pairs = pairs[pairs < ex.QUERY0]
            found = pairs[pairs // ex.VALUES == key] % ex.VALUES
            assert len(found) and (found == found[0]).all()  # defined, unambiguous
            assert targets[b, j] == (found[0] + shift) % ex.VALUES
            # keys of this document do not occur in the previous one
            prev = tokens[b, max(1, doc_start - 16) : doc_start]
            assert not (prev[prev < ex.QUERY0] // ex.VALUES == key).any()


@pytest.mark.slow
def test_quick_run_prints_the_table(capsys):
    ex = load_example()
    rows = ex.main(["--quick", "--steps", "3"])
    assert [r["method"] for r in rows] == list(ex.METHODS)
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert math.isfinite(r["step_ms"]) and r["temp_mib"] > 0
    # the sparse models' compiled steps need less temporary memory than the dense one
    assert rows[2]["temp_mib"] < rows[0]["temp_mib"]
    out = capsys.readouterr().out
    assert "local+global" in out and "temp memory" in out
