"""`nlakit eval`: row selection, each baseline's defining property, the JSON shape, the CLI."""

import json

import numpy as np
import pytest
import torch

from nlakit import NLAError, metrics
from nlakit.eval.evaluate import (
    EvalConfig,
    evaluate,
    mean_direction_prediction,
    quote_text,
    wrong_document_index,
)
from nlakit.eval.scoring import denominators, row_metrics, select_rows
from nlakit.labels import Labeller, label_store
from nlakit.nla.facade import NLA
from nlakit.report.tables import format_eval_table as format_table

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def untrained(tiny, tiny_store):
    return NLA.from_target(tiny, tiny_store.layer, injection_scale=10.0,
                           dataset_stats={"rawvar": tiny_store.stats()["rawvar"]})


class Echo(Labeller):
    """A deterministic labeller from the text alone: two lines quoting the end of the prefix."""

    kind = "echo-eval"

    def label_batch(self, rows):
        return [f"<explanation>\nthe text ends with {r.prefix[-12:]!r}\n"
                f"row of document {r.doc_id}\n</explanation>" for r in rows]


def test_select_rows_takes_whole_documents_deterministically(tiny_store):
    full = select_rows(tiny_store, "all")
    a = select_rows(tiny_store, "all", max_rows=12, seed=3)
    b = select_rows(tiny_store, "all", max_rows=12, seed=3)
    assert a.row_ids.tolist() == b.row_ids.tolist()
    assert 1 <= len(a) <= 12
    for d in set(a.doc_ids.tolist()):  # every chosen document is complete
        assert (a.doc_ids == d).sum() == (full.doc_ids == d).sum()
    c = select_rows(tiny_store, "all", max_rows=12, seed=4)
    assert set(c.doc_ids.tolist()) != set(a.doc_ids.tolist()) or len(full) <= 12
    with pytest.raises(NLAError, match="unknown split"):
        select_rows(tiny_store, "nope")


def test_mean_direction_is_the_meannorm_baseline(tiny_store):
    rows = select_rows(tiny_store, "all", max_rows=30)
    den = denominators(tiny_store, rows)
    pred = mean_direction_prediction(rows.vectors)
    pr = row_metrics(pred, rows.vectors, den)
    assert abs(pr["fve_meannorm"].mean()) < 1e-6
    m = float(metrics.mean_unit_direction(rows.vectors).norm())
    own = 1 - pr["mse_nrm"].mean() / metrics.rawvar(rows.vectors)
    assert own == pytest.approx(1 - 2 / (1 + m), abs=1e-5)
    assert own < 0
    # no other constant direction does better than the mean direction
    other = torch.nn.functional.normalize(pred + 0.1 * torch.randn(1, pred.shape[1]), dim=-1)
    assert metrics.mse_nrm(other, rows.vectors).mean() > metrics.mse_nrm(pred, rows.vectors).mean()


def test_wrong_document_never_pairs_a_row_with_its_own_document():
    docs = np.asarray(["a"] * 5 + ["b"] * 1 + ["c"] * 3 + ["d"] * 2, dtype=object)
    for seed in range(5):
        idx = wrong_document_index(docs, seed)
        assert (docs[idx] != docs).all()
        assert idx.shape == docs.shape
    with pytest.raises(NLAError, match="2 documents"):
        wrong_document_index(np.asarray(["a", "a"], dtype=object))


def test_quote_uses_exactly_n_tokens(tiny):
    _, tok = tiny
    prefix = "The quick brown fox jumps over the lazy dog, then returns home to sleep."
    ids = tok(prefix, add_special_tokens=False)["input_ids"]
    for n in (1, 3, 7):
        text, used = quote_text(prefix, tok, n)
        assert used == n
        assert prefix.endswith(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids[-n:]
    text, used = quote_text(prefix, tok, len(ids) + 10)
    assert used == len(ids) and text == prefix


def test_evaluate_all_methods_on_tiny(untrained, tiny_store, tmp_path):
    labels = label_store(tiny_store, Echo(), tmp_path / "labels", splits=["heldout"],
                         progress=False)
    control = NLA.from_target((untrained.av.model, untrained.av.tokenizer), tiny_store.layer,
                              injection_scale=3.0)
    cfg = EvalConfig(split="heldout", max_new_tokens=4, quote_tokens=(2, 5), best_of=2,
                     n_boot=200, batch_size=8)
    res = evaluate(untrained, tiny_store, cfg, labels=labels, control_av=control)
    d = res.data
    n = tiny_store.num_rows("heldout")
    assert d["split"] == "heldout" and d["n_rows"] == n and d["layer"] == tiny_store.layer
    assert set(d["methods"]) == {"nla", "nla_best_of_2", "quote_rerank_2", "mean_direction",
                                 "mean_direction_train", "wrong_document", "quote_2", "quote_5",
                                 "label", "control", "reread_8", "reread_32"}
    assert d["claims"] == {}  # an untrained AV states no current token and quotes nothing
    # the in-sample mean direction is the best constant: the training one cannot beat it
    assert (d["methods"]["mean_direction_train"]["mse_nrm"]["mean"]
            >= d["methods"]["mean_direction"]["mse_nrm"]["mean"] - 1e-9)
    for m in d["methods"].values():
        for k in ("fve_nrm", "mse_nrm", "cos", "fve_meannorm"):
            assert set(m[k]) >= {"mean", "ci"} and m[k]["ci"][0] <= m[k]["mean"] <= m[k]["ci"][1]
    assert d["rawvar"] == pytest.approx(tiny_store.stats("heldout")["rawvar"])
    assert abs(d["methods"]["mean_direction"]["fve_meannorm"]["mean"]) < 1e-6
    assert d["sanity"]["ok"]
    assert d["methods"]["label"]["n_rows"] == n
    # mse, cos and fve agree: mse = 2(1 - cos); fve = 1 - mse / rawvar
    nla = d["methods"]["nla"]
    assert nla["mse_nrm"]["mean"] == pytest.approx(2 * (1 - nla["cos"]["mean"]), abs=1e-6)
    assert nla["fve_nrm"]["mean"] == pytest.approx(1 - nla["mse_nrm"]["mean"] / d["rawvar"],
                                                   abs=1e-6)
    # the NLA's per-row scores are reproducible with nla.score
    texts = [r["explanation"] for r in d["rows"]]
    vecs = select_rows(tiny_store, "heldout").vectors
    again = untrained.score(texts, vecs, rawvar=d["rawvar"])["fve_nrm"]
    assert np.allclose(again.numpy(), [r["fve_nrm"]["nla"] for r in d["rows"]], atol=1e-4)
    table = format_table(d)
    assert "quote_5" in table and "rawvar" in table
    json.dumps(d)  # serialisable
    # spliced metrics for every method, per row too; the true vector costs (almost) nothing
    for name, m in d["methods"].items():
        assert {"kl", "ce_recovered", "delta_ce"} <= set(m), name
        assert m["kl"]["mean"] >= 0 and m["kl"]["ci"][0] <= m["kl"]["mean"] <= m["kl"]["ci"][1]
        assert set(d["rows"][0]["kl"]) >= {name} and name in d["rows"][0]["ce_recovered"]
    ref = d["spliced"]["reference"]
    assert ref["true_vector"]["kl"]["mean"] < 1e-6
    assert ref["mean_ablation"]["ce_recovered"]["mean"] == pytest.approx(0, abs=1e-9)
    assert d["spliced"]["tokens"]["rows_mismatched"] == 0
    assert "ablation" in d["spliced"] and "kl (nats)" in table and "ce_recovered" in table


def test_label_baseline_skipped_without_labels_and_single_doc_errors(untrained, tiny_store):
    cfg = EvalConfig(split="heldout", max_rows=1, max_new_tokens=2, quote_tokens=(3,),
                     n_boot=50)
    d = evaluate(untrained, tiny_store, cfg).data
    assert d["n_docs"] == 1
    assert "wrong_document" not in d["methods"] and "wrong_document" in d["skipped"]
    assert "label" in d["skipped"] and "control" in d["skipped"]


def test_eval_cli_writes_json_and_report(untrained, tiny_store, tmp_path, capsys):
    from nlakit.run.cli import main

    root = untrained.save(tmp_path / "nla")
    report = tmp_path / "out" / "report.html"
    rc = main(["eval", "--nla", str(root), "--acts", str(tiny_store.path), "--split", "all",
               "--max-rows", "15", "--max-new-tokens", "3", "--quote-tokens", "4", "--n-boot",
               "100", "--report", str(report), "--no-spliced"])
    assert rc == 0
    data = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert data["config"]["spliced"] is False and "kl" not in data["methods"]["nla"]
    assert data["split"] == "all" and data["n_rows"] <= 15
    assert data["rawvar"] == pytest.approx(tiny_store.stats("all")["rawvar"])
    assert {"nla", "mean_direction", "quote_4"} <= set(data["methods"])
    assert report.is_file() and report.with_suffix(".md").is_file()
    out = capsys.readouterr().out
    assert "mean_direction" in out and "denominator" in out


def test_best_of_n_keeps_the_candidate_the_ar_reconstructs_best(untrained, tiny_store):
    v = select_rows(tiny_store, "heldout", max_rows=6).vectors
    greedy = untrained.explain(v, n=1, temperature=0.0, max_new_tokens=4)
    samples = untrained.explain(v, n=2, temperature=1.0, max_new_tokens=4, seed=7)
    cands = untrained.candidates(v, 3, max_new_tokens=4, seed=7)
    # the greedy explanation first, then the samples the same seed draws
    assert [e.text for e in cands[::3]] == [e.text for e in greedy]
    assert [e.text for i, e in enumerate(cands) if i % 3] == [e.text for e in samples]
    mse = metrics.mse_nrm(untrained.reconstruct([e.text for e in cands]),
                          v.repeat_interleave(3, 0)).view(-1, 3)
    best = untrained.best_of(v, 3, max_new_tokens=4, batch_size=32, seed=7, greedy=greedy)
    picked, pred = best.explanations, best.reconstructions
    assert len(picked) == v.shape[0] and best.candidates[int(best.kept[0])] is picked[0]
    assert torch.allclose(metrics.mse_nrm(pred, v), mse.min(1).values, atol=1e-5)
    # never worse than greedy by the AR it was chosen with
    greedy_mse = metrics.mse_nrm(untrained.reconstruct([e.text for e in greedy]), v)
    assert bool((metrics.mse_nrm(pred, v) <= greedy_mse + 1e-6).all())


def test_quote_rerank_keeps_the_quote_the_ar_reconstructs_best(untrained, tiny_store):
    from nlakit.eval.evaluate import best_quote, quote_text, rerank_quote_lengths

    assert rerank_quote_lengths(8, 32) == [4, 8, 12, 16, 20, 24, 28, 32]
    assert rerank_quote_lengths(4, 2) == [1, 2]
    rows = select_rows(tiny_store, "heldout", max_rows=6)
    tok = untrained.ar.tokenizer
    per_length = torch.stack([
        metrics.mse_nrm(untrained.reconstruct([quote_text(p, tok, k)[0] for p in rows.prefixes]),
                        rows.vectors) for k in (2, 5)], 1)
    pred = best_quote(untrained, rows.prefixes, rows.vectors, [2, 5], batch_size=8)
    assert torch.allclose(metrics.mse_nrm(pred, rows.vectors), per_length.min(1).values,
                          atol=1e-5)


def test_baselines_only_needs_no_av(untrained, tiny_store, tmp_path):
    from nlakit.run.cli import main

    root = untrained.save(tmp_path / "nla")
    rc = main(["eval", "--baselines-only", "--ar", str(root / "ar"), "--acts",
               str(tiny_store.path), "--max-rows", "12", "--quote-tokens", "3", "--n-boot", "50",
               "--report", str(tmp_path / "b" / "r.html")])
    assert rc == 0
    d = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert "nla" not in d["methods"] and {"mean_direction", "quote_3"} <= set(d["methods"])
    assert "nla" in d["skipped"] and "wrong_document" in d["skipped"]
    # no NLA target: the spliced metrics splice into the store's own model
    assert "kl" in d["methods"]["quote_3"] and "ce_recovered" in d["rows"][0]
    assert "<h3>Examples</h3>" in (tmp_path / "b" / "r.html").read_text()
    assert "kl (nats)" in (tmp_path / "b" / "r.html").read_text()
    assert "ce_recovered" in (tmp_path / "b" / "r.md").read_text()


def test_quote_fit_trains_only_on_training_rows(untrained, tiny_store, monkeypatch):
    import nlakit.train.sft as ladder

    seen = {}
    real = ladder.fit_reconstructor

    def spy(ar, texts, vectors, budget):
        seen["vectors"], seen["budget"] = vectors.clone(), budget
        return real(ar, texts, vectors, budget)

    monkeypatch.setattr(ladder, "fit_reconstructor", spy)
    cfg = EvalConfig(split="heldout", max_new_tokens=2, quote_tokens=(4,), reread_tokens=(),
                     quote_fit_tokens=(4,), quote_fit_steps=3, n_boot=50)
    d = evaluate(untrained, tiny_store, cfg).data
    assert "quote_4_fit" in d["methods"] and "ar_sft" in d["methods"]["quote_4_fit"]["note"]
    assert seen["budget"].steps == 3
    train = select_rows(tiny_store, "ar_sft").vectors
    held = select_rows(tiny_store, "heldout").vectors
    # every row it trained on is an ar_sft row, none is an evaluated (heldout) row
    assert torch.equal(seen["vectors"], train)
    assert not any(torch.equal(v, h) for v in seen["vectors"] for h in held)


def test_quote_fit_trains_on_the_ar_s_own_splits(untrained, tiny_store, monkeypatch):
    """An AR that also trained on the rl split's explanations gets a baseline fitted on the
    quotes of ar_sft + rl rows: the same splits, never the evaluated one."""
    import nlakit.train.sft as ladder

    seen = {}
    real = ladder.fit_reconstructor

    def spy(ar, texts, vectors, budget):
        seen["vectors"] = vectors.clone()
        return real(ar, texts, vectors, budget)

    monkeypatch.setattr(ladder, "fit_reconstructor", spy)
    meta = {"nlakit": {"provenance": {"config": {"extra_splits": ["rl", "heldout"]}}}}
    monkeypatch.setattr(untrained, "ar_meta", meta)
    cfg = EvalConfig(split="heldout", max_new_tokens=2, quote_tokens=(), reread_tokens=(),
                     quote_fit_tokens=(4,), quote_fit_steps=2, n_boot=50)
    d = evaluate(untrained, tiny_store, cfg).data
    assert "ar_sft+rl rows" in d["methods"]["quote_4_fit"]["note"]
    expected = torch.cat([select_rows(tiny_store, s).vectors for s in ("ar_sft", "rl")])
    assert torch.equal(seen["vectors"], expected)


def test_reread_reference_is_the_frozen_target(untrained, tiny_store):
    from nlakit.eval.baselines import reread_predictions

    cfg = EvalConfig(split="heldout", max_new_tokens=2, quote_tokens=(), reread_tokens=(3,),
                     n_boot=50)
    d = evaluate(untrained, tiny_store, cfg).data
    rows = select_rows(tiny_store, "heldout")
    model, tok = untrained.target()
    pred = reread_predictions(model, tok, tiny_store.layer, rows.prefixes, 3)
    expected = metrics.fve_nrm(pred, rows.vectors, d["rawvar"]).mean()
    assert d["methods"]["reread_3"]["fve_nrm"]["mean"] == pytest.approx(float(expected), abs=1e-5)
    with pytest.raises(NLAError, match="reread_tokens"):
        EvalConfig(reread_tokens="8,x")


def test_spliced_values_match_a_direct_splice_and_can_be_turned_off(untrained, tiny_store):
    from nlakit.eval.splice import mean_activation, row_tokens, splice_logits

    cfg = EvalConfig(split="heldout", max_new_tokens=2, quote_tokens=(), reread_tokens=(),
                     n_boot=50)
    d = evaluate(untrained, tiny_store, cfg).data
    rows = select_rows(tiny_store, "heldout")
    model, tok = untrained.target()
    toks = row_tokens(tiny_store, rows, tok)
    abl, _ = mean_activation(tiny_store, exclude="heldout")
    i = 3
    p, g = int(rows.positions[i]), rows.vectors[i]
    ids = toks.doc_tokens[str(rows.doc_ids[i])][: p + 1]
    y = int(toks.next_token[i])
    md = mean_direction_prediction(rows.vectors)[i]
    lp = {name: torch.log_softmax(splice_logits(model, ids, tiny_store.layer, pos, v)[p], -1)
          for name, pos, v in [("orig", [], torch.zeros(0, g.numel())),
                               ("md", [p], (md * g.norm() / md.norm())[None]),
                               ("abl", [p], abl[None])]}
    kl = float((lp["orig"].exp() * (lp["orig"] - lp["md"])).sum())
    ce = {k: float(-v[y]) for k, v in lp.items()}
    row = d["rows"][i]
    assert row["row_id"] == int(rows.row_ids[i])
    assert row["kl"]["mean_direction"] == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert row["ce_recovered"]["mean_direction"] == pytest.approx(
        (ce["abl"] - ce["md"]) / (ce["abl"] - ce["orig"]), rel=1e-3, abs=1e-4)
    off = evaluate(untrained, tiny_store, EvalConfig(
        split="heldout", max_new_tokens=2, quote_tokens=(), reread_tokens=(), n_boot=50,
        spliced=False)).data
    assert not any("kl" in m or "ce_recovered" in m for m in off["methods"].values())
    assert "kl" not in off["rows"][0] and off["spliced"] == {"skipped": "turned off "
                                                                        "(spliced: false)"}
    assert "ce_recovered" not in format_table(off)


def test_eval_and_audit_load_the_nla_in_the_dtype_asked_for(untrained, tiny_store, tmp_path):
    """`--dtype` reaches every half eval loads (the default on a GPU is bfloat16, so a float32
    eval there needs it)."""
    from nlakit.eval.evaluate import ReconstructorOnly
    from nlakit.run.stages import AuditInputs, EvalInputs, _load_nla

    root = untrained.save(tmp_path / "nla")
    for dtype, want in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        for inputs in (EvalInputs, AuditInputs):
            nla = _load_nla(inputs(acts=str(tiny_store.path), nla=str(root), device="cpu",
                                   dtype=dtype))
            assert next(nla.av.model.parameters()).dtype == want
            assert next(nla.ar.body.parameters()).dtype == want
        ar_only = ReconstructorOnly.load(root / "ar", device="cpu", dtype=dtype)
        assert next(ar_only.ar.body.parameters()).dtype == want


def test_the_fitted_baseline_budget_counts_rl_s_ar_updates():
    """quote_N_fit gets every AR update the NLA's AR had: the SFT steps of its chain plus
    RL's online updates (one per RL step on all its rollouts) as steps of the SFT batch."""
    from types import SimpleNamespace

    import yaml

    from nlakit.eval.evaluate import ar_budget, rl_ar_rows
    from nlakit.nla.pretrained import SHIPPED_ROOT

    rl = {"summary": {"steps": 10, "batch_size": 2, "group_size": 4, "processes": 2}}
    start = {"config": {"batch_size": 16, "lr": 1e-3}, "summary": {"steps": 5}, "rl": rl}
    meta = {"nlakit": {"provenance": {"summary": {"steps": 3},
                                      "init": {"provenance": start}}}}
    nla = SimpleNamespace(ar_meta=meta)
    assert rl_ar_rows(nla) == 160
    assert ar_budget(nla).steps == 5 + 3 + 10 and ar_budget(nla, steps=7).steps == 7
    meta["nlakit"]["provenance"]["rl"] = {"summary": {"steps": 1, "batch_size": 1,
                                                      "group_size": 2}}
    assert ar_budget(nla).steps == 5 + 3 + 11  # 162 rows round up to 11 batches of 16
    # an RL run continuing another counts both
    meta["nlakit"]["provenance"]["rl"]["previous"] = rl
    assert ar_budget(nla).steps == 5 + 3 + 11 + 10
    # the shipped NLA: 2,100 SFT steps of 16, then 100 RL steps of 4 x 4 rollouts (choice J),
    # then 50 more (the truth RL)
    shipped = yaml.safe_load((SHIPPED_ROOT / "smollm2-135m" / "ar" / "nla_meta.yaml").read_text())
    assert ar_budget(SimpleNamespace(ar_meta=shipped)).steps == 2100 + 100 + 50
