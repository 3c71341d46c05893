"""docs/cli.md is exactly what scripts/gen_cli_docs.py generates from the parsers."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", REPO / "scripts/gen_cli_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generated() -> str:
    # A fresh interpreter: argparse's wrap width and the parsers must not depend on this one.
    return subprocess.run(
        [sys.executable, str(REPO / "scripts/gen_cli_docs.py")],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout


def test_cli_reference_is_generated_from_the_parsers() -> None:
    assert (REPO / "docs/cli.md").read_text() == _generated(), (
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py --write"
    )


def test_the_reference_covers_every_command() -> None:
    from aioxen.cli import build_parser

    text = _generated()
    progs = [p.prog for p in _generator()._walk(build_parser())]
    assert len(progs) > 15  # aioxen, its commands and their subcommands
    for prog in progs:
        assert f"`{prog}`\n\n```text\nusage: {prog} " in text, prog


def test_the_check_sees_a_changed_parser() -> None:
    """A help text changed in the code changes the generated page (the test can fail)."""
    import argparse

    gen = _generator()
    before = gen.generate()
    original = argparse.ArgumentParser.format_help

    def patched(self: argparse.ArgumentParser) -> str:
        text = original(self)
        return text.replace("xenstored", "xenstore-daemon") if "xenstored" in self.prog else text

    argparse.ArgumentParser.format_help = patched  # type: ignore[method-assign]
    try:
        after = gen.generate()
    finally:
        argparse.ArgumentParser.format_help = original  # type: ignore[method-assign]
    assert after != before
