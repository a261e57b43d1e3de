"""Every registered format's oracle examples, for the shared suite (tests/test_oracle.py).

A format lists its examples itself (``Format.oracle_examples``, see
docs/extending.md); this file only discovers them.
"""

from __future__ import annotations

import jsparse

FACTORIES = [ex for fmt in jsparse.extend.registered_formats() for ex in fmt.oracle_examples]
