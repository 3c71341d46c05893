"""Module docstrings name only things that exist.

A Sphinx-style reference to a bare name (``:func:`close_done```, ``:class:`Engine```) in a
module's theory-of-operation docstring must be defined or imported in that module: a
renamed or deleted function otherwise leaves the docs pointing at nothing (issue 15: the
xenbus state machine cited a ``closing_steps`` that never existed).  Fully qualified
references (``aioxen...``, ``asyncio...``) are left to the docs build.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "aioxen"

# Every module (issue 16: the docstrings' references are cross-references of the docs site).
CHECKED = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py"))

_REF = re.compile(r":(?:func|class|meth|data|attr|exc):`~?([A-Za-z_][\w.]*)`")
# The mkdocstrings/autorefs form the docstrings use now: [`name`][] or [`title`][target].
_XREF = re.compile(r"\[`([A-Za-z_][\w.]*)`\]\[\]|\[`[^`]*`\]\[([A-Za-z_][\w.]*)\]")


def broken_refs(source: str) -> list[str]:
    """The bare-name references in ``source``'s module docstring that it does not define."""
    tree = ast.parse(source)
    names: set[str] = set(dir(__builtins__))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    doc = ast.get_docstring(tree) or ""
    refs = _REF.findall(doc) + [a or b for a, b in _XREF.findall(doc)]
    return [
        ref
        for ref in refs
        if not ref.startswith(("aioxen.", "asyncio.")) and ref.split(".")[0] not in names
    ]


def test_the_check_finds_a_missing_name() -> None:
    assert broken_refs('"""See :func:`closing_steps`."""\ndef close_done(): ...\n') == [
        "closing_steps"
    ]
    assert broken_refs('"""See :func:`close_done`."""\ndef close_done(): ...\n') == []
    assert broken_refs('"""See [`closing_steps`][]."""\ndef close_done(): ...\n') == [
        "closing_steps"
    ]
    assert broken_refs('"""See [`it`][closing_steps]."""\n') == ["closing_steps"]
    assert broken_refs('"""See [`close_done`][]."""\ndef close_done(): ...\n') == []


@pytest.mark.parametrize("module", CHECKED)
def test_module_docstring_references_exist(module: str) -> None:
    assert broken_refs((ROOT / module).read_text()) == [], module


_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj|const):`")


def sphinx_roles(source: str) -> list[str]:
    """Sphinx roles left in the docstrings of ``source`` (mkdocs shows them as raw text)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=False) or ""
            found += [line.strip() for line in doc.splitlines() if _ROLE.search(line)]
    return found


def test_the_role_check_finds_a_role() -> None:
    assert sphinx_roles('def f():\n    """See :func:`g`."""\n') == ["See :func:`g`."]
    assert sphinx_roles('def f():\n    """See [`g`][]."""\n') == []


@pytest.mark.parametrize("module", CHECKED)
def test_no_sphinx_roles_in_docstrings(module: str) -> None:
    """The docs site renders docstrings as Markdown: cross-references are written
    ``[`name`][]`` (resolved in the docstring's scope) or ``[`title`][aioxen.full.path]``."""
    assert sphinx_roles((ROOT / module).read_text()) == [], module
