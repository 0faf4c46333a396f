"""The command reference under docs/reference/, generated from the CLI's own parser.

`render_reference()` walks `nlakit.run.cli.build_parser()` (every subcommand with all its flags)
and returns one markdown page per command, keyed by its path under docs/ ("reference/eval.md",
"reference/train-av.md", ...), plus "reference/index.md". A page lists each flag with the
default and help that ``nlakit COMMAND --help`` shows; the stage subcommands' flags are the
fields of their config dataclasses (`nlakit.run.pipeline.STAGE_TABLE`), so their pages also name
the pipeline YAML section and the key of each flag.

    python -m nlakit.run.docs_reference docs/           # write docs/reference/*.md
    python -m nlakit.run.docs_reference docs/ --check   # exit 1 when a page is out of date

tests/test_docs_reference.py fails when docs/reference/ differs from what this renders.
"""

from __future__ import annotations

import argparse
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path

REFERENCE_DIR = "reference"
REGENERATE = "python -m nlakit.run.docs_reference docs/"
GENERATED = (f"Generated from the code by `{REGENERATE}`; do not edit by hand. "
             "`nlakit COMMAND --help` prints the same flags.")

EMPTY = "(empty)"  # the default shown for an empty list

# The pipeline YAML's top-level keys (`nlakit.run.pipeline.PipelineConfig` has no help strings).
TOP_LEVEL_HELP = {
    "name": "the run's name (letters, digits, - _ .); outputs go to RUNS_DIR/NAME/",
    "model": "the target model: smollm2-135m, a .gguf file, a local Hugging Face directory "
             "or a hub id",
    "layer": "block K whose output is read (None: floor(2L/3))",
    "dtype": "float32, bfloat16, float16 or auto (None: bfloat16 on a GPU that has it, else "
             "float32); given to extract, train av/ar/control/rl, eval, audit and a labeller "
             "that runs a model",
    "device": "cpu, cuda, cuda:N or auto (None: cpu); given to extract, label_ar, eval, audit "
              "and a labeller that runs a model",
    "threads": "torch intra-op threads (torch.set_num_threads; None: torch's default)",
    "runs_dir": "the directory that holds the run directories",
}


# ---- walking the parser -----------------------------------------------------------------------


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()
             ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """(words, parser, one-line help) of every subcommand, depth first in the parser's order;
    a command with subcommands of its own (``train``) comes before them."""
    sub = _subparsers(parser)
    if sub is None:
        return []
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    out = []
    for name, child in sub.choices.items():
        out.append(((*words, name), child, helps.get(name, "")))
        out.extend(commands(child, (*words, name)))
    return out


def page_path(words: tuple[str, ...]) -> str:
    return f"{REFERENCE_DIR}/{'-'.join(words)}.md"


def _stage_of(words: tuple[str, ...]):
    from nlakit.run.pipeline import STAGE_TABLE

    return next((s for s in STAGE_TABLE if s.command == words), None)


# ---- markdown ---------------------------------------------------------------------------------


def _code(text: str) -> str:
    """An inline code span of `text` (newlines shown as \\n) that survives a table cell."""
    text = text.replace("\n", "\\n").replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _text(text: str) -> str:
    """Help text for a table cell: one line, the characters markdown would eat escaped."""
    text = " ".join(text.split())
    return text.replace("|", "\\|").replace("<", "&lt;").replace("*", "\\*")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell or "–" for cell in row) + " |" for row in rows]
    return lines


def _help(action: argparse.Action, prog: str) -> str:
    """The help as argparse prints it (``%(default)s`` expanded, ``%%`` as ``%``)."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return action.help % params


def _value_text(value) -> str:
    """A default as the generated flags' help shows it (`nlakit.run.cli._default_text`)."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def split_default(action: argparse.Action, help_text: str) -> tuple[str, str]:
    """(default, help without it): a generated flag's help ends with "(default: X)" or
    "(required)"; another flag's default is argparse's own."""
    if help_text.endswith(")"):
        for marker in (" (default: ", "(default: "):
            at = help_text.rfind(marker)
            if at >= 0 and (marker[0] == " " or at == 0):
                value = help_text[at + len(marker):-1]
                return value or EMPTY, help_text[:at].rstrip()
        for marker in (" (required)", "(required)"):
            if help_text.endswith(marker):
                return "required", help_text[:-len(marker)].rstrip()
    if action.required:
        return "required", help_text
    if action.default is argparse.SUPPRESS:
        return "", help_text
    return _value_text(action.default), help_text


def _default_cell(default: str) -> str:
    """A default in a table: code, "empty" for an empty list, "–" for none shown."""
    if default == EMPTY:
        return "empty"
    return _code(default) if default else "–"


def _flag(action: argparse.Action) -> str:
    takes_value = action.nargs != 0 and not isinstance(
        action, argparse.BooleanOptionalAction)
    metavar = action.metavar or action.dest.split(":")[-1].upper()
    return ", ".join(_code(f"{s} {metavar}" if takes_value else s)
                     for s in action.option_strings)


def _yaml_key(action: argparse.Action, stage) -> str:
    """The pipeline key a stage subcommand's flag sets."""
    from nlakit.run.cli import OPTION_GROUPS, SHORTHANDS

    group, _, name = action.dest.partition(":")
    if not name:  # --config itself
        return "–"
    if group == "config":
        return f"top level {_code(name)}" if name in stage.exclude else _code(name)
    if group == "options":
        return _code(f"{OPTION_GROUPS[stage.name][0]}.{name}")
    if group == "shorthand":
        field_name, value, _ = SHORTHANDS[stage.command][name]
        return _code(f"{field_name}: {'null' if value is None else value}")
    return "–"


def _group_note(title: str, stage) -> str:
    from nlakit.run.cli import OPTION_GROUPS

    if stage is None:
        return ""
    kind = title.rsplit("(", 1)[-1].rstrip(")") if title.endswith(")") else ""
    if kind == "config":
        return (f"The stage's settings: the keys of the pipeline section `{stage.name}` "
                "(the key column).")
    if kind == "inputs":
        return ("Where the stage reads and writes, and how it runs; in a pipeline these come "
                "from the run directory and the top-level keys, not from the section.")
    if kind == "options":
        return (f"The `{OPTION_GROUPS[stage.name][0]}` mapping of the section; each component "
                "takes only its own options, and one it does not take is an error. Without a "
                "value each uses its own default (in the help).")
    return ""


def _flag_rows(parser: argparse.ArgumentParser, group, stage) -> list[tuple[str, ...]]:
    rows = []
    for action in group._group_actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        if action.help == argparse.SUPPRESS:
            continue
        default, help_text = split_default(action, _help(action, parser.prog))
        if action.choices is not None and not isinstance(action, argparse.BooleanOptionalAction):
            help_text = (f"{help_text}; " if help_text else "") + "one of " + ", ".join(
                map(str, action.choices))
        row = (_flag(action), _default_cell(default), _text(help_text))
        if stage is not None:
            row = (row[0], _yaml_key(action, stage), *row[1:])
        rows.append(row)
    return rows


def _usage(words: tuple[str, ...], parser: argparse.ArgumentParser) -> str:
    parts = ["nlakit", *words]
    if _subparsers(parser) is not None:
        return " ".join([*parts, "{" + ",".join(_subparsers(parser).choices) + "}", "..."])
    if any(a.option_strings and not isinstance(a, argparse._HelpAction)
           for a in parser._actions):
        parts.append("[FLAGS]")
    for action in parser._actions:
        if action.option_strings:
            continue
        name = action.metavar or action.dest.upper()
        parts.append(f"[{name}]" if action.nargs == "?" else name)
    return " ".join(parts)


# ---- pages ------------------------------------------------------------------------------------


def _stage_section(stage) -> list[str]:
    lines = ["## Pipeline section", "",
             f"In `nlakit pipeline CONFIG.yaml` this stage reads the section `{stage.name}:`; "
             f"`--config FILE.yaml` reads the same keys here, and flags override them. An "
             f"unknown key is an error."]
    if stage.inherits:
        lines.append(f"The section starts from the `{stage.inherits}` section's settings; its "
                     "own keys override them.")
    if stage.enabled is not None:
        lines.append(f"The key `enabled` (default `{str(stage.enabled).lower()}`) switches the "
                     "stage on or off in the pipeline.")
    top = [k for k in stage.exclude if k in TOP_LEVEL_HELP]
    if top:
        lines.append("Set at the pipeline's top level, not in the section: "
                     + ", ".join(f"`{k}`" for k in top) + ".")
    lines += ["", "Keys: " + ", ".join(f"`{k}`" for k in sorted(stage.section_keys())) + ".",
              ""]
    after = list(stage.upstream) + [f"{u} (when enabled)" for u in stage.optional_upstream]
    lines.append(f"Runs after: {', '.join(after) if after else 'nothing (the first stage)'}. "
                 f"Output: `runs/NAME/{stage.outputs[0]}`.")
    if stage.training:
        lines.append("A training stage: under `torchrun` / `accelerate launch` it runs in "
                     "every process.")
    return [*lines, ""]


def command_page(words: tuple[str, ...], parser: argparse.ArgumentParser, help_text: str
                 ) -> str:
    stage = _stage_of(words)
    title = " ".join(words)
    about = _text(parser.description or help_text)
    lines = [f"# nlakit {title}", "", about[:1].upper() + about[1:], "",
             GENERATED, "", "```", _usage(words, parser), "```", ""]
    sub = _subparsers(parser)
    if sub is not None:
        lines += ["## Subcommands", ""]
        lines += _table(("command", "what it does"),
                        [(f"[`nlakit {title} {w[-1]}`]({Path(page_path(w)).name})", _text(h))
                         for w, _, h in commands(parser, words)])
        return "\n".join(lines) + "\n"
    if stage is not None:
        lines += _stage_section(stage)
    positional = [a for a in parser._actions if not a.option_strings
                  and not isinstance(a, argparse._SubParsersAction)]
    if positional:
        lines += ["## Arguments", ""]
        lines += _table(("argument", "help"),
                        [(_code(a.metavar or a.dest.upper()),
                          _text(_help(a, parser.prog))) for a in positional])
        lines.append("")
    header = ("flag", "key", "default", "help") if stage is not None else (
        "flag", "default", "help")
    groups = [(g, _flag_rows(parser, g, stage)) for g in parser._action_groups]
    if any(rows for _, rows in groups):
        lines += ["## Flags", ""]
    for group, rows in groups:
        if not rows:
            continue
        name = "general" if group.title in ("options", "optional arguments") else group.title
        lines += [f"### {name}", ""]
        note = _group_note(group.title or "", stage)
        if note:
            lines += [note, ""]
        lines += [*_table(header, rows), ""]
    if words == ("pipeline",):
        lines += _pipeline_config()
    return "\n".join(lines).rstrip("\n") + "\n"


def _field_default(f) -> str:
    if f.default_factory is not MISSING:
        return _value_text(f.default_factory()) or EMPTY
    return "required" if f.default is MISSING else _value_text(f.default) or EMPTY


def _pipeline_config() -> list[str]:
    from nlakit.run.pipeline import STAGE_TABLE, PipelineConfig

    sections = {s.name for s in STAGE_TABLE if s.config is not None}
    lines = ["## The config file", "",
             "A pipeline YAML holds the top-level keys below and one section per stage. An "
             "unknown key is an error, before any work; `--set KEY=VALUE` edits the file's "
             "values (e.g. `--set train_rl.max_steps=8`).", "", "### Top-level keys", ""]
    rows = [(_code(f.name), _default_cell(_field_default(f)), _text(TOP_LEVEL_HELP.get(f.name, "")))
            for f in fields(PipelineConfig) if f.name not in sections]
    lines += [*_table(("key", "default", "meaning"), rows), "", "### Sections", "",
              "One per stage, in the order the stages run; each holds the keys of the stage's "
              "config class.", ""]
    rows = []
    for stage in STAGE_TABLE:
        if stage.config is None:
            continue
        page = (f"[`nlakit {' '.join(stage.command)}`]({Path(page_path(stage.command)).name})"
                if stage.command else "– (below)")
        enabled = ("always" if stage.enabled is None
                   else f"`enabled: {str(stage.enabled).lower()}` by default")
        rows.append((_code(stage.name), page, _code(stage.config), enabled,
                     _code(f"runs/NAME/{stage.outputs[0]}")))
    lines += [*_table(("section", "command", "config class", "runs", "output"), rows), ""]
    lines.append("The `nla` stage has no section: it links the final checkpoint (`rl/`, or "
                 "`sft/` when `train_rl` is disabled) as `runs/NAME/nla`.")
    lines.append("")
    for stage in STAGE_TABLE:
        if stage.config is None or stage.command is not None:
            continue
        cls = stage.config_class()
        lines += [f"### Section `{stage.name}` (no subcommand)", "",
                  _text((cls.__doc__ or "").strip()), ""]
        if stage.enabled is not None:
            lines += [f"The key `enabled` (default `{str(stage.enabled).lower()}`) switches "
                      "it on or off.", ""]
        hints = typing.get_type_hints(cls)
        rows = [(_code(f.name), _default_cell(_field_default(f)), _text(f.metadata.get("help", "")))
                for f in fields(cls) if not f.name.startswith("_") and f.name in hints]
        lines += [*_table(("key", "default", "help"), rows), ""]
    return lines


def index_page(parser: argparse.ArgumentParser) -> str:
    lines = ["# Command reference", "", GENERATED, "",
             "One page per `nlakit` subcommand. The stage subcommands' pages also give the "
             "pipeline YAML section each one reads (`nlakit pipeline`, `--config FILE.yaml`).",
             "", "## Commands", ""]
    rows = [(f"[`nlakit {' '.join(w)}`]({Path(page_path(w)).name})", _text(h))
            for w, _, h in commands(parser)]
    lines += [*_table(("command", "what it does"), rows), "", "## Flags of every command", ""]
    rows = [(_flag(a), _text(_help(a, parser.prog)))
            for a in parser._actions if a.option_strings
            and not isinstance(a, argparse._HelpAction)]
    rows.append((_code("-h") + ", " + _code("--help"), "print the command's help and exit"))
    lines += _table(("flag", "help"), rows)
    lines += ["", "`nlakit -v COMMAND ...` shows every library warning and log line; without "
              "it, known harmless ones are hidden.", ""]
    return "\n".join(lines)


def render_reference() -> dict[str, str]:
    """{path under docs/: markdown} of every reference page, from the real parser."""
    from nlakit.run.cli import build_parser

    parser = build_parser()
    pages = {f"{REFERENCE_DIR}/index.md": index_page(parser)}
    for words, child, help_text in commands(parser):
        pages[page_path(words)] = command_page(words, child, help_text)
    return pages


# ---- writing ----------------------------------------------------------------------------------


def stale_pages(docs: str | Path, pages: dict[str, str]) -> list[str]:
    """Paths under `docs` that differ from `pages`: missing, changed, or a page under
    reference/ that is no longer rendered."""
    docs = Path(docs)
    wrong = [p for p, text in pages.items()
             if not (docs / p).is_file() or (docs / p).read_text(encoding="utf-8") != text]
    here = sorted(str(f.relative_to(docs)) for f in (docs / REFERENCE_DIR).glob("*.md")) \
        if (docs / REFERENCE_DIR).is_dir() else []
    return sorted(wrong + [p for p in here if p not in pages])


def write_reference(docs: str | Path) -> tuple[list[str], list[str]]:
    """Write every page under `docs` (each atomically: a temporary file, then os.replace) and
    delete pages of commands that no longer exist; returns (written, removed)."""
    from nlakit.fileio import write_text_atomic

    docs = Path(docs)
    pages = render_reference()
    changed = stale_pages(docs, pages)
    written, removed = [], []
    for path in changed:
        if path in pages:
            write_text_atomic(docs / path, pages[path])
            written.append(path)
        else:
            (docs / path).unlink()
            removed.append(path)
    return written, removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nlakit.run.docs_reference",
                                 description="write the command reference under DOCS/reference/")
    ap.add_argument("docs", help="the docs folder (docs/)")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 when a page differs from the code")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_pages(args.docs, render_reference())
        for path in stale:
            print(f"out of date: {Path(args.docs) / path}")
        print(f"regenerate with: {REGENERATE}" if stale
              else f"{Path(args.docs) / REFERENCE_DIR} is up to date")
        return 1 if stale else 0
    written, removed = write_reference(args.docs)
    for path in written:
        print(f"wrote {Path(args.docs) / path}")
    for path in removed:
        print(f"removed {Path(args.docs) / path}")
    if not written and not removed:
        print(f"{Path(args.docs) / REFERENCE_DIR} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
