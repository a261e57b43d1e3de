"""Every registered format's oracle examples, for the shared suite (tests/test_oracle.py).

A format lists its examples itself (``Format.oracle_examples``, see
docs/extending.md); this file only discovers them.
"""

from __future__ import annotations

import jsparse

_FORMATS = [fmt for fmt in jsparse.extend.registered_formats() if fmt.oracle_examples]

FACTORIES = [ex for fmt in _FORMATS for ex in fmt.oracle_examples]
"""Every example of every format: the oracle suite runs each op on each pattern."""

REPRESENTATIVES = [fmt.oracle_examples[0] for fmt in _FORMATS]
"""Each format's first example: the suites of compositions (every transformation,
``jax.export``) test a format's rules (JVP, transpose, batching, shape polymorphism);
the oracle suite runs the kernels behind them on every pattern."""

REPRESENTATIVE_CASES = [(f, f.shapes[0]) for f in REPRESENTATIVES]
"""``(example, shape)``: each representative with its first shape."""
REPRESENTATIVE_IDS = [f.name for f in REPRESENTATIVES]

FORMAT_OF = {ex.name: fmt for fmt in _FORMATS for ex in fmt.oracle_examples}
"""The format class of each example, by name."""
