"""Extraction into the activation store: correctness, determinism, provenance, resume, CLI."""

from __future__ import annotations

import json
import os
import platform
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

import nlakit.extract.extraction as acts
from nlakit import NLAError, __version__
from nlakit import metrics as M
from nlakit.corpus.load import load_corpus
from nlakit.errors import ConfigMismatchError
from nlakit.extract.extraction import ExtractConfig, assign_split, extract, sample_positions
from nlakit.extract.store import ActivationStore, store_schema
from nlakit.fileio import read_yaml, write_yaml
from nlakit.model.arch import special_token_ids
from nlakit.model.hooks import forward_to_layer
from nlakit.run.cli import main

LAYER = 1
KW = {"layer": LAYER, "positions_per_doc": 4, "min_position": 20, "max_tokens_per_doc": 160,
      "progress": False}
# lengths in characters (~2.4 characters per tiny-model token): some documents are shorter
# than min_position tokens, some are truncated at max_tokens_per_doc
LENGTHS = [30, 90, 150, 260, 400, 700, 1200, 2000, 40, 330, 520, 900]
CHATS = [
    [{"role": "user", "content": "Explain what a statement is in Python, briefly please."},
     {"role": "assistant", "content": "A statement is a unit of code that the interpreter "
                                      "executes, for example an assignment or a loop."},
     {"role": "user", "content": "And an expression?"},
     {"role": "assistant", "content": "An expression evaluates to a value: 1 + 2, f(x)."}],
    [{"role": "user", "content": "What does the assert statement do?"},
     {"role": "assistant", "content": "It checks a condition and raises AssertionError "
                                      "when the condition is false, unless optimised away."}],
]


@pytest.fixture(scope="module")
def texts():
    docs = list(load_corpus("builtin:docs", max_docs=len(LENGTHS)))
    return [d.text[:n] for d, n in zip(docs, LENGTHS)]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory, texts):
    """A JSONL corpus with documents of varied lengths and two chat transcripts."""
    path = tmp_path_factory.mktemp("corpus") / "mixed.jsonl"
    rows = [{"text": t, "id": f"doc{i:02d}"} for i, t in enumerate(texts)]
    rows.insert(3, {"messages": CHATS[0], "id": "chat0"})
    rows.insert(9, {"messages": CHATS[1], "id": "chat1"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _extract(model, corpus, out, *, layer=None, overwrite=False, progress=True,
             split_fractions=None, **config):
    """extract() with the stage config's fields as keywords (split_fractions: its splits)."""
    cfg = ExtractConfig(**config, splits=split_fractions)
    return extract(model, corpus, out, cfg, layer=layer, overwrite=overwrite, progress=progress)


def _corpus(path, tok, **kw):
    return load_corpus(str(path), tokenizer=tok, **kw)


@pytest.fixture(scope="module")
def store(tiny, corpus_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ex") / "store"
    return _extract(tiny, _corpus(corpus_file, tiny[1]), out, batch_size=3, shard_docs=5, **KW)


def _rows(store):
    return store.table().to_pylist()


# ---- correctness ---------------------------------------------------------------------------


def test_store_schema(store):
    table = store.table()
    assert table.schema == store_schema(64)
    vec_type = table.schema.field("vector").type
    assert pa.types.is_fixed_size_list(vec_type)
    assert vec_type.list_size == 64 and vec_type.value_type == pa.float32()
    assert store.vectors().dtype == torch.float32 and store.vectors().shape == (len(table), 64)
    assert table.column("row_id").to_pylist() == sorted(table.column("row_id").to_pylist())


def test_vectors_match_direct_forward(store, tiny, corpus_file):
    """Each stored vector equals the block output of its document run alone (no padding)."""
    model, tok = tiny
    docs = {d.doc_id: d for d in _corpus(corpus_file, tok)}
    rows = _rows(store)
    vectors = store.vectors()
    by_doc: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_doc.setdefault(r["doc_id"], []).append(i)
    lengths = set()
    for doc_id, idx in by_doc.items():
        ids = acts._tokenize(tok, docs[doc_id], KW["max_tokens_per_doc"])
        lengths.add(len(ids))
        t = torch.tensor([ids])
        hidden = forward_to_layer(model, t, torch.ones_like(t), LAYER)[0]
        positions = [rows[i]["position"] for i in idx]
        torch.testing.assert_close(vectors[idx], hidden[positions], atol=2e-5, rtol=1e-4)
        for i in idx:
            r = rows[i]
            assert r["token_id"] == ids[r["position"]]
            assert r["prefix"] == tok.decode(ids[: r["position"] + 1])
            assert docs[doc_id].text.startswith(r["prefix"])  # chats keep their first marker
            assert r["prefix"].endswith(r["token_text"])
            assert r["doc_kind"] == docs[doc_id].kind
    assert len(lengths) >= 5  # documents of different lengths shared batches
    assert {"chat0", "chat1"} <= set(by_doc)


def test_positions_rules(store, tiny, corpus_file):
    tok = tiny[1]
    special = special_token_ids(tok)
    rows = _rows(store)
    assert rows
    per_doc: dict[str, list[int]] = {}
    for r in rows:
        assert r["position"] >= KW["min_position"]
        assert r["token_id"] not in special
        per_doc.setdefault(r["doc_id"], []).append(r["position"])
    for doc in _corpus(corpus_file, tok):
        ids = acts._tokenize(tok, doc, KW["max_tokens_per_doc"])
        eligible = [i for i in range(KW["min_position"], len(ids)) if ids[i] not in special]
        got = per_doc.get(doc.doc_id, [])
        assert len(got) == min(KW["positions_per_doc"], len(eligible)), doc.doc_id
        assert len(set(got)) == len(got) and got == sorted(got)
    # the chat transcripts hold special tokens after min_position: they were avoided
    chat = next(d for d in _corpus(corpus_file, tok) if d.doc_id == "chat0")
    chat_ids = acts._tokenize(tok, chat, KW["max_tokens_per_doc"])
    assert any(t in special for t in chat_ids[KW["min_position"]:])


def test_prefix_text_bos(tiny):
    """A BOS the tokenizer added is dropped; one that the document itself starts with is kept."""
    tok = tiny[1]
    ids = tok("plain text")["input_ids"]
    assert acts._prefix_text(tok, [tok.bos_token_id, *ids], "plain text") == "plain text"
    chat = "<|im_start|>user\nhi"
    chat_ids = tok(chat)["input_ids"]
    assert chat_ids[0] == tok.bos_token_id
    assert acts._prefix_text(tok, chat_ids, chat) == chat


def test_sample_positions_unit():
    ids = list(range(100))
    special = {60, 61, 62}
    a = sample_positions(ids, "doc", 0, 10, 50, special)
    assert a == sample_positions(ids, "doc", 0, 10, 50, special)
    assert len(a) == 10 and all(p >= 50 and p not in special for p in a)
    assert a != sample_positions(ids, "doc", 1, 10, 50, special)
    assert a != sample_positions(ids, "other", 0, 10, 50, special)
    assert sample_positions(ids, "doc", 0, 100, 50, special) == \
        [p for p in range(50, 100) if p not in special]
    assert sample_positions(ids[:50], "doc", 0, 10, 50, special) == []
    # uniform among eligible tokens: over many documents every eligible index is drawn
    counts = np.zeros(100)
    for i in range(400):
        counts[sample_positions(ids, f"d{i}", 0, 5, 50, special)] += 1
    assert counts[:50].sum() == 0 and counts[list(special)].sum() == 0
    assert counts[[p for p in range(50, 100) if p not in special]].min() > 10


def test_deterministic_across_batching(tiny, corpus_file, store, tmp_path):
    other = _extract(tiny, _corpus(corpus_file, tiny[1]), tmp_path / "b1", batch_size=1,
                    shard_docs=2, **KW)
    a, b = store.table(), other.table()
    for col in ("row_id", "doc_id", "doc_index", "split", "position", "token_id", "prefix"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    torch.testing.assert_close(store.vectors(), other.vectors(), atol=2e-5, rtol=1e-4)
    assert len(other.meta["parts"]) == 7 and len(store.meta["parts"]) == 3
    # another seed changes positions and splits
    seeded = _extract(tiny, _corpus(corpus_file, tiny[1]), tmp_path / "s1", seed=1,
                     batch_size=3, **KW)
    def pairs(s):
        return [(r["doc_id"], r["position"]) for r in _rows(s)]

    assert pairs(seeded) != pairs(store)


def test_split_is_per_document(tiny, tmp_path):
    corpus = load_corpus("builtin:docs", max_docs=200)
    store = _extract(tiny, corpus, tmp_path / "splits", layer=0, positions_per_doc=2,
                    min_position=4, max_tokens_per_doc=24, batch_size=16, progress=False)
    rows = store.table(columns=["doc_id", "split"]).to_pylist()
    split_of: dict[str, set] = {}
    for r in rows:
        split_of.setdefault(r["doc_id"], set()).add(r["split"])
    assert len(split_of) == 200
    assert all(len(s) == 1 for s in split_of.values())
    per_split = {name: 0 for name in acts.DEFAULT_SPLIT_FRACTIONS}
    for s in split_of.values():
        per_split[next(iter(s))] += 1
    for name, frac in acts.DEFAULT_SPLIT_FRACTIONS.items():
        assert abs(per_split[name] / 200 - frac) < 0.09, (name, per_split)
    counts = store.meta["counts"]
    assert counts["docs_per_split"] == per_split
    assert counts["rows_per_split"] == {n: store.num_rows(n) for n in per_split}
    assert sum(counts["rows_per_split"].values()) == counts["rows"] == len(rows) == 400
    for name in per_split:
        assert set(store.table(name).column("split").to_pylist()) == {name}


def test_assign_split_fractions():
    fr = {"a": 0.5, "b": 0.3, "c": 0.2}
    got = [assign_split(f"doc{i}", 0, fr) for i in range(5000)]
    for name, frac in fr.items():
        assert abs(got.count(name) / 5000 - frac) < 0.03
    assert got == [assign_split(f"doc{i}", 0, fr) for i in range(5000)]
    assert got != [assign_split(f"doc{i}", 1, fr) for i in range(5000)]
    with pytest.raises(NLAError, match="add up to 1"):
        acts.check_fractions({"a": 0.5, "b": 0.4})
    with pytest.raises(NLAError, match="non-negative"):
        acts.check_fractions({"a": 1.5, "b": -0.5})
    assert acts.parse_fractions("x=0.75,y=0.25") == {"x": 0.75, "y": 0.25}
    with pytest.raises(NLAError, match="bad split spec"):
        acts.parse_fractions("x=0.75,y")


# ---- provenance and statistics -------------------------------------------------------------


def test_meta_provenance(store, tiny, corpus_file):
    meta = read_yaml(store.path / "meta.yaml")
    assert meta["kind"] == "nlakit_activations"
    assert meta["nlakit_version"] == __version__
    assert meta["python_version"] == platform.python_version()  # builtin text depends on it
    assert meta["model"]["spec"] == tiny[0].nlakit_source["spec"]
    assert meta["model"]["weights_hash"] == tiny[0].nlakit_source["weights_hash"]
    assert meta["model"]["weights_hash"].startswith("sha256:")
    assert meta["layer"] == LAYER and meta["num_layers"] == 4 and meta["d_model"] == 64
    assert "hidden_states[2]" in meta["hook"]
    assert meta["seed"] == 0
    assert meta["corpus"]["source"] == str(corpus_file.resolve())
    assert meta["corpus"]["format"] == "jsonl"
    assert meta["splits"]["unit"] == "document"
    counts = meta["counts"]
    assert counts["docs"] == len(LENGTHS) + 2
    assert counts["rows"] == store.num_rows() == len(store.table())
    assert counts["tokens"] == sum(
        len(acts._tokenize(tiny[1], d, KW["max_tokens_per_doc"]))
        for d in _corpus(corpus_file, tiny[1]))
    assert meta["config"]["min_position"] == KW["min_position"]
    assert meta["config"]["positions_per_doc"] == KW["positions_per_doc"]
    assert not (store.path / "progress.yaml").exists()
    assert "layer=1" in repr(store)


def test_rows_by_id(store):
    whole = store.table(columns=["row_id", "split", "vector"])
    ids = whole.column("row_id").to_pylist()
    wanted = [ids[-1], ids[0], ids[len(ids) // 2], ids[0]]  # any order, a repeat
    got = store.rows(wanted, columns=["row_id", "split", "vector"])
    assert got.column("row_id").to_pylist() == sorted(set(wanted))
    for i, row_id in enumerate(got.column("row_id").to_pylist()):
        assert got.slice(i, 1).to_pylist() == whole.slice(ids.index(row_id), 1).to_pylist()
    missing = max(ids) + 1
    assert store.rows([missing, ids[0]]).column("row_id").to_pylist() == [ids[0]]
    assert store.rows([missing]).num_rows == 0 and store.rows([]).num_rows == 0
    assert store.rows([ids[0]]).schema == store.table().schema  # every column by default


def test_stats_match_vectors(store):
    vectors = store.vectors().double()
    stats = store.stats("all")
    norms = vectors.norm(dim=1)
    assert stats["n"] == len(vectors)
    assert stats["rawvar"] == pytest.approx(M.rawvar(vectors), abs=1e-6)
    assert stats["meannorm"] == pytest.approx(M.meannorm(vectors), abs=1e-6)
    assert stats["mean_norm"] == pytest.approx(float(norms.mean()), rel=1e-6)
    assert stats["max_norm"] == pytest.approx(float(norms.max()), rel=1e-6)
    assert stats["norm_percentiles"]["p50"] == pytest.approx(float(norms.median()), rel=0.05)
    m = float(M.mean_unit_direction(vectors).norm())
    assert stats["mean_unit_direction_norm"] == pytest.approx(m, abs=1e-6)
    assert stats["mean_direction_fve_nrm"] == pytest.approx(1 - 2 / (1 + m), abs=1e-5)
    torch.testing.assert_close(store.mean_unit_direction("all").double(),
                               M.mean_unit_direction(vectors), atol=1e-6, rtol=0)
    for split in store.splits:
        sub = store.vectors(split).double()
        if len(sub) == 0:
            assert store.stats(split)["n"] == 0
            continue
        assert store.stats(split)["rawvar"] == pytest.approx(M.rawvar(sub), abs=1e-6)
        assert store.stats(split)["n"] == len(sub)
    with pytest.raises(NLAError, match="unknown split"):
        store.table("nope")


def test_short_documents_counted(store, tiny, corpus_file):
    tok = tiny[1]
    short = [d.doc_id for d in _corpus(corpus_file, tok)
             if len(acts._tokenize(tok, d, KW["max_tokens_per_doc"])) <= KW["min_position"]]
    assert len(short) >= 2  # the corpus was built to have some
    assert store.meta["counts"]["docs_short"] == len(short)
    assert not set(short) & set(store.table(columns=["doc_id"]).column("doc_id").to_pylist())


# ---- errors --------------------------------------------------------------------------------


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_all_short_corpus(tiny, tmp_path):
    corpus = _corpus(_jsonl(tmp_path / "short.jsonl", ["tiny text", "also short"]), tiny[1])
    with pytest.raises(NLAError, match="shorter than"):
        _extract(tiny, corpus, tmp_path / "out", **KW)


def test_empty_corpus(tiny, tmp_path):
    corpus = _corpus(_jsonl(tmp_path / "empty.jsonl", ["", "   "]), tiny[1])
    with pytest.raises(NLAError, match="empty"):
        _extract(tiny, corpus, tmp_path / "out", **KW)
    (tmp_path / "blank.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(NLAError, match="empty"):
        _extract(tiny, _corpus(tmp_path / "blank.jsonl", tiny[1]), tmp_path / "out2", **KW)


@pytest.mark.parametrize("kwargs, match", [
    ({"layer": 4}, "out of range"),
    ({"layer": -1}, "out of range"),
    ({"positions_per_doc": 0}, "positions_per_doc"),
    ({"min_position": -1}, "min_position"),
    ({"max_tokens_per_doc": 20}, "max_tokens_per_doc"),
    ({"split_fractions": {"a": 0.5}}, "add up to 1"),
])
def test_bad_arguments(tiny, corpus_file, tmp_path, kwargs, match):
    with pytest.raises(NLAError, match=match):
        _extract(tiny, _corpus(corpus_file, tiny[1]), tmp_path / "out", **{**KW, **kwargs})
    assert not (tmp_path / "out" / "meta.yaml").exists()


def test_other_layer_is_refused(tiny, corpus_file, tmp_path):
    out = tmp_path / "store"
    _extract(tiny, _corpus(corpus_file, tiny[1]), out, **KW)
    with pytest.raises(ConfigMismatchError, match="layer"):
        _extract(tiny, _corpus(corpus_file, tiny[1]), out, **{**KW, "layer": 2})
    assert ActivationStore(out).layer == LAYER  # untouched
    replaced = _extract(tiny, _corpus(corpus_file, tiny[1]), out,
                       **{**KW, "layer": 2}, overwrite=True)
    assert replaced.layer == 2 and read_yaml(out / "meta.yaml")["layer"] == 2
    assert replaced.num_rows() == ActivationStore(out).num_rows() > 0


def test_non_store_dir_is_refused(tiny, corpus_file, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigMismatchError, match="not empty"):
        _extract(tiny, _corpus(corpus_file, tiny[1]), out, **KW)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(NLAError, match="not an activation store"):
        ActivationStore(out)


def test_rerun_complete_is_noop(tiny, corpus_file, store, monkeypatch):
    parts = sorted((store.path / "parts").iterdir())
    before = {p: os.stat(p).st_mtime_ns for p in [*parts, store.path / "meta.yaml"]}

    def boom(*_a, **_k):
        raise AssertionError("a complete store was recomputed")

    monkeypatch.setattr(acts, "_write_shard", boom)
    monkeypatch.setattr(acts, "_finalize", boom)
    again = _extract(tiny, _corpus(corpus_file, tiny[1]), store.path, batch_size=3, shard_docs=5,
                    **KW)
    assert again.meta == store.meta
    assert {p: os.stat(p).st_mtime_ns for p in before} == before


def test_resume_after_interrupt(tiny, corpus_file, tmp_path, monkeypatch):
    real = acts._write_shard
    calls = []
    interrupt = [True]

    def interrupting(*args, **kwargs):
        calls.append(args[0].name)
        if len(calls) == 2 and interrupt[0]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(acts, "_write_shard", interrupting)
    with pytest.raises(KeyboardInterrupt):
        _extract(tiny, _corpus(corpus_file, tiny[1]), out, batch_size=3, shard_docs=4, **KW)
    assert (out / "progress.yaml").is_file() and not (out / "meta.yaml").exists()
    assert [p.name for p in (out / "parts").iterdir()] == ["part-00000.parquet"]
    with pytest.raises(NLAError, match="unfinished"):
        ActivationStore(out)
    calls.clear()
    interrupt[0] = False
    resumed = _extract(tiny, _corpus(corpus_file, tiny[1]), out, batch_size=3, shard_docs=4, **KW)
    assert calls == ["part-00001.parquet", "part-00002.parquet", "part-00003.parquet"]
    monkeypatch.setattr(acts, "_write_shard", real)
    fresh = _extract(tiny, _corpus(corpus_file, tiny[1]), tmp_path / "fresh", batch_size=3,
                    shard_docs=4, **KW)
    a, b = resumed.table(), fresh.table()
    assert a.schema == b.schema and a.num_rows == b.num_rows > 0
    for name in a.schema.names:
        assert a.column(name).to_pylist() == b.column(name).to_pylist(), name
    assert torch.equal(resumed.vectors(), fresh.vectors())
    ma, mb = dict(resumed.meta), dict(fresh.meta)
    ma["corpus"] = mb["corpus"] = None
    assert ma == mb


# ---- CLI -----------------------------------------------------------------------------------


def test_cli_error_returns_2(tiny_model_dir, corpus_file, tmp_path, capsys):
    rc = main(["extract", "--model", str(tiny_model_dir), "--corpus", str(corpus_file),
               "--out", str(tmp_path / "o"), "--layer", "9", "--min-position", "20"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nlakit: error: layer 9 is out of range" in err and "Traceback" not in err
    assert main(["extract", "--model", "/no/such/model.gguf", "--out", str(tmp_path / "p")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "not an activation store" in capsys.readouterr().err


def test_cli_extract_and_info(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["extract", "--model", str(tiny_model_dir), "--corpus", str(corpus_file),
               "--out", str(out), "--layer", "2", "--min-position", "10",
               "--positions-per-doc", "3", "--max-tokens-per-doc", "96", "--batch-size", "4",
               "--max-docs", "8", "--splits", "av_sft=0.5,heldout=0.5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "layer 2 of 4" in printed and "d_model 64" in printed
    store = ActivationStore(out)
    assert store.layer == 2 and store.meta["counts"]["docs"] == 8
    assert set(store.splits) == {"av_sft", "heldout"}
    assert 0 < store.num_rows() <= 8 * 3
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f"total {store.num_rows()}" in info and "rawvar" in info
    assert main(["info", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["layer"] == 2


@pytest.mark.slow
def test_cli_extract_smollm(tmp_path, capsys, smollm):
    out = tmp_path / "smol"
    rc = main(["extract", "--model", "smollm2-135m", "--corpus", "builtin:docs",
               "--max-docs", "6", "--positions-per-doc", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "layer 20 of 30" in capsys.readouterr().out
    store = ActivationStore(out)
    meta = store.meta
    assert meta["num_layers"] == 30 and meta["layer"] == 20 and meta["d_model"] == 576
    assert meta["model"]["spec"] == "smollm2-135m" and meta["model"]["kind"] == "alias"
    assert meta["counts"]["docs"] == 6 and meta["counts"]["rows"] == 18
    vectors = store.vectors()
    assert vectors.shape == (18, 576) and torch.isfinite(vectors).all()
    # spot-check one row against the fixture's model
    model, tok = smollm
    row = store.table().slice(0, 1).to_pylist()[0]
    doc = next(d for d in load_corpus("builtin:docs", max_docs=6) if d.doc_id == row["doc_id"])
    ids = acts._tokenize(tok, doc, 1024)[: row["position"] + 1]
    t = torch.tensor([ids])
    h = forward_to_layer(model, t, torch.ones_like(t), 20)[0, -1]
    torch.testing.assert_close(vectors[0], h, atol=1e-3, rtol=1e-3)


def test_a_builtin_store_resumes_only_under_the_python_that_began_it(tmp_path):
    """The builtin corpus is the running stdlib's text: another Python would mix documents."""
    builtin = SimpleNamespace(description={"source": "builtin", "format": "builtin"})
    config = acts._store_config(SimpleNamespace(), builtin, 1, ExtractConfig())
    assert config["stdlib_python"] == platform.python_version()
    out = tmp_path / "store"
    out.mkdir()
    write_yaml(out / "progress.yaml", {"config": {**config, "stdlib_python": "3.10.0"}})
    with pytest.raises(ConfigMismatchError, match="Python 3.10.0.*run that Python"):
        acts._prepare_out_dir(out, config, overwrite=False)
    legacy = {k: v for k, v in config.items() if k != "stdlib_python"}  # before it was recorded
    write_yaml(out / "progress.yaml", {"config": legacy})
    assert acts._prepare_out_dir(out, config, overwrite=False) is False
    jsonl = SimpleNamespace(description={"source": "/x.jsonl", "text_field": "text"})
    assert "stdlib_python" not in acts._store_config(SimpleNamespace(), jsonl, 1, ExtractConfig())

