"""The commands the documentation shows work: the README's five-minute tour runs as written (shipped checkpoints and
the bundled sample, in a scratch folder), and every other ``vqprior`` command in a code block of the README, docs/
and checkpoints/README.md parses against the CLI (the command exists, every option exists and takes a valid value,
no stray arguments), so a renamed option cannot leave a page behind. Commands that need the full datasets or hours
of training are parsed, not run; what they do is tested on tiny configurations elsewhere.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from cli_support import README_REDUCED, reduced, run_cli, whole_option
from conftest import REPO, markdown_pages
from vqprior.commands.cli import cli

OPERATORS = {";", "|", "||", "&", "&&", ">", ">>", "2>", "<"}


def logical_lines(block: list[str]):
    """The lines of a code block with backslash continuations joined."""
    line = ""
    for raw in block:
        line += raw.strip()
        if line.endswith("\\"):
            line = line[:-1] + " "
            continue
        yield line
        line = ""
    if line:
        yield line


def code_blocks(text: str) -> list[list[str]]:
    """Fenced blocks, and indented blocks (4 spaces after a blank line), each as its list of lines."""
    blocks, fenced, indented, previous = [], None, None, ""
    for line in text.splitlines():
        if fenced is not None:
            if line.startswith("```"):
                blocks.append(fenced)
                fenced = None
            else:
                fenced.append(line)
        elif line.startswith("```"):
            fenced = []
        elif line.startswith("    ") and line.strip() and (indented is not None or not previous.strip()):
            if indented is None:
                indented = []
                blocks.append(indented)
            indented.append(line)
        elif line.strip():
            indented = None
        previous = line
    return blocks


def commands_in(text: str) -> list[list[str]]:
    """The argument lists (after ``vqprior``) of the commands in the code blocks of a page, shell variables assigned
    earlier in the same block expanded, cut at the first shell operator or comment."""
    found = []
    for block in code_blocks(text):
        variables = {}
        for line in logical_lines(block):
            assignment = re.match(r"^([A-Za-z_]\w*)=(.*)$", line)
            if assignment:
                variables[assignment.group(1)] = " ".join(shlex.split(assignment.group(2), comments=True))
                continue
            if not re.match(r"(\.venv/bin/)?vqprior\s|torchrun\s.*-m vqprior\.commands\.cli\s", line):
                continue  # not a vqprior command (python, shell, other tools)
            line = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), m.group(0)), line)
            words = shlex.split(line, comments=True)
            start = next(i + 1 for i, w in enumerate(words)
                         if w in ("vqprior", ".venv/bin/vqprior", "vqprior.commands.cli"))
            args = []
            for word in words[start:]:
                if word in OPERATORS or word.endswith(";"):
                    args += [word.rstrip(";")] if word.endswith(";") and word != ";" else []
                    break
                args.append(word)
            found.append(args)
    return found


def parse(args: list[str]) -> None:
    """Parse ``vqprior ARGS`` as click would, without running anything or checking files: the command exists, each
    option exists, each value converts (choices, numbers), the arguments are all taken and the required ones given."""
    root = click.Context(cli, info_name="vqprior")
    if args and args[0].startswith("-"):
        cli.make_parser(root).parse_args(list(args))  # group options only (--version, --help)
        return
    assert args, "no command"
    command = cli.get_command(root, args[0])
    assert command is not None, f"no command {args[0]}"
    ctx = click.Context(command, info_name=args[0], parent=root)
    values, extra, order = command.make_parser(ctx).parse_args(list(args[1:]))
    assert not extra, f"unexpected arguments {extra}"
    for param in order:
        value = values.get(param.name)
        if value is None or isinstance(param.type, click.Path) or getattr(param, "is_flag", False):
            continue
        many = getattr(param, "multiple", False) or param.nargs != 1
        for item in value if many else [value]:
            param.type.convert(item, param, ctx)
    unset = getattr(click.core, "UNSET", None)
    missing = [p.name for p in command.params if p.required and values.get(p.name, unset) in (None, unset)]
    resumed = "--resume" in args  # a resumed run takes its data and model options from the run folder
    assert not missing or resumed, f"missing {missing}"


DOCUMENTED = [(page, args) for page in markdown_pages() if page != REPO / "docs" / "cli.md"  # cli.md: usage synopses
              for args in commands_in(page.read_text())]


def test_the_pages_show_commands():
    pages = {page.relative_to(REPO).as_posix() for page, _ in DOCUMENTED}
    assert {"README.md", "docs/results.md", "docs/usage.md", "docs/compression.md"} <= pages
    assert len(DOCUMENTED) > 60


@pytest.mark.parametrize("page,args", DOCUMENTED,
                         ids=[f"{p.relative_to(REPO)}:{' '.join(a)[:60]}" for p, a in DOCUMENTED])
def test_documented_command_parses(page, args):
    try:
        parse(args)
    except (click.UsageError, click.BadParameter) as error:
        pytest.fail(f"{page.relative_to(REPO)}: vqprior {' '.join(args)}: {error.format_message()}")


def test_parse_refuses_what_click_refuses():
    """The check above can fail: an unknown command or option, a bad choice or number, a stray or missing argument."""
    parse(["sample", "x.pt", "--num", "3", "--method", "naive"])
    for bad in (["nope"], ["sample", "x.pt", "--bogus"], ["sample", "x.pt", "--method", "weird"],
                ["sample", "x.pt", "--num", "zero"], ["sample", "a.pt", "b.pt"], ["sample"], ["complete", "x.pt"]):
        with pytest.raises((AssertionError, click.UsageError, click.BadParameter)):
            parse(bad)


def tour_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    tour = text.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    return commands_in(tour)


def test_readme_starts_with_the_two_commands():
    first = code_blocks((REPO / "README.md").read_text())[0]
    assert [line.split("#")[0].strip() for line in first] == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)


def test_ci_runs_the_slow_tests_that_make_test_leaves_out():
    makefile = (REPO / "Makefile").read_text()
    recipes = dict(re.findall(r"^([\w-]+):.*\n\t(.*)$", makefile, re.MULTILINE))
    assert recipes["test"].endswith('pytest -q tests -m "not slow"')
    assert recipes["test-slow"].endswith("pytest -q tests -m slow")
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci and "make test-slow" in ci


# Appended to the tour's commands: a few held-out items and samples, and 8x8 images for the pixel model trained here
# (its samples cost one step per value), are enough to show that they run.
FAST = ["--batch-size", "8", "--eval-limit", "8", "--num-samples", "2"]
FAST_FLAGS = {"train-pixels": ["--image-size", "8", *FAST], "train-vqvae": FAST, "train-prior": FAST,
              "extract-codes": ["--limit", "16"]}


def test_every_reduction_is_of_text_the_readme_still_has():
    readme = (REPO / "README.md").read_text()
    stale = [original for original in README_REDUCED if not whole_option(original).search(readme)]
    assert not stale, f"the README no longer says {stale}: update README_REDUCED in tests/cli_support.py"


def test_readme_tour_runs_as_written_at_reduced_size(tmp_cwd):
    """Every command of the tour, in order, in a scratch folder that sees the repository's checkpoints/ and scripts/
    (the tour runs from the repository root), with the substitutions of ``README_REDUCED`` (fewer steps and
    samples; tests/cli_support.py) and the ``FAST_FLAGS`` appended."""
    for folder in ("checkpoints", "scripts"):
        (tmp_cwd / folder).symlink_to(REPO / folder)
    commands = tour_commands()
    assert len(commands) >= 12 and {c[0] for c in commands} >= {"sample", "complete", "train-pixels", "train-vqvae",
                                                                 "extract-codes", "train-prior", "compress"}
    for args in [shlex.split(reduced(shlex.join(c))) for c in commands]:
        args += FAST_FLAGS.get(args[0], [])
        result = run_cli(*args)
        assert result.exit_code == 0, f"vqprior {' '.join(args)}\n{result.output}"
        for option in ("--out", "--save-codes"):
            if option in args:
                written = Path(args[args.index(option) + 1])
                assert written.exists(), f"vqprior {' '.join(args)} did not write {written}"
