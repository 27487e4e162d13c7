"""The design notes cited by module docstrings live in the repository (docs/design.md), and every citation names a
section that exists."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(REPO / "vqprior").rglob("*.py"), *(REPO / "commands").rglob("*.py"),
                  *(REPO / "bench").glob("*.py")])


def test_docstrings_cite_docs_design_sections_that_exist():
    design = (REPO / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## (\d+)\.", design, re.MULTILINE))
    cited = []
    for path in SOURCES:
        text = path.read_text()
        assert "DESIGN.md" not in text, f"{path.relative_to(REPO)} cites DESIGN.md, which is not in the repository"
        cited += [(path, n) for n in re.findall(r"docs/design\.md section (\d+)", text)]
    assert cited, "no module cites docs/design.md"
    for path, n in cited:
        assert n in sections, f"{path.relative_to(REPO)} cites docs/design.md section {n}, which does not exist"
