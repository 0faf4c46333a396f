"""Hedging: claims the AV was unsure of are left out, the rest stays as written."""

from __future__ import annotations

import pytest
import torch

from nlakit import NLAError
from nlakit.nla.claims import parse_claims
from nlakit.nla.hedge import claim_spans, hedge, hedge_text, token_probs
from nlakit.nla.prompt import Explanation, format_target

BODY = ("Current token: ' and'.\n"
        "Kind of text: prose. The model expects next: ' the' (31%), ' returns' (12%).\n"
        "Ending: the expression list and")


def _explanation(tokenizer, body: str = BODY) -> Explanation:
    raw = format_target(body)
    ids = tokenizer(raw, add_special_tokens=False)["input_ids"]
    return Explanation(body, True, tokenizer.decode(ids, skip_special_tokens=True), len(ids),
                       token_ids=ids)


def _probs(tokenizer, exp: Explanation, low_in: list[str]) -> list[float]:
    """0.9 for every token, 0.05 for those that spell one of the `low_in` substrings."""
    starts = [len(tokenizer.decode(exp.token_ids[:i], skip_special_tokens=True))
              for i in range(len(exp.token_ids) + 1)]
    spans = [(exp.raw.index(s), exp.raw.index(s) + len(s)) for s in low_in]
    return [0.05 if any(starts[i] < b and starts[i + 1] > a for a, b in spans) else 0.9
            for i in range(len(exp.token_ids))]


@pytest.fixture()
def tok(tiny):
    return tiny[1]


def test_spans_find_every_hedgeable_claim(tok):
    exp = _explanation(tok)
    spans = claim_spans(tok, exp, _probs(tok, exp, []))
    assert [s.field for s in spans] == ["current_token", "prediction", "prediction", "ending"]
    assert [BODY[s.start:s.end] for s in spans] == [" and", " the", " returns",
                                                    "the expression list and"]
    assert all(s.confidence == pytest.approx(0.9) for s in spans)


def test_an_unsure_prediction_goes_alone_and_the_rest_stays(tok):
    exp = _explanation(tok)
    spans = claim_spans(tok, exp, _probs(tok, exp, [" returns"]))
    assert [round(s.confidence, 2) for s in spans] == [0.9, 0.9, 0.05, 0.9]
    text = hedge_text(BODY, spans, 0.5)
    assert text == ("Current token: ' and'.\n"
                    "Kind of text: prose. The model expects next: ' the' (31%).\n"
                    "Ending: the expression list and")
    claims = parse_claims(text)
    assert claims.prediction_tokens == [" the"] and claims.current_token == " and"
    assert hedge_text(BODY, spans, 0.01) == BODY  # above every confidence: nothing goes


def test_no_sure_prediction_drops_the_sentence_and_an_unsure_token_its_claim(tok):
    exp = _explanation(tok)
    spans = claim_spans(tok, exp, _probs(tok, exp, [" the'", " returns", "' and'"]))
    text = hedge_text(BODY, spans, 0.5)
    assert text == "Kind of text: prose.\nEnding: the expression list and"
    claims = parse_claims(text)
    assert claims.predictions is None and claims.current_token is None and not claims.unparsed
    assert claims.kind == "prose" and claims.ending == "the expression list and"


def test_the_ending_is_measured_but_never_left_out(tok):
    exp = _explanation(tok)
    spans = claim_spans(tok, exp, _probs(tok, exp, ["expression"]))
    assert 0.05 < spans[-1].confidence < 0.9  # a geometric mean over the ending's tokens
    spans = claim_spans(tok, exp, _probs(tok, exp, ["the expression list and"]))
    assert spans[-1].confidence == pytest.approx(0.05)
    assert hedge_text(BODY, spans, 0.3) == BODY  # a verbatim quote stays byte for byte


def test_hedge_reads_the_av_s_own_probabilities(tiny):
    from nlakit.nla.facade import NLA

    nla = NLA.from_target(tiny, 2, injection_scale=10.0)
    vecs = torch.randn(3, 64)
    exps = nla.explain(vecs, max_new_tokens=12)
    probs = token_probs(nla.av, vecs, exps)
    assert [len(p) for p in probs] == [len(e.token_ids) for e in exps]
    assert all(0 < p <= 1 for row in probs for p in row)
    # greedy decoding wrote each token it found most likely: well above a uniform guess
    assert min(max(row) for row in probs) > 1 / len(tiny[1])
    assert hedge(nla.av, vecs, exps, 0.0) == exps
    hedged = hedge(nla.av, vecs, exps, 1.0)
    assert [e.token_ids for e in hedged] == [e.token_ids for e in exps]
    with pytest.raises(NLAError, match="probability"):
        hedge(nla.av, vecs, exps, 1.5)


def test_the_hedge_threshold_loads_from_the_checkpoint_and_is_checked(tiny, tmp_path,
                                                                     monkeypatch):
    import yaml

    from nlakit.eval.evaluate import EvalConfig
    from nlakit.nla.facade import NLA

    path = tmp_path / "nla"
    NLA.from_target(tiny, 2, injection_scale=10.0).save(path)
    assert NLA.load(path, target=tiny).av.hedge == 0.0
    meta_path = path / "av" / "nla_meta.yaml"
    meta = yaml.safe_load(meta_path.read_text())
    meta["decoding"] = {**meta.get("decoding", {}), "hedge": 0.4}
    meta_path.write_text(yaml.safe_dump(meta))
    nla = NLA.load(path, target=tiny)
    assert nla.av.hedge == 0.4
    # the checkpoint's hedge applies to explain, and a call's own overrides it
    vecs = torch.randn(2, 64)
    calls = []
    import nlakit.nla.hedge as hedging

    real = hedging.hedge
    monkeypatch.setattr(hedging, "hedge",
                        lambda av, v, exps, t, b: calls.append(t) or real(av, v, exps, t, b))
    nla.explain(vecs, max_new_tokens=4)
    nla.explain(vecs, max_new_tokens=4, hedge=0.0)
    nla.best_of(vecs, 2, max_new_tokens=4, hedge=0.7)
    assert calls == [0.4, 0.7, 0.7]
    meta["decoding"]["hedge"] = 1.5
    meta_path.write_text(yaml.safe_dump(meta))
    with pytest.raises(NLAError, match="decoding.hedge"):
        NLA.load(path, target=tiny)
    with pytest.raises(NLAError, match="eval.hedge"):
        EvalConfig(hedge=1.5)


def test_cuts_leave_the_rest_byte_for_byte(tok):
    body = ("Current token: ' a'. Kind of text: prose. The model expects next: ' b' (9%).\n"
            "Ending:  the\\n   \"finally\"  a")
    exp = _explanation(tok, body)
    spans = claim_spans(tok, exp, _probs(tok, exp, ["' a'", " b"]))
    assert hedge_text(body, spans, 0.5) == ("Kind of text: prose.\n"
                                            "Ending:  the\\n   \"finally\"  a")


def test_the_last_item_and_blank_lines(tok):
    body = "The model expects next: ' a' (9%), ' b' (5%).\n\nEnding: x, . y"
    exp = _explanation(tok, body)
    spans = claim_spans(tok, exp, _probs(tok, exp, [" b"]))
    # the comma before the dropped last item goes; the ending and the blank line stay as written
    assert hedge_text(body, spans, 0.5) == "The model expects next: ' a' (9%).\n\nEnding: x, . y"
