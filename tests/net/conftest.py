"""Network tests run on every registered platform harness (inheap, unix) with leak checks."""

from __future__ import annotations

from support.harness import harness  # noqa: F401  (the fixture)
