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


def load_script(name: str):
    """A module of scripts/ (not a package), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
