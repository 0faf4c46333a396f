"""Corpus readers: every format, stable ids, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nlakit import NLAError
from nlakit.corpus.documents import Corpus, Document, render_chat
from nlakit.corpus.load import load_corpus

PARAS = ["First paragraph about apples.", "Second paragraph\nabout pears.", "Third: plums."]


def _ids_texts(corpus):
    return [(d.doc_id, d.text) for d in corpus]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- text files ----------------------------------------------------------------------------


def test_txt_whole_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("\n\n".join(PARAS), encoding="utf-8")
    docs = list(load_corpus(str(f)))
    assert len(docs) == 1
    assert docs[0].doc_id == "notes.txt"
    assert docs[0].text == "\n\n".join(PARAS)
    assert docs[0].kind == "text"


def test_txt_blocks(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("\n\n".join(PARAS) + "\n\n\n\n   \n\n", encoding="utf-8")
    corpus = load_corpus(str(f), blocks=True)
    assert corpus.description["blocks"] is True
    assert _ids_texts(corpus) == [(f"notes.txt#{i}", p) for i, p in enumerate(PARAS)]
    assert _ids_texts(corpus) == _ids_texts(load_corpus(str(f), blocks=True))  # re-iterable


def test_text_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee text", encoding="utf-8")
    (tmp_path / "a.md").write_text("# A\n\nay text", encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text("see text\n\nmore", encoding="utf-8")
    (tmp_path / "ignored.json").write_text("{}", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    corpus = load_corpus(str(tmp_path))
    assert corpus.description["format"] == "text_folder"
    got = _ids_texts(corpus)
    assert got == [("a.md", "# A\n\nay text"), ("b.txt", "bee text"),
                   ("sub/c.txt", "see text\n\nmore")]  # empty documents are skipped
    blocks = [d.doc_id for d in load_corpus(str(tmp_path), blocks=True)]
    assert blocks == ["a.md#0", "a.md#1", "b.txt#0", "sub/c.txt#0", "sub/c.txt#1"]


def test_text_folder_without_text_files(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(NLAError, match="no text files"):
        load_corpus(str(tmp_path))


def test_non_utf8_text_file(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(NLAError, match="UTF-8"):
        list(load_corpus(str(f)))


# ---- jsonl ---------------------------------------------------------------------------------


def test_jsonl_text_field(tmp_path):
    f = _write_jsonl(tmp_path / "data.jsonl", [
        {"text": "one"}, {"text": "two", "id": "custom", "kind": "prose"}, {"text": ""},
        {"text": "four"},
    ])
    docs = list(load_corpus(str(f)))
    assert [(d.doc_id, d.text, d.kind) for d in docs] == [
        ("data:1", "one", "text"), ("custom", "two", "prose"), ("data:4", "four", "text")]


def test_jsonl_other_text_field(tmp_path):
    f = _write_jsonl(tmp_path / "data.jsonl", [{"body": "hello"}, {"body": "world"}])
    assert [d.text for d in load_corpus(str(f), text_field="body")] == ["hello", "world"]
    with pytest.raises(NLAError, match=r"no field 'text'.*--text-field"):
        list(load_corpus(str(f)))


def test_jsonl_chat_transcripts(tmp_path, tiny):
    tok = tiny[1]
    chats = [
        [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}],
    ]
    f = _write_jsonl(tmp_path / "chats.jsonl",
                     [{"messages": chats[0]}, {"messages": chats[1], "id": "c1"},
                      {"text": "plain"}])
    docs = list(load_corpus(str(f), tokenizer=tok))
    assert [d.kind for d in docs] == ["chat", "chat", "text"]
    assert [d.doc_id for d in docs] == ["chats:1", "c1", "chats:3"]  # an explicit id wins
    assert docs[0].text == tok.apply_chat_template(chats[0], tokenize=False)
    assert docs[0].text == "<|im_start|>user\nHi there<|im_end|>\n" \
                           "<|im_start|>assistant\nHello!<|im_end|>\n"
    assert docs[1].text == render_chat(chats[1], tok)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in docs[1].text
    assert docs[2].text == "plain"


def test_jsonl_chat_errors(tmp_path, tiny):
    f = _write_jsonl(tmp_path / "chats.jsonl",
                     [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(NLAError, match="chat template"):
        list(load_corpus(str(f)))  # no tokenizer to render with
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(NLAError, match="role"):
        list(load_corpus(str(bad), tokenizer=tiny[1]))


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    corpus = load_corpus(str(f))
    with pytest.raises(NLAError, match=r"broken\.jsonl:3: not valid JSON"):
        list(corpus)
    g = tmp_path / "array.jsonl"
    g.write_text('["not", "an", "object"]\n', encoding="utf-8")
    with pytest.raises(NLAError, match=r"array\.jsonl:1: expected a JSON object"):
        list(load_corpus(str(g)))


def test_jsonl_missing_or_bad_text_field(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"content": "x"}])
    with pytest.raises(NLAError, match=r"d\.jsonl:2: no field 'text'"):
        list(load_corpus(str(f)))
    g = _write_jsonl(tmp_path / "n.jsonl", [{"text": 17}])
    with pytest.raises(NLAError, match="expected text"):
        list(load_corpus(str(g)))


def test_duplicate_ids_rejected(tmp_path):
    f = _write_jsonl(tmp_path / "dup.jsonl", [{"text": "a", "id": "x"}, {"text": "b", "id": "x"}])
    with pytest.raises(NLAError, match="duplicate document id 'x'"):
        list(load_corpus(str(f)))


# ---- parquet and datasets ------------------------------------------------------------------


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["alpha", None, "gamma"], "other": [1, 2, 3]}), f)
    docs = list(load_corpus(str(f)))
    assert [(d.doc_id, d.text) for d in docs] == [("corpus:0", "alpha"), ("corpus:2", "gamma")]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    assert [d.text for d in load_corpus(str(tmp_path / "b.parquet"), text_field="body")] == ["x"]
    with pytest.raises(NLAError, match="no column 'text'"):
        list(load_corpus(str(tmp_path / "b.parquet")))


def test_corrupt_parquet(tmp_path):
    f = tmp_path / "bad.parquet"
    f.write_bytes(b"this is not parquet at all")
    with pytest.raises(NLAError, match="cannot read parquet"):
        list(load_corpus(str(f)))


def test_saved_datasets_dir(tmp_path, tiny):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["one doc", "two doc", "three doc"],
                                     "label": [0, 1, 0]})
    ds.save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus(str(tmp_path / "ds"))
    assert corpus.description["format"] == "hf_datasets"
    assert _ids_texts(corpus) == [("0", "one doc"), ("1", "two doc"), ("2", "three doc")]
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": ["t0", "t1"]}),
        "test": datasets.Dataset.from_dict({"body": ["s0"]}),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    got = dict(_ids_texts(load_corpus(str(tmp_path / "dd"), text_field="body")))
    assert got == {"train:0": "t0", "train:1": "t1", "test:0": "s0"}
    chats = datasets.Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]})
    chats.save_to_disk(str(tmp_path / "chats"))
    docs = list(load_corpus(str(tmp_path / "chats"), tokenizer=tiny[1]))
    assert docs[0].kind == "chat" and docs[0].text.startswith("<|im_start|>user\nHi")


# ---- errors and limits ---------------------------------------------------------------------


def test_missing_corpus():
    with pytest.raises(NLAError, match="not found"):
        load_corpus("/no/such/corpus.txt")


def test_unknown_suffix(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(NLAError, match=r"unknown corpus format '\.csv'"):
        load_corpus(str(f))


def test_max_docs(tmp_path):
    f = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    corpus = load_corpus(str(f), max_docs=3)
    assert [d.text for d in corpus] == ["doc 0", "doc 1", "doc 2"]
    assert corpus.description["max_docs"] == 3
    for bad in (0, -2):
        with pytest.raises(NLAError, match="max_docs"):
            load_corpus(str(f), max_docs=bad)


def test_max_docs_counts_only_nonempty():
    docs = [Document("a", ""), Document("b", "x"), Document("c", "  "), Document("d", "y"),
            Document("e", "z")]
    corpus = Corpus({"source": "test"}, lambda: iter(docs), max_docs=2)
    assert [d.doc_id for d in corpus] == ["b", "d"]


# ---- built-in ------------------------------------------------------------------------------


def test_builtin_docs():
    corpus = load_corpus("builtin:docs", max_docs=60)
    docs = list(corpus)
    assert len(docs) == 60
    ids = [d.doc_id for d in docs]
    assert len(set(ids)) == 60
    assert ids == [d.doc_id for d in load_corpus("builtin:docs", max_docs=60)]  # stable
    assert all(d.kind in ("prose", "docstring") for d in docs)
    assert all(len(d.text) >= 600 for d in docs)
    text = " ".join(d.text for d in docs)
    words = text.split()
    # real English prose, not code or noise
    for common in ("the", "of", "is", "and", "a"):
        assert words.count(common) > 100, common
    assert corpus.description["format"] == "builtin"


def test_builtin_docs_full_has_both_kinds():
    docs = list(load_corpus("builtin:docs"))
    kinds = {d.kind for d in docs}
    assert kinds == {"prose", "docstring"}
    assert len(docs) > 200
    assert any(d.doc_id.startswith("pyref:") for d in docs)
    assert any(d.doc_id.startswith("stdlib:") for d in docs)


def test_builtin_code_is_code_without_the_docstrings_held_elsewhere():
    code = list(load_corpus("builtin:code"))
    assert len(code) > 100 and all(d.kind == "code" for d in code)
    assert all(d.doc_id.startswith("code:") and len(d.text) >= 600 for d in code)
    assert all(d.text.startswith(("def ", "class ", "async def ")) for d in code)
    assert sum("\n    " in d.text for d in code) > 0.9 * len(code)  # indentation kept
    docstrings = {d.doc_id.partition(":")[2]: d.text for d in load_corpus("builtin:docs")
                  if d.kind == "docstring"}
    checked = 0
    for doc in code:
        module = doc.doc_id.partition(":")[2]
        code_lines = {line.strip() for line in doc.text.splitlines()}
        for line in docstrings.get(module, "").splitlines():
            if len(line.strip()) > 40:  # docstring text must not reach another split via code
                assert line.strip() not in code_lines, (doc.doc_id, line)
                checked += 1
    assert checked > 1000


def test_builtin_wide_is_builtin_then_writing_and_code_alternating(monkeypatch):
    from nlakit.corpus import builtin as bc

    monkeypatch.setattr(bc, "_chat_documents", lambda tok, model: iter(
        [Document(f"chat:{i:03d}", "chat text " * 80, "chat") for i in range(2)]))
    monkeypatch.setattr(bc, "_writing_documents", lambda model: iter(
        [Document(f"writing:{i:03d}", "written text " * 80, "writing") for i in range(3)]))
    wide = [d.doc_id for d in load_corpus("builtin:wide")]
    n_all = len(list(load_corpus("builtin")))
    assert wide[:n_all] == [d.doc_id for d in load_corpus("builtin")]
    rest = wide[n_all:]
    code_ids = [d.doc_id for d in load_corpus("builtin:code")]
    assert rest[:6] == ["writing:000", code_ids[0], "writing:001", code_ids[1], "writing:002",
                        code_ids[2]]
    assert rest[6:] == code_ids[3:]
    assert len(set(wide)) == len(wide)
    assert "writing" in load_corpus("builtin:wide").description["contents"]


@pytest.mark.slow
def test_builtin_writing_is_plain_text_the_model_writes_once(smollm, monkeypatch, tmp_path):
    from nlakit.corpus import builtin as bc

    monkeypatch.setenv("NLAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bc, "WRITING_GENRES", ["a news article about {}", "a poem about {}"])
    monkeypatch.setattr(bc, "WRITING_TOPICS", ["a volcano eruption"])
    monkeypatch.setattr(bc, "WRITING_SETTINGS", {**bc.WRITING_SETTINGS, "max_new_tokens": 200})
    assert bc.writing_requests() == ["Write a news article about a volcano eruption.",
                                     "Write a poem about a volcano eruption."]
    docs = list(load_corpus("builtin:writing", chat_model=smollm))
    assert 1 <= len(docs) <= 2 and all(d.kind == "writing" for d in docs)
    for doc in docs:
        assert doc.doc_id.startswith("writing:") and len(doc.text) >= 600
        assert "<|im_start|>" not in doc.text and "Write a" not in doc.text[:40]  # no transcript
    cached = list((tmp_path / "cache" / "corpus").glob("builtin-writing-*.jsonl"))
    assert len(cached) == 1
    again = list(load_corpus("builtin:writing"))  # from the cache: no model needed
    assert [(d.doc_id, d.text) for d in again] == [(d.doc_id, d.text) for d in docs]


def test_builtin_unknown_part():
    with pytest.raises(NLAError, match="unknown built-in corpus"):
        load_corpus("builtin:poems")


@pytest.mark.slow
def test_builtin_interleaves_chats(smollm):
    """`builtin` = two documentation documents, then one chat (generates the chats once)."""
    tok = smollm[1]
    docs = list(load_corpus("builtin", tokenizer=tok, max_docs=12, chat_model=smollm))
    assert [d.kind == "chat" for d in docs] == [False, False, True] * 4
    chats = [d for d in docs if d.kind == "chat"]
    assert [d.doc_id for d in chats] == ["chat:000", "chat:001", "chat:002", "chat:003"]
    from nlakit.corpus.builtin import CHAT_REQUESTS

    for i, chat in enumerate(chats):
        # SmolLM2's template may add its default system turn first
        assert chat.text.startswith("<|im_start|>")
        assert f"<|im_start|>user\n{CHAT_REQUESTS[i]}<|im_end|>" in chat.text
        assert "<|im_start|>assistant\n" in chat.text
        answer = chat.text.split("<|im_start|>assistant\n", 1)[1]
        assert len(answer.split()) >= 5  # the model actually wrote something
    non_chat = [d.doc_id for d in docs if d.kind != "chat"]
    assert non_chat == [d.doc_id for d in load_corpus("builtin:docs", max_docs=8)]
    # the cached transcripts are reused: a second read gives identical documents
    again = list(load_corpus("builtin:chats", tokenizer=tok, max_docs=4))
    assert [(d.doc_id, d.text) for d in again] == [(d.doc_id, d.text) for d in chats]


def test_unseen_debian_corpus_takes_one_prose_file_per_package(tmp_path):
    import gzip
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "unseen_corpus.py"
    spec = importlib.util.spec_from_file_location("unseen_corpus", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    long_a, long_b = "a " * 1200, "b " * 1200
    for package, name, text in [("alpha", "README.Debian", long_a), ("alpha", "README", long_b),
                                ("beta", "notes.txt.gz", long_b), ("gamma", "README", "short"),
                                ("delta", "README.Debian", long_a),  # same text as alpha's
                                ("eps", "changelog.gz", long_b)]:
        (tmp_path / package).mkdir(exist_ok=True)
        data = text.encode()
        (tmp_path / package / name).write_bytes(gzip.compress(data) if name.endswith(".gz")
                                                else data)
    docs = script.debian_docs(2000, root=tmp_path)
    assert docs == {"alpha": long_a.strip(), "beta": long_b.strip()}


# ---- export --------------------------------------------------------------------------------


def test_export_reads_back_as_the_same_documents(tmp_path, tiny_model_dir, capsys):
    from nlakit.fileio import file_sha256
    from nlakit.run.cli import main

    out = tmp_path / "frozen.jsonl"
    assert main(["corpus-export", "builtin:docs", "--max-docs", "6", "--model",
                 str(tiny_model_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 6 documents" in printed and file_sha256(out) in printed
    original = [(d.doc_id, d.text, d.kind) for d in load_corpus("builtin:docs", max_docs=6)]
    again = [(d.doc_id, d.text, d.kind) for d in load_corpus(str(out))]
    assert again == original and len({i for i, _, _ in again}) == 6
    assert main(["corpus-export", "builtin:docs", "--model", str(tiny_model_dir),
                 "--out", str(tmp_path / "frozen.txt")]) != 0
    assert "name the file *.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "frozen.txt").exists()
