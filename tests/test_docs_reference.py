"""docs/reference/ is generated from the CLI's parser and must match it
(nlakit.run.docs_reference)."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from nlakit.run.docs_reference import REGENERATE, render_reference, stale_pages, write_reference

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return render_reference()


def test_reference_pages_match_the_code(pages):
    stale = stale_pages(DOCS, pages)
    assert not stale, (
        f"docs/reference/ is out of date with the code ({', '.join(stale)}): run "
        f"`{REGENERATE}` from the repository root and commit the pages")


def _leaf_commands(parser: argparse.ArgumentParser, words=()) -> list[tuple[str, ...]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [words]
    out = [words] if words else []
    for name, child in subs[0].choices.items():
        out += _leaf_commands(child, (*words, name))
    return out


def test_every_subcommand_has_a_page(pages):
    from nlakit.run.cli import build_parser
    from nlakit.run.pipeline import STAGE_TABLE

    every = _leaf_commands(build_parser())
    assert ("train", "av") in every and ("eval",) in every and ("serve",) in every
    index = pages["reference/index.md"]
    for words in every:
        name = "-".join(words)
        assert f"reference/{name}.md" in pages, f"no page for `nlakit {' '.join(words)}`"
        assert f"]({name}.md)" in index, f"index.md does not link `nlakit {' '.join(words)}`"
        assert pages[f"reference/{name}.md"].startswith(f"# nlakit {' '.join(words)}\n")
    for stage in STAGE_TABLE:  # a stage's page names its pipeline section and every key
        if stage.command is None:
            continue
        page = pages[f"reference/{'-'.join(stage.command)}.md"]
        assert f"the section `{stage.name}:`" in page
        for key in stage.section_keys() - {"enabled"}:
            assert f"`{key}`" in page, f"{stage.name}.{key} missing from its page"


def _default_shown(page: str, flag: str) -> str:
    """The default column of `flag`'s row (a stage page: flag | key | default | help)."""
    rows = [line for line in page.splitlines() if line.startswith(f"| `{flag} ")]
    assert len(rows) == 1, f"{flag}: {len(rows)} rows"
    cells = [c.strip() for c in rows[0].strip("|").split(" | ")]
    return cells[2].strip("`")


def _dataclass_default(cls, name: str) -> str:
    f = next(f for f in fields(cls) if f.name == name)
    value = f.default_factory() if f.default_factory is not MISSING else f.default
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


@pytest.mark.parametrize("page, flag, ref, name", [
    ("train-av", "--lr", "nlakit.train.sft:SFTConfig", "lr"),
    ("train-rl", "--av-lr", "nlakit.train.rl:RLConfig", "av_lr"),
    ("eval", "--max-rows", "nlakit.eval.evaluate:EvalConfig", "max_rows"),
    ("eval", "--quote-tokens", "nlakit.eval.evaluate:EvalConfig", "quote_tokens"),
])
def test_page_default_is_the_dataclass_default(pages, page, flag, ref, name):
    import importlib

    module, _, cls = ref.partition(":")
    expected = _dataclass_default(getattr(importlib.import_module(module), cls), name)
    assert _default_shown(pages[f"reference/{page}.md"], flag) == expected


def test_write_then_check(pages, tmp_path):
    written, removed = write_reference(tmp_path)
    assert sorted(written) == sorted(pages) and removed == []
    assert stale_pages(tmp_path, pages) == []
    (tmp_path / "reference" / "eval.md").write_text("# edited\n")
    (tmp_path / "reference" / "gone.md").write_text("# a removed command\n")
    assert stale_pages(tmp_path, pages) == ["reference/eval.md", "reference/gone.md"]
    written, removed = write_reference(tmp_path)
    assert (written, removed) == (["reference/eval.md"], ["reference/gone.md"])
    assert stale_pages(tmp_path, pages) == []
