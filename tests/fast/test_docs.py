"""The guide keeps up with the code: every flag of every command's `--help` is documented in docs/, and every
link in the README and the docs resolves (a file of the repository, and the heading an anchor names)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click

from dtrain.cli import cli

from conftest import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command under `group`, the engines' included, with the words that reach it."""
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))


def flags(command: click.Command) -> list[str]:
    return [opt for param in command.params if isinstance(param, click.Option) for opt in param.opts
            if opt.startswith("--") and opt != "--help"]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def test_every_flag_of_every_command_is_documented():
    text = "\n".join(page.read_text() for page in DOCS)
    missing = [f"dtrain {' '.join(path)} {flag}" for path, command in commands(cli) for flag in flags(command)
               if not re.search(re.escape(flag) + r"(?![\w-])", text)]
    assert missing == []


def test_every_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or anchor and anchor not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_readme_is_a_page_not_a_wall():
    assert len((ROOT / "README.md").read_bytes()) <= 10_000
