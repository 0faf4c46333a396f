"""The quality ladder's reference points: reread_N, the fitted quote AR, claim checks."""

from __future__ import annotations

import numpy as np
import torch

from nlakit.ladder import (
    FitBudget,
    claim_checks,
    ending_words_found,
    fit_reconstructor,
    quote_is_true,
    quoted_ending,
    reread_predictions,
    stated_current_token,
)
from nlakit.reconstructor import Reconstructor


def test_reread_of_the_whole_prefix_is_the_targets_own_state(tiny):
    model, tok = tiny
    prefixes = ["The assignment statement evaluates the expression list and",
                "A class definition defines a class object"]
    layer = 2
    expected = []
    for p in prefixes:  # an independent path: HF hidden_states[layer + 1] of BOS + the text
        ids = torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        expected.append(out.hidden_states[layer + 1][0, -1])
    expected = torch.stack(expected).float()
    # n longer than any prefix: BOS + every token = the target reading the whole context
    full = reread_predictions(model, tok, layer, prefixes, n=10_000)
    assert torch.allclose(full, expected, atol=1e-5)
    # a short tail is a different state: catches a reread that ignores n
    short = reread_predictions(model, tok, layer, prefixes, n=2)
    assert not torch.allclose(short, expected, atol=1e-3)


def test_fit_reconstructor_learns_its_training_pairs(tiny):
    model, tok = tiny
    texts = ["alpha beta", "gamma delta", "epsilon", "zeta eta theta"] * 4
    torch.manual_seed(0)
    targets = torch.randn(4, model.config.hidden_size).repeat(4, 1)
    ar = Reconstructor.from_target(model, tok, 2, template="{explanation}")
    with torch.no_grad():
        before = float(ar.loss(texts, targets))
    fitted = fit_reconstructor(ar, texts, targets, FitBudget(steps=40, batch_size=8, lr=1e-2))
    with torch.no_grad():
        after = float(fitted.loss(texts, targets))
    assert after < 0.5 * before


def test_claim_checks_tell_right_from_wrong_quotes(tiny):
    _, tok = tiny
    prefix = "The assignment statement evaluates the expression list and"
    right = ("Current token: ' and'.\nKind of text: prose.\n"
             "Ending: evaluates the expression list and")
    wrong = "Current token: ' or'.\nKind of text: prose.\nEnding: the print statement and"
    v1_right = 'Kind of text: prose.\nThe text ends with "the expression list and".'
    silent = "Kind of text: prose."
    assert stated_current_token(right) == " and"
    assert quoted_ending(v1_right) == "the expression list and"
    assert quote_is_true("expression  list\nand", prefix)
    assert not quote_is_true("list and the", prefix)
    out = claim_checks([right, wrong, v1_right, silent], [prefix] * 4, tok)
    true_last = tok.decode(tok(prefix, add_special_tokens=False)["input_ids"][-1:])
    assert out["current_token_right"][0] == float(true_last == " and")
    assert out["current_token_right"][1] == 0.0
    assert np.isnan(out["current_token_right"][2]) and np.isnan(out["current_token_right"][3])
    np.testing.assert_array_equal(out["quote_true"][:3], [1.0, 0.0, 1.0])
    assert np.isnan(out["quote_true"][3])
    # partial credit: 3 of the wrong ending's 4 words are in the last 12 ("print" is not)
    np.testing.assert_allclose(out["ending_words_found"][:3], [1.0, 0.75, 1.0])
    assert np.isnan(out["ending_words_found"][3])
    assert ending_words_found("list and", prefix, window_words=1) == 0.5  # "list" is too far back
