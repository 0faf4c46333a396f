"""Model diffing (`nlakit diff`): rows paired by (document, position), incomparable models and
mismatched adapters refused before any heavy work, a LoRA fine-tune merged onto its base, the
log-odds word ranking, and the command end to end on a tiny NLA."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from nlakit.apps.diff import DiffConfig, align_rows, pair_index, preflight, run
from nlakit.apps.finetuned import (
    check_adapter_base,
    check_models,
    load_finetuned,
    model_facts,
    record_adapter_base,
)
from nlakit.apps.wordstats import log_odds_ranking, word_distance
from nlakit.errors import NLAError
from nlakit.model.hooks import forward_to_layer

pytestmark = pytest.mark.usefixtures("private_cache")

SMALL = {"corpus": "builtin:docs", "max_docs": 6, "positions_per_doc": 3, "min_position": 20,
         "max_tokens_per_doc": 128, "max_new_tokens": 4, "n_boot": 50, "min_count": 1,
         "progress": False}


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """The tiny architecture and tokenizer with other random weights."""
    from nlakit.model.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("other") / "model", seed=1)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """LoRA adapters on the tiny model with random (non-zero) B, so the fine-tune differs."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    peft = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter") / "lora"
    peft.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_nla(tiny, tiny_store, tmp_path_factory):
    from nlakit.nla.facade import NLA

    nla = NLA.from_target(tiny, tiny_store.layer, injection_scale=10.0,
                          dataset_stats={"rawvar": tiny_store.stats()["rawvar"]})
    return nla.save(tmp_path_factory.mktemp("nla") / "nla")


# ---- the word ranking ----------------------------------------------------------------------------


def _texts(rng, n, planted):
    filler = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu".split()
    out = []
    for i in range(n):
        words = [rng.choice(filler) for _ in range(12)] + ["common"]
        if planted and i % 2 == 0:
            words.insert(rng.randrange(len(words)), "zebra")
        out.append(" ".join(words))
    return out


@pytest.mark.parametrize("binary", [False, True])
def test_log_odds_puts_a_planted_word_first_and_a_shared_word_near_zero(binary):
    rng = random.Random(0)
    a, b = _texts(rng, 60, planted=True), _texts(rng, 60, planted=False)
    ranking = log_odds_ranking(a, b, binary=binary)
    top = ranking[0]
    assert top["term"] == "zebra" and top["z"] > 2.5 and top["delta"] > 0
    assert (top["count_a"], top["count_b"]) == (30, 0)
    common = next(r for r in ranking if r["term"] == "common")
    assert common["count_a"] == common["count_b"] == 60 and abs(common["z"]) < 0.5
    assert [r["z"] for r in ranking] == sorted((r["z"] for r in ranking), reverse=True)
    assert any(" " in r["term"] for r in ranking)  # bigrams ranked with the unigrams
    flipped = log_odds_ranking(b, a, binary=binary)  # texts_a is the positive side
    assert flipped[-1]["term"] == "zebra" and flipped[-1]["z"] == pytest.approx(-top["z"])


def test_log_odds_min_count_prior_and_bad_input():
    a, b = ["rare word here"] * 2, ["other words there"] * 2
    assert {r["term"] for r in log_odds_ranking(a, b, ngrams=(1,), min_count=3)} == set()
    assert {r["term"] for r in log_odds_ranking(a, b, ngrams=(1,), min_count=2)} >= {"rare"}
    weak = log_odds_ranking(a, b, ngrams=(1,), min_count=1, prior_strength=1000.0)
    strong = log_odds_ranking(a, b, ngrams=(1,), min_count=1, prior_strength=1.0)
    z = {r["term"]: r["z"] for r in strong}
    assert all(abs(r["z"]) < abs(z[r["term"]]) for r in weak)  # a heavier prior shrinks
    with pytest.raises(NLAError, match="both sides"):
        log_odds_ranking([], b)
    with pytest.raises(NLAError, match="ngrams"):
        log_odds_ranking(a, b, ngrams=(0,))
    assert word_distance("The cat sat.", "the CAT sat") == 0.0
    assert word_distance("a b", "c d") == 1.0


# ---- pairing -------------------------------------------------------------------------------------


def test_rows_are_paired_by_document_and_position_whatever_their_order(tiny_store):
    from nlakit.eval.scoring import EvalRows, select_rows

    base = select_rows(tiny_store, "all")
    perm = np.random.default_rng(0).permutation(len(base))
    shuffled = EvalRows("all", base.row_ids[perm], base.doc_ids[perm], base.positions[perm],
                        [base.prefixes[i] for i in perm], base.vectors[torch.as_tensor(perm)])
    assert not torch.equal(shuffled.vectors, base.vectors)
    aligned = align_rows(base, shuffled)
    assert torch.equal(aligned.vectors, base.vectors)
    assert list(aligned.doc_ids) == list(base.doc_ids)
    assert list(aligned.positions) == list(base.positions)

    keys = [("d", 1), ("d", 2), ("e", 1)]
    assert pair_index(keys, keys[::-1]).tolist() == [2, 1, 0]
    with pytest.raises(NLAError, match="different rows"):
        pair_index(keys, [("d", 1), ("d", 3), ("e", 1)])
    with pytest.raises(NLAError, match="twice"):
        pair_index(keys, [*keys, ("d", 1)])
    other = [p + "x" if i == 0 else p for i, p in enumerate(shuffled.prefixes)]
    with pytest.raises(NLAError, match="tokenize the documents differently"):
        align_rows(base, EvalRows("all", shuffled.row_ids, shuffled.doc_ids,
                                  shuffled.positions, other, shuffled.vectors))


# ---- incomparable inputs, refused before any heavy work ------------------------------------------


def test_models_with_another_d_model_or_tokenizer_are_refused(tiny_model_dir, tiny_nla,
                                                              tmp_path):
    from nlakit.model.testing import make_tiny_model_dir, make_tiny_tokenizer

    narrow = make_tiny_model_dir(tmp_path / "narrow", d=32)
    retok = tmp_path / "retok"
    shutil.copytree(tiny_model_dir, retok)
    make_tiny_tokenizer(vocab_size=500).save_pretrained(retok)
    base = model_facts(str(tiny_model_dir))
    with pytest.raises(NLAError, match="d_model 64.*has 32"):
        check_models(base, model_facts(str(narrow)), 2)
    with pytest.raises(NLAError, match="different tokenizers.*vocabularies differ"):
        check_models(base, model_facts(str(retok)), 2)
    with pytest.raises(NLAError, match="no block 7"):
        check_models(base, base, 7)
    out = tmp_path / "out"
    with pytest.raises(NLAError, match="different tokenizers"):
        run(DiffConfig(nla=str(tiny_nla), base=str(tiny_model_dir), finetuned=str(retok),
                       out=str(out), **SMALL))
    assert not out.exists()  # refused before extracting anything


def test_nla_target_layer_and_corpus_are_checked(tiny_model_dir, other_dir, tiny_nla, tmp_path):
    common = {**SMALL, "nla": str(tiny_nla), "out": str(tmp_path / "out")}
    plan = preflight(DiffConfig(base=str(tiny_model_dir), finetuned=str(other_dir), **common))
    assert plan.layer == 2 and plan.finetuned.kind == "dir"
    with pytest.raises(NLAError, match="NLA was trained on target"):
        preflight(DiffConfig(base=str(other_dir), finetuned=str(tiny_model_dir), **common))
    with pytest.raises(NLAError, match="trained on layer 2, not 1"):
        preflight(DiffConfig(base=str(tiny_model_dir), finetuned=str(other_dir), layer=1,
                             **common))
    with pytest.raises(NLAError, match="not found"):
        preflight(DiffConfig(base=str(tiny_model_dir), finetuned=str(other_dir),
                             **{**common, "corpus": str(tmp_path / "missing.jsonl")}))
    with pytest.raises(NLAError, match="unknown built-in corpus"):
        preflight(DiffConfig(base=str(tiny_model_dir), finetuned=str(other_dir),
                             **{**common, "corpus": "builtin:nope"}))
    with pytest.raises(NLAError, match="NLA 'nope' not found"):
        preflight(DiffConfig(base=str(tiny_model_dir), finetuned=str(other_dir),
                             **{**common, "nla": "nope"}))
    with pytest.raises(NLAError, match="min_position"):
        DiffConfig(base="b", finetuned="f", **{**common, "min_position": 200})


# ---- LoRA fine-tunes -----------------------------------------------------------------------------


def test_a_lora_fine_tune_loads_merged_and_differs_from_its_base(tiny, tiny_model_dir,
                                                                 adapter_dir):
    model, tok = load_finetuned(str(adapter_dir))  # the base named in adapter_config.json
    assert type(model).__name__ == "LlamaForCausalLM"  # merged: no peft wrapper left
    src = model.nlakit_source
    assert src["kind"] == "lora"
    assert src["base"]["weights_hash"] == tiny[0].nlakit_source["weights_hash"]
    assert src["weights_hash"] != src["base"]["weights_hash"]
    ids = torch.tensor([tok("def f(x): return x")["input_ids"]])
    mask = torch.ones_like(ids)
    tuned, base = (forward_to_layer(m, ids, mask, 2) for m in (model, tiny[0]))
    assert not torch.allclose(tuned, base, atol=1e-4)
    again, _ = load_finetuned(str(adapter_dir), str(tiny_model_dir))
    assert torch.equal(forward_to_layer(again, ids, mask, 2), tuned)
    plain, _ = load_finetuned(str(tiny_model_dir))  # a model spec loads as is
    assert torch.equal(forward_to_layer(plain, ids, mask, 2), base)


def test_a_lora_adapter_with_another_base_is_refused(tiny, tiny_model_dir, other_dir,
                                                     adapter_dir, tmp_path):
    with pytest.raises(NLAError, match="were trained on .*pass the base"):
        check_adapter_base(adapter_dir, str(other_dir))
    with pytest.raises(NLAError, match="were trained on"):
        model_facts(str(adapter_dir), str(other_dir))
    assert check_adapter_base(adapter_dir, str(tiny_model_dir)) == str(tiny_model_dir)

    recorded = tmp_path / "recorded"
    shutil.copytree(adapter_dir, recorded)
    record_adapter_base(recorded, tiny[0])
    moved = tmp_path / "moved-base"  # same weights elsewhere: accepted by hash
    shutil.copytree(tiny_model_dir, moved)
    assert check_adapter_base(recorded, str(moved)) == str(moved)
    with pytest.raises(NLAError, match="trained on base weights sha256:"):
        check_adapter_base(recorded, str(other_dir))


# ---- end to end ----------------------------------------------------------------------------------


def _plant(monkeypatch, common: str, planted: str):
    """Wrap diff._explain so both sides' explanations say `common` and the second side's (the
    fine-tuned model's) also `planted`: an untrained tiny NLA says nothing, and the word ranking
    needs something to find."""
    import dataclasses

    import nlakit.apps.diff as diff

    calls, explain = [], diff._explain

    def with_words(nla, rows, config):
        exps, _ = explain(nla, rows, config)
        calls.append(len(rows))
        extra = f"{common} {planted}" if len(calls) == 2 else common
        exps = [dataclasses.replace(e, text=f"{e.text} {extra}".strip()) for e in exps]
        return exps, nla.reconstruct([e.text for e in exps], batch_size=config.batch_size)

    monkeypatch.setattr(diff, "_explain", with_words)


def test_diff_cli_end_to_end_on_a_lora_fine_tune(tiny_model_dir, adapter_dir, tiny_nla, tmp_path,
                                                 capsys, monkeypatch):
    from nlakit.run.cli import main

    _plant(monkeypatch, "the model reads plain text", "zebra stripes")
    out = tmp_path / "diff"
    argv = ["diff", "--nla", str(tiny_nla), "--base", str(tiny_model_dir), "--finetuned",
            str(adapter_dir), "--out", str(out), "--no-progress", "--top-rows", "3"]
    for key in ("corpus", "max_docs", "positions_per_doc", "min_position", "max_tokens_per_doc",
                "max_new_tokens", "n_boot", "min_count"):
        argv += ["--" + key.replace("_", "-"), str(SMALL[key])]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "finetuned_minus_base" in printed and "diff.json" in printed
    data = json.loads((out / "diff.json").read_text())
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert data["n_rows"] == len(rows) == 18 and data["n_docs"] == 6 and data["layer"] == 2
    assert data["models"]["finetuned"]["kind"] == "lora"
    for side in ("base", "finetuned"):
        assert set(data["round_trip"][side]) == {"fve_nrm", "mse_nrm", "cos", "fve_meannorm"}
        assert data["denominators"][side]["rawvar"] > 0
    assert data["change"]["act_mse_nrm"]["mean"] > 0
    assert len(data["top_rows"]["by_activation"]) == 3
    acts = [r["act_mse_nrm"] for r in data["top_rows"]["by_activation"]]
    assert acts == sorted(acts, reverse=True) and acts[0] == max(r["act_mse_nrm"] for r in rows)
    words = data["words"]
    assert {r["term"] for r in words["more_in_finetuned"][:4]} == {
        "zebra", "stripes", "zebra stripes", "text zebra"}
    assert words["more_in_finetuned"][0]["z"] > 1.96 and words["n_significant_finetuned"] >= 1
    assert all(r["z"] < 0 for r in words["more_in_base"])
    assert "plain" in {r["term"] for r in words["more_in_base"]}  # shared: never "more in ft"
    assert data["change"]["explanations_changed"] == 1
    assert all(r["explanation_finetuned"].endswith("text zebra stripes") for r in rows)
    md = (out / "diff.md").read_text()
    assert "## Words more frequent" in md and "| zebra" in md and "fine-tuned − base" in md


def test_a_model_diffed_against_itself_changes_nothing(tiny_model_dir, tiny_nla, tmp_path):
    data = run(DiffConfig(nla=str(tiny_nla), base=str(tiny_model_dir),
                          finetuned=str(tiny_model_dir), out=str(tmp_path / "self"), **SMALL))
    assert data["change"]["act_mse_nrm"]["mean"] == pytest.approx(0, abs=1e-10)
    assert data["change"]["explanations_changed"] == 0
    assert data["round_trip"]["finetuned_minus_base"]["fve_nrm"]["mean"] == pytest.approx(0)
    assert data["words"]["n_significant_finetuned"] == 0


def test_a_rerun_reads_its_explanations_and_new_settings_explain_again(
        tiny_model_dir, adapter_dir, tiny_nla, tmp_path, monkeypatch):
    """OUT/explanations/ serves a rerun with other reporting settings (no generation, the same
    rows); another cap, or a damaged file, explains again."""
    import nlakit.apps.diff as diff

    calls, explain = [], diff._explain

    def counted(nla, rows, config):
        calls.append(config.max_new_tokens)
        return explain(nla, rows, config)

    monkeypatch.setattr(diff, "_explain", counted)
    cfg = dict(nla=str(tiny_nla), base=str(tiny_model_dir), finetuned=str(adapter_dir),
               out=str(tmp_path / "d"), **SMALL)
    first = run(DiffConfig(**cfg))
    assert calls == [4, 4]
    rows1 = (tmp_path / "d" / "rows.jsonl").read_text()
    again = run(DiffConfig(**{**cfg, "top_rows": 2, "n_boot": 60}))
    assert calls == [4, 4]  # both sides read from OUT/explanations
    assert (tmp_path / "d" / "rows.jsonl").read_text() == rows1
    assert again["round_trip"]["base"]["fve_nrm"]["mean"] == first["round_trip"]["base"][
        "fve_nrm"]["mean"]
    assert len(again["top_rows"]["by_activation"]) == 2
    run(DiffConfig(**{**cfg, "max_new_tokens": 5}))
    assert calls == [4, 4, 5, 5]
    (tmp_path / "d" / "explanations" / "base.json").write_text("{not json")
    run(DiffConfig(**{**cfg, "max_new_tokens": 5}))
    assert calls == [4, 4, 5, 5, 5]  # only the damaged side again
