"""The docs check: every command shown in a code block of the README and docs/ is still a command.

Each ``nlakit ...`` line is parsed by the real CLI parser (the subcommand, every flag and every
typed value must exist and convert); each ``python FILE.py`` names a file of the repository;
each ``make TARGET`` is a target of the Makefile. A synopsis line may write optional flags in
square brackets and end in ``...``. The generated reference (docs/reference/) has its own test.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from nlakit.run.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md")
                                    if "reference" not in p.parts)]


def _code_lines(path: Path):
    """(line number, command) of each line in the file's fenced code blocks, continuation
    lines joined and comments dropped."""
    lines = path.read_text().splitlines()
    inside, start, buffer = False, 0, ""
    for i, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            inside, buffer = not inside, ""
            continue
        if not inside:
            continue
        if not buffer:
            start = i
        buffer += line.rstrip().removesuffix("\\") + " "
        if line.rstrip().endswith("\\"):
            continue
        command, buffer = _without_comment(buffer.strip()), ""
        if command:
            yield start, command


def _without_comment(line: str) -> str:
    return re.split(r"(?:^|\s)#\s", line, maxsplit=1)[0].strip()


def _argv(text: str) -> list[str]:
    text = re.sub(r"\$'(?:[^'\\]|\\.)*'", "TEXT", text)  # bash $'...' strings
    text = re.sub(r"\[([^\[\]]*)\]", r"\1", text).replace("...", " ").replace("…", " ")
    return shlex.split(text)


def _commands(kind: str):
    pattern = {"nlakit": r"(?:^|[\s/])nlakit (.*)$",
               "python": r"python3?(?: -m)? ((?:[\w.-]+/)+[\w.-]+\.py)\b",
               "make": r"^make ([a-z][\w-]*)"}[kind]
    for path in DOCS:
        for number, line in _code_lines(path):
            for found in re.findall(pattern, line):
                if kind != "nlakit" or not line.startswith(("import ", "from ")):
                    yield pytest.param(found, id=f"{path.relative_to(ROOT)}:{number}")


@pytest.mark.parametrize("command", list(_commands("nlakit")))
def test_every_nlakit_command_in_the_docs_parses(command):
    argv = _argv(command.split("|")[0])
    try:
        build_parser(argv).parse_args(argv)
    except SystemExit as e:  # argparse's error: an unknown subcommand, flag or value
        pytest.fail(f"`nlakit {command}` no longer parses (exit {e.code})")


@pytest.mark.parametrize("path", list(_commands("python")))
def test_every_script_in_the_docs_exists(path):
    assert (ROOT / path).is_file(), f"{path} is not in the repository"


def test_every_make_target_in_the_docs_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    shown = {p.values[0] for p in _commands("make")}
    assert shown and shown <= targets, f"not in the Makefile: {sorted(shown - targets)}"


def test_the_check_sees_the_readme_s_commands():
    ids = [p.id for p in _commands("nlakit")]
    assert sum(i.startswith("README.md:") for i in ids) >= 5 and len(ids) >= 50
