"""Write docs/cli.md, the command-line reference, from the click commands themselves.

Every command of the ``vqprior`` group, in the order the group registers them, with its help text, usage line,
arguments and every option: names, value type, default and help. tests/test_docs.py fails when the committed page
differs from what this script writes, so the reference cannot drift from ``--help``.

    python scripts/cli_reference.py            # rewrite docs/cli.md
    python scripts/cli_reference.py --check    # exit 1 if docs/cli.md is stale
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "cli.md"
REGENERATE = "python scripts/cli_reference.py"


def help_markdown(text: str | None) -> str:
    """Click help text as Markdown: each paragraph on one line (Markdown wraps it), ``\\b`` paragraphs (which click
    prints unwrapped) as preformatted blocks, nothing after ``\\f`` (which click hides)."""
    text = (text or "").split("\f")[0]
    blocks = []
    for paragraph in text.strip().split("\n\n"):
        lines = [line.rstrip() for line in paragraph.strip("\n").splitlines()]
        if lines and lines[0].strip() == "\b":
            blocks.append("```\n" + textwrap.dedent("\n".join(lines[1:])) + "\n```")
        else:
            blocks.append(" ".join(line.strip() for line in lines))
    return "\n\n".join(b for b in blocks if b)


def cell(text: str) -> str:
    """One table cell: a single line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def value_type(param: click.Parameter) -> str:
    """What the parameter takes: choices, a number with its range, a path, text; empty for a flag."""
    if isinstance(param, click.Option) and param.is_flag:
        return ""
    kind = param.type
    if isinstance(kind, click.Choice):
        described = " \\| ".join(f"`{c}`" for c in kind.choices)
    else:
        described = {"integer range": "integer", "float range": "float", "text": "text"}.get(kind.name, kind.name)
        describe_range = getattr(kind, "_describe_range", None)  # click's IntRange / FloatRange, as --help shows it
        if describe_range is not None:
            described += f" ({describe_range()})"
    if getattr(param, "multiple", False) or param.nargs == -1:
        described += ", repeatable"
    return described


UNSET = getattr(click.core, "UNSET", None)  # click >= 8.3 marks "no default" with a sentinel, older with None


def default_text(param: click.Parameter, ctx: click.Context) -> str:
    """The default as the command sees it when the option is not given."""
    if param.required:
        return "required"
    default = param.get_default(ctx, call=False)
    default = None if default is UNSET else default
    if isinstance(param, click.Option) and param.is_flag and not param.secondary_opts:
        return "off" if not default else "on"
    if isinstance(param, click.Option) and param.secondary_opts:
        return {True: param.opts[0], False: param.secondary_opts[0]}.get(default, "-")
    if default is None or default == ():
        return "-"
    if callable(default):
        return "computed"
    return f"`{default}`"


def option_names(param: click.Option) -> str:
    """``--x``, its aliases, and the ``--no-x`` of an on/off switch."""
    names = ", ".join(f"`{n}`" for n in param.opts)
    return names + "".join(f" / `{n}`" for n in param.secondary_opts)


def command_section(name: str, command: click.Command, parent: click.Context) -> str:
    ctx = click.Context(command, info_name=name, parent=parent)
    usage = " ".join(command.collect_usage_pieces(ctx))
    out = [f"## `vqprior {name}`", "", help_markdown(command.help), "", "```", f"vqprior {name} {usage}", "```", ""]
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    if arguments:
        out += ["| argument | takes |", "|---|---|"]
        out += [f"| `{p.human_readable_name}` | {value_type(p)}{'' if p.required else ' (optional)'} |"
                for p in arguments]
        out.append("")
    options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden]
    out += ["| option | takes | default | what it does |", "|---|---|---|---|"]
    out += [f"| {option_names(p)} | {value_type(p)} | {cell(default_text(p, ctx))} | {cell(p.help or '')} |"
            for p in options]
    out += ["| `-h`, `--help` | | | Show the help and exit. |", ""]
    return "\n".join(out)


def render() -> str:
    """The whole page."""
    from vqprior.commands.cli import cli

    root = click.Context(cli, info_name="vqprior")
    names = list(cli.commands)
    page = [
        "# Command-line reference",
        "",
        f"Generated from the click commands by `{REGENERATE}`; do not edit by hand (tests/test_docs.py checks that "
        "this page is what the script writes). Every command also answers `--help`. What the commands share (run "
        "folders, resuming, fine-tuning, outputs, errors) and how they fit together: [usage.md](usage.md).",
        "",
        help_markdown(cli.help),
        "",
        "```",
        "vqprior [--version] [-h] COMMAND [ARGS]...",
        "```",
        "",
        "| option | what it does |",
        "|---|---|",
    ]
    page += [f"| {option_names(p)} | {cell(p.help or '')} |" for p in cli.params if isinstance(p, click.Option)]
    page += ["| `-h`, `--help` | Show the help and exit. |", "", "Commands: " + ", ".join(
        f"[`{n}`](#vqprior-{n})" for n in names) + ".", ""]
    page += [command_section(n, cli.commands[n], root) for n in names]
    return "\n".join(page).rstrip("\n") + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/cli.md differs from what it would write")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PAGE.read_text() if PAGE.exists() else ""
        if current != text:
            print(f"docs/cli.md is stale: run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    with tempfile.NamedTemporaryFile("w", dir=PAGE.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(text)
    os.replace(tmp.name, PAGE)
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
