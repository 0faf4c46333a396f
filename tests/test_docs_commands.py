"""The docs check: every command in a code block of the README and docs/ runs, or says why not.

Each ``nlakit ...`` line is parsed by the real CLI parser (the subcommand, every flag and every
typed value must exist and convert); each ``python FILE.py`` names a file of the repository;
each ``make TARGET`` is a target of the Makefile. A synopsis line may write optional flags in
square brackets and end in ``...``. The generated reference (docs/reference/) has its own test.

Then every ``nlakit`` command is *run* (from a scratch folder that sees the repository's
configs/), unless a comment on its line marks it:
  [long]    minutes or more on 2 CPU cores, or it reads what such a command writes (runs/...);
  [gpu]     made for a GPU;
  [server]  runs until stopped (the viewer).
A ``python FILE.py`` command must carry one of the marks: the scripts are benchmarks and probes.
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


MARK = re.compile(r"\[(long|gpu|server)\]")


def _code_lines(path: Path, with_marks: bool = False):
    """(line number, command) of each line in the file's fenced code blocks, continuation
    lines joined and comments dropped; with_marks: (line number, command, mark or None)."""
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
        command, mark = _without_comment(buffer.strip()), MARK.search(buffer)
        buffer = ""
        if command:
            yield (start, command, mark and mark.group(1)) if with_marks else (start, command)


def _without_comment(line: str) -> str:
    return re.split(r"(?:^|\s)#\s", line, maxsplit=1)[0].strip()


def _argv(text: str) -> list[str]:
    text = re.sub(r"\$'(?:[^'\\]|\\.)*'", "TEXT", text)  # bash $'...' strings
    text = re.sub(r"\[([^\[\]]*)\]", r"\1", text).replace("...", " ").replace("…", " ")
    return shlex.split(text)


def _commands(kind: str, marked: bool | None = None):
    """pytest params of the commands of one kind; marked True/False: only those with/without
    a mark."""
    pattern = {"nlakit": r"(?:^|[\s/])nlakit (.*)$",
               "python": r"python3?(?: -m)? ((?:[\w.-]+/)+[\w.-]+\.py)\b",
               "make": r"^make ([a-z][\w-]*)"}[kind]
    for path in DOCS:
        for number, line, mark in _code_lines(path, with_marks=True):
            if marked is not None and bool(mark) != marked:
                continue
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


@pytest.mark.parametrize("command", list(_commands("nlakit", marked=False)))
def test_every_unmarked_nlakit_command_runs(command, tmp_path, monkeypatch):
    from nlakit.run.cli import main

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    argv = _argv(command.split("|")[0])
    assert main(argv) == 0, f"`nlakit {command}` failed; fix it or mark it [long]/[gpu]/[server]"


def test_every_script_in_the_docs_is_marked():
    unmarked = [p.id for p in _commands("python", marked=False)]
    assert not unmarked, f"python scripts without a [long]/[gpu] mark: {unmarked}"


def test_the_check_runs_commands():
    ran = list(_commands("nlakit", marked=False))
    assert len(ran) >= 5, [p.id for p in ran]
