"""Benchmark suites; each module exposes ``NAME`` and ``run(ctx) -> list[Measurement]``."""
