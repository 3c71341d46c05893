"""The layers of docs/architecture.md, checked on the import statements themselves: the
ring, device and XenStore layers never import vchan (vchan is one protocol over the
shared-memory layer, not a library the others lean on), and nothing below the public
APIs imports a platform implementation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aioxen"

# package -> module prefixes it must not import
FORBIDDEN = {
    "rings": ("aioxen.vchan",),
    "net": ("aioxen.vchan",),
    "blk": ("aioxen.vchan",),
    "console": ("aioxen.vchan",),
    "xenbus": ("aioxen.vchan",),
    "xenstore": ("aioxen.vchan", "aioxen.rings", "aioxen.net", "aioxen.blk"),
}


def imported_modules(source: str, package: str) -> list[str]:
    """Absolute names of every module an ``import``/``from ... import`` in ``source`` (a
    module of ``package``) names."""
    tree = ast.parse(source)
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_does_not_import_upward(package: str) -> None:
    files = sorted((PACKAGE / package).rglob("*.py"))
    assert files, f"no modules under aioxen/{package}"
    bad = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in files
        for name in imported_modules(
            path.read_text(), ".".join(path.relative_to(PACKAGE.parent).parts[:-1])
        )
        if name.startswith(FORBIDDEN[package])
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_and_absolute_imports() -> None:
    # the check must be able to fail: what the old aioxen/rings/aio.py imported is seen
    source = "from ..vchan import pollpolicy\nimport aioxen.vchan.wire\nfrom . import sring\n"
    names = imported_modules(source, "aioxen.rings")
    assert "aioxen.vchan.pollpolicy" in names
    assert "aioxen.vchan.wire" in names
    assert "aioxen.rings.sring" in names
