"""Claim checks: every checkable field of the explanation format, right and wrong, odd
formatting, the context labeller's own labels (true by construction), and eval's use of them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nlakit.labels import LabelRow
from nlakit.labels.context import ContextLabeller
from nlakit.nla.claims import (
    VERDICTS,
    Truth,
    claim_checks,
    describe,
    ending_words_found,
    parse_claims,
    quote_is_true,
    truth_from_probs,
    truth_score,
    unparsed_counts,
    verify,
)

PREFIX = "The assignment statement evaluates the expression list and"
TRUTH = Truth(tokens=[" expression", " list", " and"], prefix=PREFIX,
              top=[(" the", 0.31), (" returns", 0.12), (",", 0.08), (" is", 0.05), (" a", 0.04)],
              prob_of={" the": 0.31, " returns": 0.12, " is": 0.05, " cat": 0.001})


def _verdicts(text: str, truth: Truth = TRUTH) -> dict:
    return verify(parse_claims(text), truth)


def test_every_field_right():
    text = ("Current token: ' and'.\nBefore it: ' list', ' expression'.\n"
            "Kind of text: prose. The model expects next: ' the' (31%), ' returns' (12%).\n"
            "Ending: the expression list and")
    v = _verdicts(text)
    for name in VERDICTS:
        if name == "prediction_prob_error":
            assert v[name] == pytest.approx(0.0)
        else:
            assert v[name] == 1.0, name


def test_every_field_wrong():
    text = ("Current token: ' or'.\nBefore it: ' the', ' list'.\n"
            "Kind of text: code. The model expects next: ' cat' (40%), ' dog' (10%).\n"
            "Ending: the print statement or")
    v = _verdicts(text)
    assert v["current_token_right"] == 0.0 and v["kind_right"] == 0.0
    assert v["previous_tokens_right"] == 0.0  # ' the' is not the last-but-one, ' list' not 2nd
    assert v["top_prediction_in_top5"] == 0.0 and v["top_prediction_is_top1"] == 0.0
    assert v["predictions_in_top5"] == 0.0
    # ' cat' stated 40%, really 0.1%; ' dog' is no single token of this truth: not scored
    assert v["prediction_prob_error"] == pytest.approx(0.399)
    assert v["quote_true"] == 0.0 and v["ending_words_found"] == 0.5  # "the", "statement"


def test_partly_right_predictions_and_previous_tokens():
    v = _verdicts("Before it: ' list', ' the'.\nThe model expects next: ' returns' (20%), "
                  "' the' (30%), ' cat' (1%).")
    assert v["previous_tokens_right"] == 0.5
    assert v["top_prediction_in_top5"] == 1.0 and v["top_prediction_is_top1"] == 0.0
    assert v["predictions_in_top5"] == pytest.approx(2 / 3)
    assert v["prediction_prob_error"] == pytest.approx((0.08 + 0.01 + 0.009) / 3)
    assert np.isnan(v["current_token_right"]) and np.isnan(v["kind_right"])


def test_truth_score_pays_true_claims_and_charges_false_ones():
    right = ("Current token: ' and'.\nBefore it: ' list', ' expression'.\n"
             "Kind of text: prose. The model expects next: ' the' (31%).\n"
             "Ending: the expression list and")
    assert truth_score(_verdicts(right)) == pytest.approx(1.0)
    assert truth_score(_verdicts("")) == 0.0  # states nothing: neither paid nor charged
    # one true field of six, nothing else stated
    assert truth_score(_verdicts("Current token: ' and'.")) == pytest.approx(1 / 6)
    assert truth_score(_verdicts("Current token: ' or'.")) == pytest.approx(-1 / 6)
    # a prediction in the top 5 that is not the top 1 earns one field and loses the other
    assert truth_score(_verdicts("The model expects next: ' returns'.")) == 0.0
    # half the ending's words found scores 0 for that field
    assert truth_score(_verdicts("Ending: list cat")) == pytest.approx(0.0)
    wrong = ("Current token: ' or'.\nBefore it: ' the', ' list'.\nKind of text: code. "
             "The model expects next: ' cat' (40%).\nEnding: cat dog")
    assert truth_score(_verdicts(wrong)) == pytest.approx(-1.0)
    assert truth_score(_verdicts(wrong)) < truth_score(_verdicts("")) \
        < truth_score(_verdicts(right))


def test_garbled_prediction_lines_parse_to_what_was_stated():
    """The shipped NLA's real output: repeated tokens, probabilities that are not numbers."""
    c = parse_claims("Current token: ' expression'. Kind of text: prose. The model expects next: "
                     "' is' (20%), ' is' ('2'), ' is'('2'), ' returns' (16%), ' returns' ('16%). "
                     "Ending: the expression")
    assert c.predictions == [(" is", 0.20), (" is", None), (" is", None), (" returns", 0.16),
                             (" returns", None)]
    assert c.ending == "the expression" and c.kind == "prose"
    v = verify(c, TRUTH)
    assert v["top_prediction_in_top5"] == 1.0 and v["predictions_in_top5"] == 1.0  # distinct
    assert v["prediction_prob_error"] == pytest.approx((0.15 + 0.04) / 2)


def test_odd_tokens_parse():
    c = parse_claims("The model expects next: ',' (30%), ''s' (5%), '\\n' (2%), ' don't' (1%).")
    assert c.prediction_tokens == [",", "'s", "\n", " don't"]
    assert [p for _, p in c.predictions] == [0.30, 0.05, 0.02, 0.01]
    assert parse_claims("Current token: '\\n'.").current_token == "\n"


def test_unreadable_fields_are_no_claim_and_counted():
    texts = ["Kind of text: poetry. The model expects next: nothing much.",
             "Current token: and\nEnding:",
             "", None, "a sentence with no fields at all"]
    claims = [parse_claims(t) for t in texts]
    assert claims[0].kind is None and set(claims[0].unparsed) == {"kind", "predictions"}
    assert set(claims[1].unparsed) == {"current_token", "ending"}
    assert all(not c.unparsed for c in claims[2:])
    for c in claims:
        assert all(np.isnan(x) for x in verify(c, TRUTH).values())
    counts = unparsed_counts(claims)
    assert counts["kind_right"] == 1 and counts["top_prediction_in_top5"] == 1
    assert counts["current_token_right"] == 1 and counts["ending_words_found"] == 1


def test_predictions_go_unchecked_without_the_target():
    v = _verdicts("The model expects next: ' the' (31%).", Truth([" and"], PREFIX))
    assert all(np.isnan(v[k]) for k in ("top_prediction_in_top5", "predictions_in_top5"))


def test_quotes_and_ending_words():
    assert quote_is_true("expression  list\nand", PREFIX)
    assert not quote_is_true("list and the", PREFIX)
    assert ending_words_found("list and", PREFIX, window_words=1) == 0.5


def test_describe_marks_each_claim_and_states_the_truth():
    c = parse_claims("Current token: ' or'. Kind of text: prose. The model expects next: "
                     "' the' (31%).")
    text = describe(c, verify(c, TRUTH), TRUTH)
    assert "✗ current token ' or' (real: ' and')" in text
    assert "✓ kind of text prose" in text and "real top 5: ' the' 31%" in text


def _context_rows(tiny_store, n=6):
    return [LabelRow(int(r["row_id"]), r["split"], r["doc_id"], r["prefix"], r["position"],
                     r["token_id"])
            for r in tiny_store.table("heldout").slice(0, n).to_pylist()]


def test_the_context_labeller_s_own_labels_verify_as_true(tiny, tiny_store):
    """Labels made from the truth must check as true: the checks and the labeller agree on
    tokenisation, the kind rule and the target's distribution (probabilities to rounding)."""
    labeller = ContextLabeller(str(tiny_store.meta["model"]["spec"]), loaded=tiny,
                               style="tail_back", top_k=3)
    rows = _context_rows(tiny_store)
    labels = labeller.label_batch(rows)
    verdicts, claims, truths = claim_checks(labels, [r.prefix for r in rows], tiny[1], tiny[0])
    for name in ("current_token_right", "previous_tokens_right", "kind_right",
                 "top_prediction_in_top5", "top_prediction_is_top1", "predictions_in_top5",
                 "ending_words_found"):
        assert np.all(verdicts[name] == 1.0), (name, verdicts[name])
    assert np.all(verdicts["prediction_prob_error"] <= 0.005 + 1e-6)  # labels round to 1%
    # the same truth from a full-sequence forward, read at the row (explain's path)
    ids = labeller.token_ids(rows[0].prefix)
    from nlakit.model.lm_head import next_token_probs

    probs = next_token_probs(tiny[0], [ids], read_at=[[len(ids) - 1]])[0]
    again = truth_from_probs(tiny[1], ids, probs, claims[0].prediction_tokens, rows[0].prefix)
    assert [t for t, _ in again.top] == [t for t, _ in truths[0].top]
    assert [p for _, p in again.top] == pytest.approx([p for _, p in truths[0].top], abs=1e-5)


def test_eval_reports_claims_per_row_and_per_field(tiny, tiny_store, monkeypatch):
    """Eval with an AV whose explanations are the context labels, one made false."""
    from nlakit.eval.evaluate import EvalConfig, evaluate
    from nlakit.eval.scoring import select_rows
    from nlakit.nla.facade import NLA
    from nlakit.nla.prompt import Explanation
    from nlakit.report.tables import format_eval_table as format_table

    nla = NLA.from_target(tiny, tiny_store.layer, injection_scale=10.0,
                          dataset_stats={"rawvar": tiny_store.stats()["rawvar"]})
    rows = select_rows(tiny_store, "heldout")
    labeller = ContextLabeller(str(tiny_store.meta["model"]["spec"]), loaded=tiny, style="tail")
    texts = labeller.label_batch([LabelRow(0, "heldout", d, p) for d, p in
                                  zip(rows.doc_ids, rows.prefixes)])
    texts = [t.replace("<explanation>\n", "").replace("\n</explanation>", "") for t in texts]
    texts[0] = texts[0].replace("Current token: '", "Current token: 'X")

    def fake_explain(vectors, **_):
        return [Explanation(t, True, t, 8) for t in texts[:len(vectors)]]

    monkeypatch.setattr(nla, "explain", fake_explain)
    cfg = EvalConfig(split="heldout", max_new_tokens=4, n_boot=100, batch_size=8, spliced=False,
                     reread_tokens=(), quote_fit_tokens=(), best_of=1)
    d = evaluate(nla, tiny_store, cfg).data
    c = d["claims"]
    n = len(rows)
    assert c["current_token_right"]["n_claims"] == n
    assert c["current_token_right"]["mean"] == pytest.approx((n - 1) / n)
    assert c["top_prediction_is_top1"]["mean"] == 1.0 and c["kind_right"]["mean"] == 1.0
    assert d["rows"][0]["claims"]["current_token_right"] == 0.0
    assert d["rows"][1]["claims"]["current_token_right"] == 1.0
    assert "top_prediction_in_top5" in format_table(d) and "unparsed" in format_table(d)
    from nlakit.report.render import render_html, render_markdown

    cell = f"{c['current_token_right']['mean']:.1%}"
    assert "<h3>Claim checks</h3>" in render_html(d) and cell in render_html(d)
    assert f"| current_token_right | {cell}" in render_markdown(d)


def test_a_check_can_fail():
    """Guard against a verifier that always says true: random claims are mostly false."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta"]
    texts = [f"Current token: ' {rng.choice(words)}'. The model expects next: "
             f"' {rng.choice(words)}' (50%)." for _ in range(20)]
    truth = Truth([" and"], PREFIX, top=TRUTH.top, prob_of=TRUTH.prob_of)
    got = [verify(parse_claims(t), truth) for t in texts]
    assert all(g["current_token_right"] == 0.0 and g["top_prediction_in_top5"] == 0.0
               for g in got)
    assert torch.tensor([g["prediction_prob_error"] for g in got]).isnan().all()


def test_explain_verify_prints_a_mark_beside_each_claim(tiny, tmp_path, monkeypatch, capsys):
    from nlakit.nla.facade import NLA
    from nlakit.nla.prompt import Explanation
    from nlakit.run.cli import main

    saved = NLA.from_target(tiny, 2, injection_scale=10.0,
                            dataset_stats={"rawvar": 0.5}).save(tmp_path / "nla")
    text = "def add(a, b):\n    return a + b\n"
    ids = tiny[1](text, add_special_tokens=True)["input_ids"]
    real = tiny[1].decode(ids[-1:])
    said = f"Current token: {real!r}. Before it: 'nope'. Kind of text: code."
    monkeypatch.setattr(NLA, "candidates", lambda self, vecs, n, **_: [
        Explanation(said, True, said, 9) for _ in range(len(vecs) * n)])
    assert main(["explain", "--nla", str(saved), "--positions=-1", "--max-new-tokens", "4",
                 "--verify", text]) == 0
    out = capsys.readouterr().out
    assert f"✓ current token {real!r}" in out and "✗ tokens before it ['nope']" in out
    assert "✓ kind of text code" in out
    assert main(["explain", "--nla", str(saved), "--positions=-1", "--max-new-tokens", "4",
                 "--verify", "--json", text]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["claims"]["current_token_right"] == 1.0


def test_rows_of_one_document_share_one_forward():
    from nlakit.nla.claims import _prefix_groups

    ids = [[1, 2, 3], [1, 2, 3, 4, 5], [7, 8], [1, 2], [1, 9]]
    assert _prefix_groups(ids) == [[1, 0, 3], [2], [4]]
