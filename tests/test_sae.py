"""TopK SAEs: exact reconstruction with k = d on a low-rank toy set, sparsity, the ladder reading,
training vectors recomputed from the tiny store, save/load and the plot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nlakit.eval.sae import (
    SAETrainConfig,
    TopKSAE,
    directions,
    train_sae,
    training_vectors,
    worth_k,
)
from nlakit.report.plots import plot_ladder


def _low_rank(d=16, r=4, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, r, generator=g))[0]
    return torch.randn(n, r, generator=g) @ basis.T * 3 + torch.randn(d, generator=g)


def test_topk_sae_with_k_equal_d_reconstructs_a_low_rank_set_exactly():
    x = _low_rank()
    d = x.shape[1]
    sae, log = train_sae(x, SAETrainConfig(k=d, width=8 * d, epochs=150, batch_size=256,
                                           lr=2e-2))
    rel = ((sae(x) - x).norm(dim=1) / x.norm(dim=1)).max()  # worst row
    assert log["train_fve"] > 0.99999
    assert rel < 0.01
    # one latent cannot span a rank-4 set: the exactness above is not for free
    sae1, log1 = train_sae(x, SAETrainConfig(k=1, width=8 * d, epochs=30, batch_size=256,
                                             lr=1e-2))
    assert log1["train_fve"] < 0.99


def test_encode_keeps_k_nonnegative_latents_and_decode_matches_dense():
    sae = TopKSAE(d=8, width=32, k=3, seed=1)
    with torch.no_grad():
        sae.b_enc.normal_()
    x = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    vals, idx = sae.encode(x)
    assert vals.shape == idx.shape == (10, 3) and (vals >= 0).all()
    pre = sae.pre_acts(x)
    assert torch.equal(idx.sort(-1).values, pre.topk(3, -1).indices.sort(-1).values)
    dense = torch.zeros(10, 32).scatter(1, idx, vals)
    assert torch.allclose(sae(x), dense @ sae.W_dec + sae.b_dec, atol=1e-5)
    with pytest.raises(Exception, match="k must be"):
        TopKSAE(d=8, width=4, k=5)


def test_directions_are_scaled_unit_rows():
    v = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    out = directions(v)
    assert torch.allclose(out.norm(dim=1), torch.full((2,), math.sqrt(2)))
    assert torch.allclose(out[0] / out[0].norm(), v[0] / 5)


def test_worth_k_interpolates_in_log_k():
    ladder = {1: 0.1, 4: 0.3, 16: 0.5, 64: 0.7}
    assert worth_k(ladder, 0.4)["k"] == pytest.approx(8.0)
    assert worth_k(ladder, 0.3)["k"] == pytest.approx(4.0)
    assert worth_k(ladder, 0.05)["relation"] == "below"
    assert worth_k(ladder, 0.9)["relation"] == "above" and worth_k(ladder, 0.9)["k"] is None
    # a non-monotone ladder is read through its running maximum
    assert worth_k({1: 0.2, 4: 0.1, 16: 0.6}, 0.4)["k"] == pytest.approx(8.0)


def test_save_load_round_trip(tmp_path):
    sae = TopKSAE(d=8, width=16, k=2, seed=3)
    sae.save(tmp_path / "sae", extra={"layer": 2})
    back = TopKSAE.load(tmp_path / "sae")
    x = torch.randn(4, 8)
    assert back.k == 2 and torch.equal(back(x), sae(x))
    for name, shape in (("W_enc", (8, 16)), ("W_dec", (16, 8))):
        assert tuple(getattr(back, name).shape) == shape  # SAELens' layout


def test_training_vectors_from_rows_and_recomputed_tokens(tiny, tiny_store):
    rows, info = training_vectors(tiny_store, source="rows")
    n_train = sum(tiny_store.num_rows(s) for s in ("av_sft", "ar_sft", "rl"))
    assert rows.shape == (n_train, tiny_store.d_model) and info["n"] == n_train
    toks, info_t = training_vectors(tiny_store, source="tokens", target=tiny)
    assert toks.shape[0] > rows.shape[0]
    # every stored training row is among the recomputed token vectors (same model, same rule)
    dist = torch.cdist(rows[:20], toks).min(dim=1).values
    assert dist.max() < 1e-3 * rows[:20].norm(dim=1).min()
    # held-out vectors are not
    held = tiny_store.vectors("heldout")[:10]
    assert torch.cdist(held, toks).min(dim=1).values.min() > 1e-2
    sub, _ = training_vectors(tiny_store, source="tokens", target=tiny, max_vectors=50)
    assert sub.shape[0] == 50


def test_plot_ladder_writes_a_png(tmp_path):
    path = plot_ladder({"fve_nrm": {1: 0.1, 4: 0.3}, "kl": {1: 2.0, 4: 1.0}},
                       {"fve_nrm": {"nla": 0.2, "quote_8": np.nan}, "kl": {"nla": 1.5}},
                       tmp_path / "ladder.png", title="t")
    assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG"


def test_sae_cli_writes_the_ladder_with_an_nla_and_an_eval_json(tiny, tiny_store, tmp_path,
                                                                capsys):
    import json

    from nlakit.nla.facade import NLA
    from nlakit.run.cli import main

    nla = NLA.from_target(tiny, tiny_store.layer, injection_scale=10.0,
                          dataset_stats={"rawvar": tiny_store.stats()["rawvar"]})
    root = nla.save(tmp_path / "nla")
    ev = tmp_path / "eval.json"
    assert main(["eval", "--nla", str(root), "--acts", str(tiny_store.path), "--max-new-tokens",
                 "3", "--quote-tokens", "2", "--reread-tokens", "4", "--n-boot", "50",
                 "--json", str(ev), "--no-progress"]) == 0
    out = tmp_path / "ladder"
    common = ["sae", "--acts", str(tiny_store.path), "--out", str(out), "--ks", "1,4",
              "--epochs", "2", "--batch-size", "64", "--source", "rows", "--reread-tokens", "4",
              "--n-boot", "50", "--max-new-tokens", "3", "--no-progress"]
    assert main([*common, "--nla", str(root), "--eval-json", str(ev),
                 "--report", str(out / "report.html")]) == 0
    data = json.loads((out / "ladder.json").read_text())
    assert {"sae_k1", "sae_k4", "mean_direction_train", "reread_4", "nla", "quote_2",
            "mean_direction", "eval:reread_4"} <= set(data["methods"])
    for name in ("sae_k1", "sae_k4", "nla", "reread_4", "quote_2"):
        assert {"fve_nrm", "kl", "ce_recovered"} <= set(data["methods"][name]), name
    assert set(data["ladder"]) == {"fve_nrm", "kl", "ce_recovered"}
    assert data["spliced"]["reference"]["true_vector"]["kl"]["mean"] < 1e-6
    assert list(data["ladder"]["fve_nrm"]) == ["1", "4"]
    # the same reread_4 scored by the eval and by the ladder: same rows, same numbers
    assert data["methods"]["reread_4"]["fve_nrm"]["mean"] == pytest.approx(
        data["methods"]["eval:reread_4"]["fve_nrm"]["mean"], abs=1e-5)
    assert data["methods"]["reread_4"]["kl"]["mean"] == pytest.approx(
        data["methods"]["eval:reread_4"]["kl"]["mean"], rel=1e-4)
    assert data["worth"]["nla"]["explanation_tokens"] > 0
    assert data["worth"]["nla"]["fve_nrm"]["text"].startswith("worth")
    assert data["n_rows"] == tiny_store.num_rows("heldout")
    assert (out / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "sae_k4" / "sae_weights.safetensors").is_file()
    html = (out / "report.html").read_text()
    assert "NLA vs SAE" in html and "data:image/png;base64" in html and "kl (nats)" in html
    printed = capsys.readouterr().out
    assert "sae_k4" in printed and "worth" in printed
    # `nlakit report` puts a ladder next to an eval
    assert main(["report", "--eval", str(ev), "--ladder", str(out / "ladder.json"), "--out",
                 str(tmp_path / "rep" / "r.html")]) == 0
    md = (tmp_path / "rep" / "r.md").read_text()
    assert "## NLA vs SAE on the same activations" in md and "ce_recovered" in md
    assert "data:image/png;base64" in (tmp_path / "rep" / "r.html").read_text()
    # a rerun reuses the trained SAEs; an eval.json of other rows is refused
    assert main([*common]) == 0
    again = json.loads((out / "ladder.json").read_text())
    assert again["sae_logs"] == data["sae_logs"]
    assert main([*common, "--split", "all", "--eval-json", str(ev)]) == 2
    assert "same rows" in capsys.readouterr().err
