"""The C of ``aioxen._native`` is a real C file that the build reads and the packages ship."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import aioxen._native_build as build

ROOT = Path(__file__).resolve().parent.parent
C_FILE = ROOT / "aioxen" / "_native_impl.c"


def test_the_build_compiles_the_c_file() -> None:
    assert Path(build.SOURCE_FILE) == C_FILE
    assert C_FILE.read_text(encoding="utf-8") == build.SOURCE
    assert '"""' not in build.SOURCE and "#include <stdint.h>" in build.SOURCE


def test_every_declared_function_is_defined_in_the_c_file() -> None:
    declared = set(re.findall(r"\b(ax_\w+)\s*\(", build.CDEF))
    defined = set(re.findall(r"^static\s+(?:inline\s+)?\w+\s+\**(ax_\w+)\s*\(", build.SOURCE, re.M))
    assert declared and declared <= defined, declared - defined


def test_sdist_and_wheel_ship_the_c_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert C_FILE.name in config["tool"]["setuptools"]["package-data"]["aioxen"]
    assert "_native_build.py:ffibuilder" in (ROOT / "setup.py").read_text()
