"""What the messages and the docs promise each other."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedrad", "client", "server", "privacy", "models")
SECTION = re.compile(r"README section '([^']+)'")


def _headings(markdown: Path) -> set[str]:
    return {
        line.lstrip("#").strip().replace("`", "")
        for line in markdown.read_text().splitlines()
        if line.startswith("#")
    }


def _named_sections() -> list[tuple[str, str]]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in SECTION.findall(path.read_text()):
                found.append((str(path.relative_to(ROOT)), name))
    return found


def test_errors_name_readme_sections() -> None:
    # The check below is not vacuous: messages do point users at README sections.
    assert _named_sections()


@pytest.mark.parametrize(("source", "section"), _named_sections())
def test_every_readme_section_an_error_names_exists(source: str, section: str) -> None:
    assert section in _headings(ROOT / "README.md"), f"{source} names a missing section"


def test_heading_reader_strips_markup(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\n## Site data and `labels.csv`\ntext # not a heading\n")
    assert _headings(readme) == {"t", "Site data and labels.csv"}
