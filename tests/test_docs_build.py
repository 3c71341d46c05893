"""The docs site builds with ``mkdocs build --strict`` and renders the docstrings' references.

An unresolved cross-reference in a rendered docstring, a broken link or a page missing
from the nav fails the strict build; so does a docstring written with Sphinx roles that
the site would show as raw text (checked on the rendered API page).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MKDOCS = Path(sys.executable).parent / "mkdocs"


def test_site_builds_strictly_and_renders_cross_references(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    api = (site / "api" / "index.html").read_text()
    assert not re.search(r":(func|class|meth|mod|data|attr|exc):", api)
    assert len(re.findall(r'<a class="autorefs autorefs-internal"', api)) > 100
    for page in ("install", "cli", "real-xen", "troubleshooting"):
        assert (site / page / "index.html").exists(), page
