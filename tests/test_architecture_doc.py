"""docs/architecture.md's folder map stays true to the tree.

The map is the page a new contributor reads first, so a module that moves or a package
that appears without the map following is a failure here, not a surprise later: every
package under ``aioxen/`` has a row, and every file the map names exists where its row
says.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "architecture.md"
PACKAGE = REPO / "aioxen"


def folder_map_rows() -> list[list[str]]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Folder map", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header


def named_files(row: list[str]) -> tuple[Path, list[str]]:
    """The directory a row is about and the file names (``x.py``, ``x.c``) it mentions."""
    first = re.findall(r"`([^`]+)`", row[0])
    base = REPO / first[0] if first and first[0].endswith("/") else PACKAGE
    names = [
        name
        for cell in row
        for name in re.findall(r"`([^`<>* ]+\.(?:py|c))`", cell)
        if "/" not in name or not name.startswith("aioxen/")
    ]
    names += [n.removeprefix("aioxen/") for n in first if n.startswith("aioxen/") and "." in n]
    return base, names


def test_every_package_has_a_row() -> None:
    mapped = {m for row in folder_map_rows() for m in re.findall(r"`aioxen/(\w+)/`", row[0])}
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages - mapped == set(), f"packages missing from {DOC.name}'s folder map"


def test_every_named_file_exists() -> None:
    missing = []
    for row in folder_map_rows():
        base, names = named_files(row)
        missing += [f"{base.relative_to(REPO)}/{n}" for n in names if not (base / n).exists()]
    assert missing == [], f"{DOC.name} names files that do not exist"


def test_the_map_is_read_at_all() -> None:
    rows = folder_map_rows()
    assert len(rows) >= 10
    assert sum(len(named_files(row)[1]) for row in rows) >= 30
