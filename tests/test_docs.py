"""The README stays a first read, and every relative link in it and in docs/ leads somewhere."""

import re
from pathlib import Path

from tests.conftest import REPO

README_LIMIT_BYTES = 15_000
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _pages():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    heads = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_readme_fits_a_first_read():
    assert len((REPO / "README.md").read_bytes()) <= README_LIMIT_BYTES


def test_every_relative_link_points_to_an_existing_file_and_heading():
    broken = []
    for page in _pages():
        for target in relative_links(page):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_links_and_broken_ones(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Top part\n\n[a](x.md) [b](#top-part) [c](https://e.org) ![img](i.png)\n```\n[d](y.md)\n```\n")
    assert relative_links(page) == ["x.md", "#top-part"]
    assert _anchors(page) == {"top-part"}
