"""Warm-start labellers: parsing, the grounded context labeller, the OpenAI-compatible client
against a real loopback HTTP server, caching/resumption, the label-set format and the CLI."""

from __future__ import annotations

import socket
import time

import pyarrow.compute as pc
import pytest
import torch

from chat_server import ChatServer  # tests/chat_server.py
from nlakit.errors import NLAError
from nlakit.labels import (
    Labeller,
    LabelRow,
    LabelSet,
    LocalLabeller,
    label_store,
    make_labeller,
    parse_label,
    register_labeller,
)
from nlakit.labels.context import ContextLabeller, text_kind
from nlakit.model.lm_head import top_next_tokens

pytestmark = pytest.mark.usefixtures("private_cache")
SFT_SPLITS = ("av_sft", "ar_sft")  # the two SFT splits (the default adds heldout)


# ---- parsing and rules --------------------------------------------------------------------


def test_parse_strips_markdown_and_keeps_order():
    raw = ("Sure:\n<explanation>\n- **Python code** in a docstring.\n2. A list of names\n"
           "* Ends with \"(\": an argument comes next.\n</explanation> trailing")
    parsed = parse_label(raw)
    assert parsed.features == ["Python code in a docstring.", "A list of names",
                               "Ends with \"(\": an argument comes next."]
    assert parsed.text.count("\n") == 2


@pytest.mark.parametrize("raw,reason", [
    ("", "empty"),
    ("<explanation>\nA\nB\n", "no_closed_tag"),
    ("I'm sorry, but I can't help with that.", "refusal"),
    ("<explanation>\nI cannot determine the features.\nNo.\n</explanation>", "refusal"),
    ("<explanation>\nonly one feature\n</explanation>", "too_few_features"),
    ("<explanation>\nsame\nsame\n- same\n</explanation>", "too_few_features"),
    ("<explanation>\na\nb\nc\nd\n</explanation>", "too_many_features"),
    ("<explanation>\n" + "word " * 100 + "\n" + "word " * 60 + "\n</explanation>", "too_long"),
])
def test_parse_drops_with_reason(raw, reason):
    parsed = parse_label(raw)
    assert not parsed.kept and parsed.reason == reason


def test_parse_ignores_tag_mentioned_in_prose():
    raw = "I write <explanation> tags:\n<explanation>\nfirst\nsecond\n</explanation>"
    assert parse_label(raw).features == ["first", "second"]


@pytest.mark.parametrize("text,kind", [
    ("Some docs.\n>>> import os\n>>> os.getcwd()", "code"),
    ("def f(x):\n    y = x + 1\n    return y", "code"),
    ("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\nHi", "dialogue"),
    ("Shopping:\n- eggs\n- milk\n- bread", "list"),
    ("The quick brown fox jumps over the lazy dog. It was a sunny day and", "prose"),
    ("<div><p>Hello <b>world</b> and", "markup"),
    ("| a | b |\n| 1 | 2 |\n| 3 |", "table"),
])
def test_text_kind_rules(text, kind):
    assert text_kind(text) == kind


# ---- the context labeller -----------------------------------------------------------------


def test_top_next_tokens_match_model_logits(tiny, tiny_store):
    model, tok = tiny
    prefixes = tiny_store.table("av_sft", columns=["prefix"]).column("prefix").to_pylist()[:5]
    labeller = ContextLabeller(str(tiny_store.meta["model"]["spec"]), loaded=tiny)
    batch = [labeller.token_ids(p) for p in prefixes]
    assert len({len(ids) for ids in batch}) > 1  # the batch really is padded
    probs, ids = top_next_tokens(model, batch, k=4, pad_id=tok.pad_token_id)
    for i, seq in enumerate(batch):
        logits = model(torch.tensor([seq])).logits[0, -1].float()
        ref = torch.softmax(logits, -1).topk(4)
        assert ids[i].tolist() == ref.indices.tolist()
        assert torch.allclose(probs[i], ref.values, atol=1e-5)


def test_context_labeller_shares_one_forward_per_document(tiny, tiny_store):
    """Rows of one document read their predictions from the longest prefix's forward pass;
    the result must equal running each row's own prefix alone."""
    from nlakit.labels import LabelRow

    table = tiny_store.table("av_sft", columns=["row_id", "doc_id", "prefix", "position",
                                                "token_id", "split"]).to_pylist()[:10]
    assert len({r["doc_id"] for r in table}) < len(table)  # several rows per document
    rows = [LabelRow(r["row_id"], r["split"], r["doc_id"], r["prefix"], r["position"],
                     r["token_id"]) for r in table]
    labeller = ContextLabeller(str(tiny_store.meta["model"]["spec"]), loaded=tiny)
    grouped = labeller.label_batch(rows)
    alone = [labeller.label_batch([r])[0] for r in rows]
    assert grouped == alone


def test_context_labeller_end_to_end(tiny, tiny_store, tmp_path):
    model, tok = tiny
    spec = str(tiny_store.meta["model"]["spec"])
    labeller = ContextLabeller(spec, loaded=tiny, top_k=3)
    labels = label_store(tiny_store, labeller, tmp_path / "labels", max_rows=4, progress=False)
    meta = labels.meta
    assert meta["kind"] == "nlakit_labels"
    # the default splits include heldout (the eval's label baseline)
    assert meta["counts"]["rows"] == 12 and meta["counts"]["kept"] == 12
    assert meta["splits"] == ["av_sft", "ar_sft", "heldout"]
    assert meta["acts"]["layer"] == tiny_store.layer
    assert meta["labeller"]["kind"] == "context" and meta["labeller"]["settings"]["top_k"] == 3
    assert meta["labeller"]["retokenization"]["retokenized"] == 12
    table = labels.table()
    assert table.column_names == ["row_id", "doc_id", "split", "label", "features", "raw"]
    row = table.to_pylist()[0]
    assert len(row["features"]) == 3 and row["label"] == "\n".join(row["features"])
    # the predictions quoted in the label are the model's own top-3 at that prefix
    rows = tiny_store.table(columns=["row_id", "prefix"])
    prefix = rows.filter(pc.equal(rows["row_id"], row["row_id"])).column("prefix")[0].as_py()
    probs, ids = top_next_tokens(model, [labeller.token_ids(prefix)], k=3,
                                 pad_id=tok.pad_token_id)
    for p, t in zip(probs[0].tolist(), ids[0].tolist()):
        shown = tok.decode([t]).replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")
        assert f"'{shown}' ({p:.0%})" in row["features"][2]
    assert row["features"][0].startswith("Kind of text: ")
    # joined with the store: vector, prefix and label side by side, one split at a time
    joined = labels.joined(tiny_store, "av_sft")
    assert joined.num_rows == 4
    assert {"vector", "prefix", "label", "features"} <= set(joined.column_names)
    assert set(joined.column("split").to_pylist()) == {"av_sft"}
    # a re-run is served from the cache: the model is never needed
    again = label_store(tiny_store, ContextLabeller(spec, loaded=(None, None)),
                        tmp_path / "labels2", max_rows=4, progress=False)
    assert again.meta["counts"]["from_cache"] == 12 and again.meta["counts"]["labelled_now"] == 0
    assert again.table().column("label").to_pylist() == table.column("label").to_pylist()


def test_labelset_refuses_partial_and_mismatched_store(tiny, tiny_store, tmp_path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "labels.parquet").write_bytes(b"")
    with pytest.raises(NLAError, match="not a complete label set"):
        LabelSet(tmp_path / "partial")
    labels = label_store(tiny_store, ContextLabeller(str(tiny_store.meta["model"]["spec"]),
                                                     loaded=tiny),
                         tmp_path / "ok", splits=["heldout"], max_rows=2, progress=False)
    assert labels.splits == ["heldout"]
    labels.meta["acts"]["layer"] += 1
    with pytest.raises(NLAError, match="layer"):
        labels.joined(tiny_store, "heldout")


def test_registry_custom_labeller_and_bad_input(tiny_store, tmp_path):
    class Echo(Labeller):
        kind = "echo"

        def label_batch(self, rows):
            return [f"<explanation>\nlast char {r.prefix[-1]!r}\nrow {r.row_id}\n</explanation>"
                    for r in rows]

    register_labeller("echo", Echo)
    labels = label_store(tiny_store, "echo", tmp_path / "echo", splits=SFT_SPLITS, max_rows=3,
                         progress=False)
    assert labels.meta["counts"]["kept"] == 6
    with pytest.raises(NLAError, match="unknown labeller"):
        make_labeller("no-such-labeller", tiny_store)
    with pytest.raises(NLAError, match="unknown split"):
        label_store(tiny_store, "echo", tmp_path / "x", splits=["train"], progress=False)

    class Short(Labeller):
        kind = "short"

        def label_batch(self, rows):
            return ["<explanation>\na\nb\n</explanation>"]

    with pytest.raises(NLAError, match="returned 1 outputs"):
        label_store(tiny_store, Short(), tmp_path / "short", max_rows=3, progress=False)


def test_all_dropped_raises_and_writes_nothing(tiny_store, tmp_path):
    class Useless(Labeller):
        kind = "useless"

        def label_batch(self, rows):
            return ["I'm sorry, I can't do that."] * len(rows)

    out = tmp_path / "useless"
    with pytest.raises(NLAError, match="no usable label.*refusal"):
        label_store(tiny_store, Useless(), out, max_rows=3, progress=False)
    assert not (out / "meta.yaml").exists() and not (out / "labels.parquet").exists()


def test_local_labeller_batched_generation_on_tiny(tiny, tiny_store):
    rows = [LabelRow(int(r["row_id"]), r["split"], r["doc_id"], r["prefix"])
            for r in tiny_store.table("av_sft").slice(0, 3).to_pylist()]
    labeller = LocalLabeller(str(tiny_store.meta["model"]["spec"]), loaded=tiny,
                             max_new_tokens=6, max_prefix_chars=40)
    rows[1] = LabelRow(rows[1].row_id, "av_sft", "d", rows[1].prefix[:5])  # uneven lengths
    batched = labeller.label_batch(rows)
    assert len(batched) == 3 and all(r.startswith("<explanation>\n") for r in batched)
    # left padding: a row's greedy continuation does not depend on its batch neighbours
    alone = [labeller.label_batch([r])[0] for r in rows]
    assert batched == alone
    prompt = labeller.prompts(rows[:1])[0]
    assert prompt.endswith("<|im_start|>assistant\n<explanation>\n")
    assert "<text>" in prompt and prompt.count("<|im_start|>user") == 3  # one-shot examples


def test_local_labeller_built_by_name_loads_its_own_model_and_labels(tiny_store):
    """The stage's path: no model injected, the labeller loads the spec itself (this once
    failed with ModuleNotFoundError, unseen because every other test injects a model)."""
    labeller = make_labeller("local", tiny_store, max_new_tokens=4, max_prefix_chars=40)
    assert labeller.model_spec == str(tiny_store.meta["model"]["spec"])
    labeller.prepare()
    row = tiny_store.table("av_sft").slice(0, 1).to_pylist()[0]
    (label,) = labeller.label_batch([LabelRow(int(row["row_id"]), row["split"], row["doc_id"],
                                              row["prefix"])])
    assert label.startswith("<explanation>\n") and len(label) > len("<explanation>\n")


# ---- the OpenAI-compatible labeller against a loopback server -----------------------------

GOOD = ("<explanation>\n- **Reference documentation** about Python.\nEnds mid-sentence.\n"
        "</explanation>")


@pytest.fixture
def chat_server(monkeypatch):
    monkeypatch.setenv("TEST_LABEL_KEY", "sk-test")
    server = ChatServer(lambda body: GOOD)
    yield server
    server.close()


def _openai(server, **kw):
    opts = {"base_url": server.url, "api_model": "fake-model", "api_key_env": "TEST_LABEL_KEY",
            "retry_base_delay": 0.01, "retry_max_delay": 0.05, "timeout": 5}
    opts.update(kw)
    return make_labeller("openai", None, **opts)


def test_openai_labels_concurrently(chat_server, tiny_store, tmp_path):
    labels = label_store(tiny_store, _openai(chat_server, concurrency=3), tmp_path / "o",
                         splits=SFT_SPLITS, max_rows=3, progress=False)
    assert labels.meta["counts"]["kept"] == 6
    assert len(chat_server.requests) == 6
    req = chat_server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "fake-model"
    assert req["body"]["messages"][-1]["content"].count("<text>") == 1
    assert labels.table().column("features")[0].as_py() == [
        "Reference documentation about Python.", "Ends mid-sentence."]
    prov = labels.meta["labeller"]
    assert prov["api_model"] == "fake-model" and prov["base_url"] == chat_server.url
    assert prov["requests"]["requests"] == 6


def test_openai_retries_429_and_5xx(chat_server, tiny_store, tmp_path):
    chat_server.script = ["429", "429", "500"]
    labeller = _openai(chat_server, concurrency=1)
    labels = label_store(tiny_store, labeller, tmp_path / "o", splits=["av_sft"], max_rows=3,
                         progress=False)
    assert labels.meta["counts"]["kept"] == 3
    assert len(chat_server.requests) == 6
    assert labels.meta["labeller"]["requests"]["retries"] == 3


def test_openai_malformed_notag_refusal_counted(chat_server, tiny_store, tmp_path):
    chat_server.script = ["notag", "refusal", "malformed", "malformed", "nocontent", "nocontent"]
    labeller = _openai(chat_server, concurrency=1, max_retries=1)
    labels = label_store(tiny_store, labeller, tmp_path / "o", splits=["av_sft"], max_rows=6,
                         progress=False)
    counts = labels.meta["counts"]
    assert counts["kept"] == 2 and counts["dropped"] == 4
    assert counts["dropped_by_reason"] == {"malformed_response": 2, "no_closed_tag": 1,
                                           "refusal": 1}
    dropped = labels.dropped().to_pylist()
    assert {d["reason"] for d in dropped} == {"malformed_response", "no_closed_tag", "refusal"}
    # malformed rows were not cached: a re-run asks again for them only
    before = len(chat_server.requests)
    again = label_store(tiny_store, _openai(chat_server, concurrency=1), tmp_path / "o",
                        splits=["av_sft"], max_rows=6, progress=False)
    assert len(chat_server.requests) - before == 2
    assert again.meta["counts"]["kept"] == 4


def test_openai_budget_interrupt_and_resume(chat_server, tiny_store, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(NLAError, match="budget of 3"):
        label_store(tiny_store, _openai(chat_server, concurrency=1, max_requests=3), out,
                    splits=SFT_SPLITS, max_rows=4, progress=False)
    assert len(chat_server.requests) == 3
    assert not (out / "meta.yaml").exists()
    with pytest.raises(NLAError, match="not a complete label set"):
        LabelSet(out)
    labels = label_store(tiny_store, _openai(chat_server, concurrency=2), out,
                         splits=SFT_SPLITS, max_rows=4, progress=False)
    assert len(chat_server.requests) == 8  # no duplicate request for the 3 cached rows
    sent = [r["body"]["messages"][-1]["content"] for r in chat_server.requests]
    assert len(set(sent)) == 8
    assert labels.meta["counts"]["from_cache"] == 3 and labels.meta["counts"]["kept"] == 8


def test_openai_all_dropped_is_an_error(chat_server, tiny_store, tmp_path):
    chat_server.default = "notag"
    out = tmp_path / "o"
    with pytest.raises(NLAError, match="no usable label.*no_closed_tag"):
        label_store(tiny_store, _openai(chat_server), out, max_rows=2, progress=False)
    assert not (out / "meta.yaml").exists()


def test_openai_rejected_key_fails_fast(chat_server, tiny_store, tmp_path):
    chat_server.default = "401"
    with pytest.raises(NLAError, match="HTTP 401.*rejected"):
        label_store(tiny_store, _openai(chat_server, concurrency=1), tmp_path / "o",
                    max_rows=2, progress=False)
    assert len(chat_server.requests) == 1


def test_openai_missing_key_and_unreachable(tiny_store, tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(NLAError, match="NO_SUCH_KEY_VAR"):
        make_labeller("openai", None, base_url="http://127.0.0.1:1/v1", api_model="m",
                      api_key_env="NO_SUCH_KEY_VAR")
    with pytest.raises(NLAError, match="--base-url"):
        make_labeller("openai", None, api_model="m", no_api_key=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    labeller = make_labeller("openai", None, base_url=f"http://127.0.0.1:{port}/v1",
                             api_model="m", no_api_key=True, max_retries=2,
                             retry_base_delay=0.01, timeout=2)
    start = time.time()
    with pytest.raises(NLAError, match="cannot reach .* after 3 attempts"):
        label_store(tiny_store, labeller, tmp_path / "o", max_rows=2, progress=False)
    assert time.time() - start < 10
    assert labeller.stats["requests"] >= 3
    assert not (tmp_path / "o" / "meta.yaml").exists()


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_context_and_openai(chat_server, tiny_store, tmp_path, capsys):
    from nlakit.run.cli import main

    out = tmp_path / "ctx"
    rc = main(["label", "--acts", str(tiny_store.path), "--labeller", "context",
               "--max-rows", "2", "--splits", "av_sft", "--out", str(out), "--no-progress"])
    assert rc == 0 and LabelSet(out).meta["counts"]["kept"] == 2
    assert "kept 2" in capsys.readouterr().out
    rc = main(["label", "--acts", str(tiny_store.path), "--labeller", "openai", "--base-url",
               chat_server.url, "--api-model", "fake", "--api-key-env", "TEST_LABEL_KEY",
               "--max-rows", "2", "--out", str(tmp_path / "api"), "--no-progress"])
    assert rc == 0 and LabelSet(tmp_path / "api").meta["counts"]["kept"] == 6  # 3 splits x 2
    rc = main(["label", "--acts", str(tiny_store.path), "--labeller", "openai", "--base-url",
               chat_server.url, "--api-model", "fake", "--api-key-env", "UNSET_VAR_X",
               "--out", str(tmp_path / "bad")])
    assert rc == 2 and "UNSET_VAR_X" in capsys.readouterr().err


# ---- the embedded SmolLM2 ------------------------------------------------------------------


@pytest.mark.slow
def test_local_labeller_smollm(smollm, tmp_path):
    prefixes = [
        "The capital of France is Paris. The capital of Germany is",
        "def add(a, b):\n    return a +",
        "Dear Sir or Madam,\n\nI am writing to complain about the",
        "1. Eggs\n2. Milk\n3.",
    ]
    rows = [LabelRow(i, "av_sft", f"d{i}", p) for i, p in enumerate(prefixes)]
    labeller = LocalLabeller("smollm2-135m", loaded=smollm, max_new_tokens=48)
    raws = labeller.label_batch(rows)
    assert len(raws) == 4 and all(r.startswith("<explanation>\n") for r in raws)
    parsed = [parse_label(r) for r in raws]
    # SmolLM2-135M is weak, but with the prefilled tag and one-shot prompt it closes the tag
    # and writes real words for most rows
    assert sum(p.kept for p in parsed) >= 2, raws
    kept = [p for p in parsed if p.kept]
    assert all(any(c.isalpha() for c in f) for p in kept for f in p.features)


def test_context_labeller_tail_style_states_the_current_token_and_ends_verbatim(tiny, tiny_store):
    from nlakit.labels import LabelRow
    from nlakit.labels.context import _visible

    _, tok = tiny
    spec = str(tiny_store.meta["model"]["spec"])
    table = tiny_store.table("av_sft", columns=["row_id", "doc_id", "prefix", "position",
                                                "token_id", "split"]).to_pylist()[:4]
    rows = [LabelRow(r["row_id"], r["split"], r["doc_id"], r["prefix"], r["position"],
                     r["token_id"]) for r in table]
    tail = ContextLabeller(spec, loaded=tiny, style="tail", tail_tokens=5)
    v1 = ContextLabeller(spec, loaded=tiny)
    assert tail.identity() != v1.identity()  # different formats never share cached labels
    assert v1.identity()["prompt_version"] == "context-v1"  # v1's cache keys are unchanged
    for r, raw in zip(rows, tail.label_batch(rows)):
        lines = raw.removeprefix("<explanation>\n").removesuffix("\n</explanation>").split("\n")
        assert len(lines) == 3
        ids = tok(r.prefix, add_special_tokens=False)["input_ids"]
        assert lines[0] == f"Current token: '{_visible(tok.decode(ids[-1:]))}'."
        assert lines[1].startswith("Kind of text: ") and "The model expects next: " in lines[1]
        assert lines[2] == f"Ending: {_visible(tok.decode(ids[-5:]))}"
    back = ContextLabeller(spec, loaded=tiny, style="tail_back", tail_tokens=5)
    assert back.identity()["prompt_version"] == "context-tail-back-5" != \
        tail.identity()["prompt_version"]
    for r, plain, raw in zip(rows, tail.label_batch(rows), back.label_batch(rows)):
        lines = raw.removeprefix("<explanation>\n").removesuffix("\n</explanation>").split("\n")
        ids = tok(r.prefix, add_special_tokens=False)["input_ids"]
        before = [f"'{_visible(tok.decode([i]))}'" for i in (ids[-2], ids[-3], ids[-4])]
        assert lines[1] == f"Before it: {', '.join(before)}."  # newest first
        assert [lines[0], *lines[2:]] == plain.split("\n")[1:-1]  # otherwise tail's label
        assert back.parse(raw).features is not None, back.parse(raw)  # four lines are kept
    only = ContextLabeller(spec, loaded=tiny, style="tail_only", tail_tokens=5)
    assert only.identity()["prompt_version"] == "context-tail-only-5"
    for plain, raw in zip(tail.label_batch(rows), only.label_batch(rows)):
        lines = plain.split("\n")
        assert raw.split("\n") == [lines[0], lines[1], lines[3], lines[4]]  # no kind line
        assert only.parse(raw).features is not None
    with pytest.raises(NLAError, match="style"):
        ContextLabeller(spec, loaded=tiny, style="poem")


def test_max_rows_labels_rows_spread_over_the_whole_split(tiny_store, tmp_path):
    """A store keeps a split document by document: max_rows must not label the first
    documents only."""
    from nlakit.labels.labelset import spread_rows

    class Echo(Labeller):
        kind = "echo-spread"

        def label_batch(self, rows):
            return [f"<explanation>\nrow {r.row_id}\nlast char {r.prefix[-1]!r}\n</explanation>"
                    for r in rows]

    table = tiny_store.table("av_sft", columns=["row_id", "doc_id"]).to_pylist()
    n_docs = len({r["doc_id"] for r in table})
    assert n_docs >= 4 and len(table) > n_docs
    labels = label_store(tiny_store, Echo(), tmp_path / "spread", splits=["av_sft"],
                         max_rows=n_docs, progress=False)
    got = labels.table().to_pylist()
    assert len(got) == n_docs
    assert {r["doc_id"] for r in got} > {table[0]["doc_id"], table[-1]["doc_id"]}  # both ends
    assert len({r["doc_id"] for r in got}) > n_docs // 2  # not the first few documents
    assert spread_rows(10, 3) == [0, 4, 9] and spread_rows(5, 5) is None
    assert spread_rows(4140, 2400)[-1] == 4139 and len(spread_rows(4140, 2400)) == 2400
