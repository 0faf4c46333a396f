"""`nlakit audit` edits, paired drops and verdicts; the OpenAI paraphraser on a loopback
server; the HTML/Markdown report."""

import json

import numpy as np
import pytest

from chat_server import ChatServer  # tests/chat_server.py
from nlakit.eval.audit import (
    AuditConfig,
    OpenAIParaphraser,
    RulesParaphraser,
    ablate_unit,
    audit,
    delete_quotes,
    shuffle_units,
    split_units,
    verdict,
)
from nlakit.eval.evaluate import EvalConfig, evaluate
from nlakit.eval.scoring import select_rows
from nlakit.nla.facade import NLA
from nlakit.report.render import SECTIONS_AUDIT, SECTIONS_EVAL, render_markdown, write_report
from nlakit.report.tables import format_audit_table

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def untrained(tiny, tiny_store):
    return NLA.from_target(tiny, tiny_store.layer, injection_scale=10.0)


TEXT = ('The text is Python code about "list comprehension".\n'
        "The next token is likely a name.\n"
        "The last token `for` starts a loop.")


def test_units_shuffle_and_ablation():
    units, joiner = split_units(TEXT)
    assert len(units) == 3 and joiner == "\n"
    assert split_units("One sentence. Two sentences! Three?")[0] == \
        ["One sentence.", "Two sentences!", "Three?"]
    for seed in range(6):
        s = shuffle_units(TEXT, seed)
        assert s != TEXT and sorted(s.split("\n")) == sorted(units)
    assert shuffle_units("only one unit", 0) == "only one unit"
    assert shuffle_units(TEXT, 1) == shuffle_units(TEXT, 1)
    assert ablate_unit(TEXT, 1) == f"{units[0]}\n{units[2]}"
    assert ablate_unit(TEXT, 3) is None and ablate_unit("one", 0) is None


def test_delete_quotes_removes_every_quoted_span_only():
    out = delete_quotes(TEXT + "\nHe said 'hello there' and “bye”; don't stop.")
    for gone in ('"list comprehension"', "`for`", "'hello there'", "“bye”"):
        assert gone not in out
    assert "don't stop." in out and "The next token is likely a name." in out
    assert delete_quotes("no quotes here") == "no quotes here"


def test_rules_paraphraser_is_deterministic_and_rewrites():
    p = RulesParaphraser()
    a, b = p.paraphrase([TEXT])[0], p.paraphrase([TEXT])[0]
    assert a == b and a != TEXT
    assert "This passage" in a and "following piece" in a


def test_verdicts_do_not_overclaim():
    o = {"mean": 0.5, "ci": [0.4, 0.6]}
    keep = verdict("paraphrase", o, {"mean": 0.47, "ci": [0.37, 0.57]},
                   {"mean": 0.03, "ci": [0.01, 0.05]}, 10, 10)
    assert "keeps 94%" in keep and "no sign of a private code" in keep
    assert "does not show" in keep  # robustness is not accuracy
    lose = verdict("paraphrase", o, {"mean": 0.1, "ci": [0.0, 0.2]},
                   {"mean": 0.4, "ci": [0.3, 0.5]}, 10, 10)
    assert "keeps 20%" in lose and "surface code" in lose
    assert "tests nothing" in verdict("delete_quotes", o, o, {"mean": 0, "ci": [0, 0]}, 0, 10)
    assert "cannot be judged" in verdict("shuffle_units", {"mean": -0.2, "ci": [-0.3, -0.1]},
                                         o, {"mean": 0.1, "ci": [0, 0.2]}, 5, 10)


def test_audit_paired_drops_on_tiny(untrained, tiny_store):
    rows = select_rows(tiny_store, "heldout")
    given = {int(r): TEXT if i % 2 else "A single line without quotes about code."
             for i, r in enumerate(rows.row_ids)}
    cfg = AuditConfig(split="heldout", n_boot=100)
    d = audit(untrained, tiny_store, cfg, paraphraser=RulesParaphraser(), explanations=given)
    assert d["n_rows"] == len(rows) and d["explanations_source"].startswith("given")
    tests = d["tests"]
    assert set(tests) == {"paraphrase", "shuffle_units", "delete_quotes"}
    for r in tests.values():
        # paired: the drop is the per-row difference, so its mean is the difference of means
        assert r["drop"]["mean"] == pytest.approx(
            r["fve_original"]["mean"] - r["fve_edited"]["mean"], abs=1e-9)
        assert r["verdict"]
    n_multi = sum(1 for t in given.values() if t == TEXT)
    assert tests["shuffle_units"]["n_changed"] == n_multi  # one-line rows are left unchanged
    assert tests["delete_quotes"]["n_changed"] == n_multi
    ab = d["ablation"]
    assert ab["n_rows_ablatable"] == n_multi and set(ab["by_unit"]) == {"unit_1", "unit_2",
                                                                        "unit_3"}
    assert all(s["n"] == n_multi for s in ab["by_unit"].values())
    assert "unit 1" in ab["verdict"]
    assert "shuffle_units" in format_audit_table(d)
    json.dumps(d)


def test_audit_generates_explanations_when_none_given(untrained, tiny_store):
    d = audit(untrained, tiny_store, AuditConfig(split="heldout", max_rows=6, max_new_tokens=3,
                                                 n_boot=50, edits=("shuffle_units",)))
    assert d["explanations_source"] == "generated (greedy)" and set(d["tests"]) == {
        "shuffle_units"}


def test_openai_paraphraser_on_loopback_server():
    srv = ChatServer(lambda body: body["messages"][-1]["content"].split("\n\n", 1)[1].upper())
    try:
        p = OpenAIParaphraser(srv.url, "fake", api_key_env=None, concurrency=2,
                              retry_base_delay=0.01)
        out = p.paraphrase(["first text", "second one", "third"])
        assert out == ["FIRST TEXT", "SECOND ONE", "THIRD"]
        assert len(srv.requests) == 3
        assert srv.requests[0]["body"]["messages"][0]["content"].startswith("Rewrite this text")
    finally:
        srv.close()


def test_report_renders_every_section(untrained, tiny_store, tmp_path):
    ev = evaluate(untrained, tiny_store, EvalConfig(split="heldout", max_new_tokens=3,
                                                     quote_tokens=(4,), n_boot=50)).data
    rows = select_rows(tiny_store, "heldout")
    au = audit(untrained, tiny_store, AuditConfig(split="heldout", n_boot=50),
               paraphraser=RulesParaphraser(), explanations={int(r): TEXT for r in rows.row_ids})
    html_path, md_path = write_report(tmp_path / "r" / "report.html", ev, au)
    html = html_path.read_text()
    for section in SECTIONS_EVAL + SECTIONS_AUDIT:
        assert f"<h3>{section}</h3>" in html
    assert html.count("data:image/png;base64,") == 4  # bars, histogram, position, drops
    assert "src='http" not in html  # self-contained
    # every table states its split, rows and denominator
    assert html.count(f"{ev['n_rows']} rows from {ev['n_docs']} documents") >= 7
    assert "rawvar = " in html
    md = md_path.read_text()
    assert "## Evaluation" in md and "## Faithfulness audit" in md and "Verdicts" in md
    assert "quote_4" in md and "split **heldout**" in md
    assert "Evaluation" not in render_markdown(audit_data=au)
    assert np.isfinite(ev["methods"]["nla"]["fve_nrm"]["mean"])


def test_local_paraphraser_batched_on_tiny(tiny):
    from nlakit.eval.audit import LocalParaphraser

    p = LocalParaphraser("unused-spec", loaded=tiny, batch_size=2, max_new_tokens=5)
    assert "Rewrite this text with different words" in p.prompt("abc")
    texts = ["a short line", "a much longer line of text to rewrite", "third"]
    out = p.paraphrase(texts)
    assert len(out) == 3 and all(o is None or isinstance(o, str) for o in out)
    # left padding: a row's output does not depend on the batch it is in
    assert p.paraphrase(texts[2:])[0] == out[2]


def test_rules_paraphraser_keeps_quoted_spans_and_per_unit_mode():
    from nlakit.eval.audit import make_paraphraser

    t = "The text ends with \"the model is\".\nThe model expects next: 'the' (12%)."
    out = RulesParaphraser().paraphrase([t])[0]
    assert '"the model is"' in out and "'the'" in out and out.startswith("This passage")

    class Upper(RulesParaphraser):
        def __init__(self):
            self.calls = []

        def paraphrase(self, texts):
            self.calls.append(list(texts))
            return [x.upper() for x in texts]

    p = Upper()
    p.per_unit = True
    assert p.paraphrase_texts([TEXT, "one line"]) == [TEXT.upper(), "ONE LINE"]
    assert len(p.calls[0]) == 4  # three lines + one
    assert make_paraphraser("rules", per_unit=True).per_unit


def test_audit_cli_reuses_eval_explanations_and_writes_combined_report(untrained, tiny_store,
                                                                        tmp_path, capsys):
    from nlakit.run.cli import main

    root = untrained.save(tmp_path / "nla")
    common = ["--nla", str(root), "--acts", str(tiny_store.path), "--max-rows", "12",
              "--max-new-tokens", "3", "--n-boot", "50"]
    assert main(["eval", *common, "--quote-tokens", "4", "--json",
                 str(tmp_path / "eval.json")]) == 0
    report = tmp_path / "rep" / "report.html"
    assert main(["audit", *common, "--paraphraser", "rules", "--explanations",
                 str(tmp_path / "eval.json"), "--eval-json", str(tmp_path / "eval.json"),
                 "--report", str(report)]) == 0
    data = json.loads((tmp_path / "rep" / "audit.json").read_text())
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert data["explanations_source"].startswith("given")
    assert data["n_rows"] == ev["n_rows"]
    assert data["fve_original"]["mean"] == pytest.approx(ev["methods"]["nla"]["fve_nrm"]["mean"],
                                                         abs=1e-4)
    html = report.read_text()
    assert "<h2>Evaluation</h2>" in html and "<h2>Faithfulness audit</h2>" in html
    assert "paraphrase" in capsys.readouterr().out
    assert main(["report", "--eval", str(tmp_path / "eval.json"), "--audit",
                 str(tmp_path / "rep" / "audit.json"), "--out", str(tmp_path / "r2.html")]) == 0
    assert (tmp_path / "r2.md").is_file()


def test_audit_reads_the_evals_best_of_explanations(untrained, tiny_store, tmp_path, capsys):
    from nlakit.run.cli import main

    root = untrained.save(tmp_path / "nla")
    common = ["--nla", str(root), "--acts", str(tiny_store.path), "--max-rows", "12",
              "--max-new-tokens", "3", "--n-boot", "50"]
    assert main(["eval", *common, "--quote-tokens", "4", "--best-of", "3", "--no-spliced",
                 "--json", str(tmp_path / "bo.json")]) == 0
    ev = json.loads((tmp_path / "bo.json").read_text())
    assert all(isinstance(r["best_of_explanation"], str) for r in ev["rows"])
    audit_json = tmp_path / "audit" / "audit.json"
    assert main(["audit", *common, "--paraphraser", "none", "--explanations",
                 str(tmp_path / "bo.json"), "--explanations-kind", "best_of",
                 "--json", str(audit_json)]) == 0
    data = json.loads(audit_json.read_text())
    assert "best_of" in data["explanations_source"]
    # the audit scored exactly the texts the eval chose: the same fve_nrm as nla_best_of_3
    assert data["fve_original"]["mean"] == pytest.approx(
        ev["methods"]["nla_best_of_3"]["fve_nrm"]["mean"], abs=1e-4)

    assert main(["eval", *common, "--quote-tokens", "4", "--no-spliced",
                 "--json", str(tmp_path / "greedy.json")]) == 0
    capsys.readouterr()
    assert main(["audit", *common, "--paraphraser", "none", "--explanations",
                 str(tmp_path / "greedy.json"), "--explanations-kind", "best_of"]) != 0
    assert "best-of-N explanations of every audited row" in capsys.readouterr().err
    assert main(["audit", *common, "--paraphraser", "none", "--explanations-kind",
                 "best_of"]) != 0
    assert "needs --explanations" in capsys.readouterr().err
