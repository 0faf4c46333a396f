"""Spliced-in metrics on the tiny model: the splice touches only the chosen position, the batched
splice equals the direct one, the true vector costs nothing, the mean ablation recovers nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from nlakit.eval.splice import (
    ABLATION_METHOD,
    TRUE_METHOD,
    _Item,
    _run_items,
    mean_activation,
    ratio_bootstrap_ci,
    row_tokens,
    splice_logits,
    spliced_eval,
    spliced_metrics,
)
from nlakit.model.arch import decoder_layers

LAYER = 2  # the tiny_store's layer


def _rows(tiny_store):
    from nlakit.eval.scoring import select_rows

    return select_rows(tiny_store, "heldout")


def _ids(tiny, n=40):
    tok = tiny[1]
    text = "def f(x):\n    return x + 1  # the value of the function at x, plus one\n" * 3
    return tok(text, add_special_tokens=True)["input_ids"][:n]


def test_splice_touches_only_the_chosen_position(tiny):
    model, _ = tiny
    ids = _ids(tiny)
    p = 25
    v = torch.randn(1, model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 5
    seen = []
    handle = decoder_layers(model)[LAYER + 1].register_forward_pre_hook(
        lambda _m, args: seen.append(args[0][0].clone()))
    try:
        base = splice_logits(model, ids, LAYER, [], torch.zeros(0, v.shape[1]))
        spliced = splice_logits(model, ids, LAYER, [p], v)
    finally:
        handle.remove()
    before, after = seen
    changed = (before != after).any(-1)
    assert changed.nonzero().flatten().tolist() == [p]  # block K+1 input differs only at p
    assert torch.equal(after[p], v[0])
    assert torch.equal(spliced[:p], base[:p])  # causality: earlier positions untouched
    assert not torch.allclose(spliced[p], base[p])
    assert (spliced[p:] - base[p:]).abs().amax(-1).min() > 0  # later ones see the change


def test_batched_queries_equal_direct_splices(tiny):
    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    d = model.config.hidden_size
    ids_a, ids_b = _ids(tiny, 40), _ids(tiny, 31)[::-1]
    items = [_Item(ids_a, [10, 25, 25, 39], torch.randn(4, d, generator=g) * 3, [10, 25, 39]),
             _Item(ids_b, [5, 30], torch.randn(2, d, generator=g) * 3, [5, 30])]
    out = _run_items(model, LAYER, items)
    for it, (orig, spl) in zip(items, out):
        base = splice_logits(model, it.ids, LAYER, [], torch.zeros(0, d))
        assert torch.allclose(orig, base[it.read], atol=1e-4)
        for j, p in enumerate(it.q_pos):
            direct = splice_logits(model, it.ids[: p + 1], LAYER, [p], it.q_vec[j:j + 1])
            err = (spl[j] - direct[p]).abs().max()
            assert torch.allclose(spl[j], direct[p], atol=1e-4), (p, err)


def test_row_tokens_match_the_store_and_catch_a_mismatch(tiny, tiny_store):
    rows = _rows(tiny_store)
    toks = row_tokens(tiny_store, rows, tiny[1])
    assert toks.n_mismatch == 0 and toks.ok.all()
    assert (toks.next_token >= 0).sum() >= len(rows) - rows.n_docs  # at most the last token
    i = 0
    d, p = str(rows.doc_ids[i]), int(rows.positions[i])
    assert toks.next_token[i] == toks.doc_tokens[d][p + 1]
    bad = dataclasses.replace(rows, prefixes=["tampered" + rows.prefixes[0], *rows.prefixes[1:]])
    toks_bad = row_tokens(tiny_store, bad, tiny[1])
    assert toks_bad.n_mismatch == 1 and not toks_bad.ok[0]


def test_true_vector_costs_nothing_and_the_ablation_recovers_nothing(tiny, tiny_store):
    model, tok = tiny
    rows = _rows(tiny_store)
    toks = row_tokens(tiny_store, rows, tok)
    abl, names = mean_activation(tiny_store, exclude="heldout")
    assert names and abl.shape == (tiny_store.d_model,)
    n = len(rows)
    preds = {"true_direction": rows.vectors * 0.1,  # a direction: rescaled to the true norm
             "ablation_again": abl.expand(n, -1).clone(),
             "noise": torch.randn(n, abl.numel(), generator=torch.Generator().manual_seed(0))}
    partial = rows.vectors.clone()
    partial[::2] = float("nan")  # a method that predicts only some rows
    preds["partial"] = partial
    res = spliced_metrics(model, rows, toks, preds, layer=LAYER, ablation=abl, rescale=False)
    # rescale=False splices as given; true_direction is not the true vector then, so redo it
    res_r = spliced_metrics(model, rows, toks, {"true_direction": rows.vectors * 0.1},
                            layer=LAYER, ablation=abl)
    has_ce = np.isfinite(res.ce_original)
    assert has_ce.sum() >= n - rows.n_docs
    for r in (res.per_method[TRUE_METHOD], res_r.per_method["true_direction"]):
        assert np.nanmax(r["kl"]) < 1e-6
        assert np.nanmax(np.abs(r["delta_ce"])) < 1e-4
    s = res.summary(rows.doc_ids, n_boot=200)
    assert abs(s[TRUE_METHOD]["ce_recovered"]["mean"] - 1) < 1e-3
    assert abs(res_r.summary(rows.doc_ids, n_boot=200)["true_direction"]["ce_recovered"]["mean"]
               - 1) < 1e-3
    # the ablation: 0 by construction, per row and in the summary; the same vector as a method too
    assert s[ABLATION_METHOD]["ce_recovered"]["mean"] == 0
    assert np.nanmax(np.abs(res.per_method[ABLATION_METHOD]["ce_recovered"])) == 0
    assert abs(s["ablation_again"]["ce_recovered"]["mean"]) < 1e-5  # same vector, float error
    # (the random tiny model predicts so badly that the ablation need not raise its CE: only
    # the distributions are compared here)
    assert s[ABLATION_METHOD]["kl"]["mean"] > 1e-3
    assert s["noise"]["kl"]["mean"] > 1e-3
    # a partial method is scored on its rows only
    assert np.isnan(res.per_method["partial"]["kl"][::2]).all()
    assert np.isfinite(res.per_method["partial"]["kl"][1::2]).all()
    assert s["partial"]["n_rows"] == n // 2


def test_ratio_bootstrap_is_a_ratio_of_means():
    num, den = np.array([1.0, 2.0, 3.0, 0.0]), np.array([2.0, 2.0, 2.0, 2.0])
    r = ratio_bootstrap_ci(num, den, ["a", "a", "b", "c"], n_boot=300)
    assert r["mean"] == pytest.approx(6 / 8)
    assert r["ci"][0] <= r["mean"] <= r["ci"][1]
    assert r["n_groups"] == 3


def test_spliced_eval_is_json_ready(tiny, tiny_store):
    import json

    rows = _rows(tiny_store)
    data, res = spliced_eval(tiny_store, rows, {"nla": rows.vectors}, target=tiny, n_boot=100)
    json.dumps(data)
    assert data["tokens"]["rows_mismatched"] == 0
    assert set(data["methods"]) == {TRUE_METHOD, ABLATION_METHOD, "nla"}
    assert "mean activation" in data["ablation"] and "av_sft" in data["ablation"]
    assert data["methods"]["nla"]["kl"]["mean"] < 1e-6
