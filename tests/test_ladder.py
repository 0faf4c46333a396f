"""The quality ladder's reference points: reread_N and the fitted quote AR."""

from __future__ import annotations

import torch

from nlakit.eval.baselines import FitBudget, reread_predictions
from nlakit.nla.reconstructor import Reconstructor
from nlakit.train.sft import fit_reconstructor


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


def test_the_fitted_baseline_trains_through_the_sft_step_with_the_nla_s_clipping(tiny,
                                                                                 monkeypatch):
    """The fair quote baseline's AR is trained like the NLA's AR: each of its steps is the SFT
    stage's `sft_update`, clipped at the budget's max_grad_norm (the NLA's recorded one)."""
    import nlakit.train.sft as sft

    model, tok = tiny
    seen = []
    real = sft.sft_update

    def spy(acc, module, loss_of, batches, optimizer, params, precision, max_grad_norm):
        seen.append((len(batches[0][1]), max_grad_norm, precision))
        return real(acc, module, loss_of, batches, optimizer, params, precision, max_grad_norm)

    monkeypatch.setattr(sft, "sft_update", spy)
    texts = ["alpha beta", "gamma delta", "epsilon"] * 3
    targets = torch.randn(len(texts), model.config.hidden_size)
    ar = Reconstructor.from_target(model, tok, 2, template="{explanation}")
    fit_reconstructor(ar, texts, targets, FitBudget(steps=3, batch_size=4, max_grad_norm=0.25,
                                                    mixed_precision="no"))
    assert seen == [(4, 0.25, "no")] * 3
