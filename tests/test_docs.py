"""The documentation holds together: the design notes cited by module docstrings exist (docs/design.md, with the
cited sections), docs/cli.md is what scripts/cli_reference.py writes, every relative link of the Markdown pages
resolves (file and heading), every page of docs/ is linked from the front page, and each figure of a shipped model
is written in one place only. The commands the pages show are checked in tests/test_doc_commands.py."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO, load_script, markdown_pages

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


def test_cli_reference_is_what_the_script_writes():
    reference = load_script("cli_reference")
    committed = (REPO / "docs" / "cli.md").read_text()
    assert committed == reference.render(), f"docs/cli.md is stale: run `{reference.REGENERATE}` and commit it"


def test_cli_reference_names_every_command_and_option():
    """The generator walks the whole group: each command's section lists each of its options (so a command or option
    added later cannot be left out of the page by the script)."""
    import click

    from vqprior.commands.cli import cli

    page = load_script("cli_reference").render()
    sections = re.split(r"^## ", page, flags=re.MULTILINE)
    for name, command in cli.commands.items():
        (section,) = [s for s in sections if s.startswith(f"`vqprior {name}`")]
        for param in command.params:
            if isinstance(param, click.Option):
                assert f"| `{param.opts[0]}`" in section, f"{name}: {param.opts[0]} missing from docs/cli.md"
            else:
                assert f"`{param.human_readable_name}`" in section
        if command.help:
            assert " ".join(command.help.split()[:6]) in " ".join(section.split())


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def test_relative_links_resolve_to_files_and_headings():
    broken = []
    for page in markdown_pages():
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            name = f"{page.relative_to(REPO)} -> {target}"
            if not resolved.exists():
                broken.append(f"{name}: no such file")
            elif anchor and anchor not in anchors(resolved):
                broken.append(f"{name}: no such heading")
    assert not broken, "\n".join(broken)


def figure_pattern(figure: str) -> re.Pattern:
    """A figure as a whole number in text: 3.417 but not 3.4173 or 13.417."""
    return re.compile(r"(?<![\d.])" + re.escape(figure) + r"(?!\d)")


def shipped_figures() -> dict[str, str]:
    """{figure: where} for the figures of the shipped models: the test figures of the README's results table (its
    second column) and the re-measured figures of checkpoints/README.md (its last column)."""
    figures = {}
    for page, column in ((REPO / "README.md", 2), (REPO / "checkpoints" / "README.md", -2)):
        rows = [line.split("|") for line in page.read_text().splitlines()
                if line.startswith("| `") and ".pt`" in line.split("|")[1]]
        assert rows, f"no table of shipped models in {page.relative_to(REPO)}"
        for cells in rows:
            for figure in re.findall(r"\d+\.\d+", re.sub(r"\(docs/[^)]*\)", "", cells[column])):
                figures[figure] = f"{page.relative_to(REPO)}, {cells[1].strip()}"
    return figures


def test_each_shipped_figure_is_written_in_one_place():
    figures = shipped_figures()
    assert {"3.411", "0.9497", "30.32", "3.464", "0.9182"} <= set(figures), "the tables were not read"
    texts = {page.relative_to(REPO): page.read_text() for page in markdown_pages()}
    twice = []
    for figure, where in figures.items():
        found = {str(name): len(figure_pattern(figure).findall(text)) for name, text in texts.items()}
        found = {name: n for name, n in found.items() if n}
        if sum(found.values()) != 1:
            twice.append(f"{figure} ({where}) appears in {found}")
    assert not twice, "a shipped figure has one home; link to it instead of repeating it:\n" + "\n".join(twice)


def test_every_docs_page_is_linked_from_the_front_page():
    readme = (REPO / "README.md").read_text()
    linked = {target.partition("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", readme)}
    missing = [f"docs/{page.name}" for page in (REPO / "docs").glob("*.md") if f"docs/{page.name}" not in linked]
    assert not missing, f"pages of docs/ that README.md does not link: {missing}"


def test_front_page_stays_short():
    """A front page a newcomer reads in five minutes, at most about 15 KB; details belong in docs/."""
    size = len((REPO / "README.md").read_bytes())
    assert size <= 16_000, f"README.md is {size} bytes: move details to a page of docs/ and link it"
