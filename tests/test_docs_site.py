"""The built docs site works when opened from disk: page links and search need no server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_links_to_html_files_and_searches_offline(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    index = (site / "index.html").read_text()
    links = set(re.findall(r'<a [^>]*href="([^"#:]+)"', index))
    assert "quickstart.html" in links and "api.html" in links
    # A folder link (`quickstart/`) shows a directory listing, not the page, from file://.
    assert not [link for link in links if link.endswith("/")]
    assert (site / "search" / "search_index.js").is_file()  # the offline plugin's index
