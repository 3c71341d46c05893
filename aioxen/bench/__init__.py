"""aioxen's benchmark harness (``aioxen bench``; ``python -m benchmarks`` in a checkout).

Each suite measures aioxen's mechanism and the alternatives users would otherwise pick in
the same run and reports medians, spreads and ratios.  See ``docs/benchmarks.md``.
"""
