"""`nlakit serve`: the JSON API and pages, against a real uvicorn server on 127.0.0.1 (real HTTP
through httpx), on a tiny random NLA with a small eval + audit run."""

import json
import logging
import threading
import time

import httpx
import pytest
import torch

from nlakit import NLAError
from nlakit.apps.serve import BackgroundServer, ServeLimits, create_app
from nlakit.apps.serve.testing import SAMPLE_TEXT, tiny_viewer_nla, with_explanations, write_run

pytestmark = pytest.mark.usefixtures("private_cache")

LIMITS = ServeLimits(max_text_chars=600, max_tokens=48, max_positions=40, max_best_of=4,
                     max_new_tokens=8, default_new_tokens=6, max_explanation_chars=300,
                     max_queue=16)
HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"window.pwned=1\">&amp;"


@pytest.fixture(scope="module")
def nla(tiny, tiny_store):
    return tiny_viewer_nla(tiny, tiny_store.layer, rawvar=tiny_store.stats()["rawvar"])


@pytest.fixture(scope="module")
def run_dir(nla, tiny_store, tmp_path_factory):
    return write_run(nla, tiny_store, tmp_path_factory.mktemp("serve-run") / "run")


@pytest.fixture(scope="module")
def server(nla, tiny_store, run_dir):
    app = create_app(nla, acts=tiny_store.path, eval_dir=run_dir, limits=LIMITS, chunk=4)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def test_pages_info_and_security_headers(server, nla):
    info = server.get("/api/info").json()
    assert info["layer"] == nla.layer and info["d_model"] == nla.d_model
    assert info["has_eval"] and info["has_audit"] and info["has_acts"]
    assert info["limits"]["max_text_chars"] == 600
    for path, marker in (("/", 'id="explain-all"'), ("/browse", 'id="rows"'),
                         ("/reconstruct", 'id="r-explanation"')):
        r = server.get(path)
        assert r.status_code == 200 and marker in r.text, path
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
    assert server.get("/static/app.js").status_code == 200
    schema = server.get("/api/openapi.json").json()
    assert {"/api/explain", "/api/tokenize", "/api/reconstruct", "/api/rows",
            "/api/jobs/{job_id}"} <= set(schema["paths"])
    # a page reached through another host name (DNS rebinding) is refused
    assert server.get("/api/info", headers={"host": "attacker.example"}).status_code == 400


def test_tokenize_gives_tokens_and_the_targets_top_next_tokens(server, nla):
    r = server.post("/api/tokenize", json={"text": SAMPLE_TEXT, "top_k": 3})
    assert r.status_code == 200
    d = r.json()
    ids, _ = nla.activations(SAMPLE_TEXT)
    assert [t["id"] for t in d["tokens"]] == ids and d["n_tokens"] == len(ids)
    model, tok = nla.target()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    for t in d["tokens"]:
        top = t["top_next"]
        assert len(top) == 3 and top[0]["id"] == int(logits[t["position"]].argmax())
        assert top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"] > 0
        assert t["token"] == tok.decode([t["id"]])


def test_explain_all_tokens_matches_the_library(server, nla):
    r = server.post("/api/explain", json={"text": SAMPLE_TEXT, "positions": "all", "wait": True})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] == "done" and job["done"] == job["total"]
    res = job["result"]["results"]
    ids, acts = nla.activations(SAMPLE_TEXT)
    assert [x["position"] for x in res] == list(range(len(ids)))
    assert all(x["explanation"] for x in res)  # the untied tiny AV writes non-empty text
    # each token's numbers are the library's: the AR's reading of that explanation
    for x in (res[0], res[len(res) // 2], res[-1]):
        s = nla.score([x["explanation"]], acts[x["position"]][None])
        assert x["cos"] == pytest.approx(float(s["cos"][0]), abs=1e-5)
        assert x["fve_nrm"] == pytest.approx(float(s["fve_nrm"][0]), abs=1e-5)
    lib = nla.explain_text(SAMPLE_TEXT, [len(ids) - 1], max_new_tokens=6, verify=True)[0]
    assert res[-1]["explanation"] == lib.explanation
    assert res[-1]["fve_nrm"] == pytest.approx(lib.fve_nrm, abs=1e-5)
    # the claim checks are the library's too (None where the explanation makes no claim)
    assert res[-1]["verification"] == lib.verification
    assert res[-1]["claims"] == {k: (None if v != v else v) for k, v in lib.claims.items()}


def test_the_viewer_checks_the_claims_of_what_it_explains(server, nla, monkeypatch):
    """An explanation with a right and a wrong claim comes back with both marked."""
    from nlakit.nla.prompt import Explanation

    _, tok = nla.target()
    ids = tok(SAMPLE_TEXT, add_special_tokens=True)["input_ids"]
    real = tok.decode(ids[-1:])
    said = f"Current token: {real!r}. Kind of text: dialogue."
    monkeypatch.setattr(nla, "candidates", lambda vecs, n, **_: [
        Explanation(said, True, said, 9) for _ in range(len(vecs) * n)])
    r = server.post("/api/explain", json={"text": SAMPLE_TEXT, "positions": [-1], "wait": True})
    x = r.json()["result"]["results"][0]
    assert x["claims"]["current_token_right"] == 1.0 and x["claims"]["kind_right"] == 0.0
    assert "✓ current token" in x["verification"] and "✗ kind of text" in x["verification"]


def test_explain_job_reports_progress_and_partial_results(server):
    r = server.post("/api/explain", json={"text": SAMPLE_TEXT, "positions": "all"})
    assert r.status_code == 202
    job = r.json()
    seen, since, dones = [], 0, set()
    deadline = time.monotonic() + 120
    while job["status"] in ("queued", "running") and time.monotonic() < deadline:
        seen.extend(job["partial"])
        since += len(job["partial"])
        dones.add(job["done"])
        time.sleep(0.01)
        job = server.get(f"/api/jobs/{job['job_id']}", params={"since": since}).json()
    seen.extend(job["partial"])
    assert job["status"] == "done"
    assert seen == job["result"]["results"]  # partial results arrive in order, none lost
    assert all(d % 4 == 0 or d == job["total"] for d in dones)  # chunks of 4 positions


def test_best_of_n_keeps_the_sample_the_ar_reads_best(server):
    r = server.post("/api/explain", json={"text": "def f(x): return x", "positions": [-1],
                                          "best_of": 3, "seed": 1, "wait": True})
    assert r.status_code == 200, r.text
    x = r.json()["result"]["results"][0]
    assert x["best_of"] == 3 and len(x["samples"]) == 3
    assert x["mse_nrm"] == pytest.approx(min(s["mse_nrm"] for s in x["samples"]))


def test_chat_is_rendered_with_the_targets_template(server, nla):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    d = server.post("/api/tokenize", json={"messages": msgs}).json()
    assert d["text"] == nla.target()[1].apply_chat_template(msgs, tokenize=False)
    assert "<|im_start|>assistant" in d["text"]
    r = server.post("/api/explain", json={"messages": msgs, "positions": "last", "wait": True})
    assert r.status_code == 200 and r.json()["result"]["positions"] == [d["n_tokens"] - 1]


def test_browse_rows_sort_filter_and_baselines(server, run_dir):
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    d = server.get("/api/rows", params={"sort": "score", "order": "desc"}).json()
    assert d["total"] == ev["n_rows"] == len(d["rows"])
    scores = [r["score"] for r in d["rows"]]
    assert scores == sorted(scores, reverse=True)
    row = d["rows"][0]
    assert {"nla", "mean_direction", "quote_4"} <= set(row["baselines"])
    assert row["kind"] in d["kinds"] and row["explanation"]
    mid = scores[len(scores) // 2]
    hi = server.get("/api/rows", params={"min_score": mid}).json()
    assert hi["total"] == sum(s >= mid for s in scores)
    doc = d["docs"][0]
    by_doc = server.get("/api/rows", params={"doc": doc}).json()
    assert by_doc["total"] >= 1 and all(r["doc_id"] == doc for r in by_doc["rows"])
    by_kind = server.get("/api/rows", params={"kind": row["kind"]}).json()
    assert all(r["kind"] == row["kind"] for r in by_kind["rows"])
    page = server.get("/browse", params={"sort": "score", "order": "desc"}).text
    assert page.index(f'data-row="{d["rows"][0]["row_id"]}"') < \
        page.index(f'data-row="{d["rows"][-1]["row_id"]}"')
    summary = server.get("/api/run").json()
    assert summary["eval"]["methods"]["nla"]["fve_nrm"] == \
        pytest.approx(ev["methods"]["nla"]["fve_nrm"]["mean"])
    assert "shuffle_units" in summary["audit"]["tests"]


def test_row_detail_edits_and_reconstruct_use_the_true_activation(server, nla, tiny_store,
                                                                   run_dir):
    ev = json.loads((run_dir / "eval" / "eval.json").read_text())
    rid = ev["rows"][0]["row_id"]
    row = server.get(f"/api/rows/{rid}").json()
    full = tiny_store.table("all", ["row_id", "prefix", "vector"]).to_pylist()
    rec = next(r for r in full if r["row_id"] == rid)
    assert row["prefix"] == rec["prefix"] and row["explanation"] == ev["rows"][0]["explanation"]
    vec = torch.tensor(rec["vector"])[None]
    text = "the text ends with \"and\". Then a noun follows."
    r = server.post("/api/reconstruct", json={"explanation": text, "row_id": rid})
    assert r.status_code == 200, r.text
    s = nla.score([text], vec, rawvar=ev["rawvar"])
    assert r.json()["cos"] == pytest.approx(float(s["cos"][0]), abs=1e-5)
    assert r.json()["fve_nrm"] == pytest.approx(float(s["fve_nrm"][0]), abs=1e-5)
    e = server.post(f"/api/rows/{rid}/edits", json={"explanation": text}).json()
    names = [x["edit"] for x in e["edits"]]
    assert {"shuffle_units", "delete_quotes", "ablate_unit_1", "ablate_unit_2"} <= set(names)
    dq = e["edits"][names.index("delete_quotes")]
    assert "\"and\"" not in dq["text"]
    assert dq["drop"] == pytest.approx(e["original"]["fve_nrm"] - dq["fve_nrm"], abs=1e-6)
    s2 = nla.score([dq["text"]], vec, rawvar=ev["rawvar"])
    assert dq["fve_nrm"] == pytest.approx(float(s2["fve_nrm"][0]), abs=1e-5)
    html = server.get(f"/browse/rows/{rid}").text
    assert 'id="run-edits"' in html


def test_reconstruct_against_a_token_of_a_text(server, nla):
    r = server.post("/api/reconstruct", json={"explanation": "a list", "text": SAMPLE_TEXT,
                                              "position": -1})
    assert r.status_code == 200, r.text
    _, acts = nla.activations(SAMPLE_TEXT)
    s = nla.score(["a list"], acts[-1][None])
    assert r.json()["cos"] == pytest.approx(float(s["cos"][0]), abs=1e-5)
    assert r.json()["target"]["position"] == acts.shape[0] - 1


@pytest.mark.parametrize("method,path,body,status,needle", [
    ("post", "/api/explain", {"text": "x" * 601}, 413, "max_text_chars"),
    ("post", "/api/explain", {"text": "for x in range(10): y = x * 2; " * 6}, 413, "max_tokens"),
    ("post", "/api/explain", {"text": "   \n "}, 422, "empty text"),
    ("post", "/api/explain", {"text": SAMPLE_TEXT, "best_of": 5}, 413, "max_best_of"),
    ("post", "/api/explain", {"text": SAMPLE_TEXT, "max_new_tokens": 9}, 413, "max_new_tokens"),
    ("post", "/api/explain", {"text": SAMPLE_TEXT, "positions": [0, 999]}, 422, "out of range"),
    ("post", "/api/explain", {"text": SAMPLE_TEXT, "positions": []}, 422, "empty list"),
    ("post", "/api/explain", {"text": "hi", "messages": [{"role": "user", "content": "x"}]},
     422, "exactly one of"),
    ("post", "/api/explain", {"text": "hi", "path": "/etc/passwd"}, 422, "path"),
    ("post", "/api/explain", {"messages": [{"role": "robot", "content": "x"}]}, 422, "role"),
    ("post", "/api/explain", {"text": 5}, 422, "text"),
    ("post", "/api/tokenize", {"text": "hi", "top_k": 21}, 413, "max_top_k"),
    ("post", "/api/reconstruct", {"explanation": "y" * 301, "row_id": 0}, 413,
     "max_explanation_chars"),
    ("post", "/api/reconstruct", {"explanation": "", "row_id": 0}, 422, "empty explanation"),
    ("post", "/api/reconstruct", {"explanation": "a", "row_id": 10**9}, 404, "unknown row id"),
    ("get", "/api/rows/1000000000", None, 404, "unknown row id"),
    ("get", "/browse/rows/1000000000", None, 404, "unknown row id"),
    ("get", "/api/rows?sort=secret", None, 422, "unknown sort key"),
    ("get", "/api/rows?limit=501", None, 413, "max_rows_per_page"),
    ("get", "/api/jobs/nope", None, 404, "unknown job id"),
])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, method, path, body,
                                                                   status, needle):
    r = server.post(path, json=body) if method == "post" else server.get(path)
    assert r.status_code == status, r.text
    assert needle in r.text
    if path.startswith("/api"):
        assert "error" in r.json()
    if status == 413:
        assert r.json()["limit"] == needle
    assert server.get("/api/info").status_code == 200


def test_an_oversized_body_is_refused_before_it_is_read(server):
    big = b'{"text": "' + b"a" * 1_000_001 + b'"}'
    r = server.post("/api/explain", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["limit"] == "max_body_bytes"

    def chunks():
        yield b'{"text": "hi"}'

    r = server.post("/api/explain", content=chunks(), headers={"content-type":
                                                               "application/json"})
    assert r.status_code == 411
    assert server.get("/api/info").status_code == 200


def test_malformed_json_is_a_400_and_the_server_keeps_serving(server):
    for raw in (b"{not json", b'{"text": "a"', b""):
        r = server.post("/api/explain", content=raw,
                        headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), r.text
        assert "error" in r.json()
    assert server.post("/api/explain", content=b"{not json",
                       headers={"content-type": "application/json"}).status_code == 400
    ok = server.post("/api/explain", json={"text": "ok", "positions": "last", "wait": True})
    assert ok.status_code == 200 and ok.json()["status"] == "done"


def test_queue_holds_concurrent_requests_and_runs_one_at_a_time(server):
    n = 8
    barrier = threading.Barrier(n)
    answers = [None] * n

    def submit(i):
        with httpx.Client(base_url=str(server.base_url), timeout=60) as c:
            barrier.wait()
            answers[i] = c.post("/api/explain", json={"text": SAMPLE_TEXT, "positions": "all",
                                                      "seed": i}).json()

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    # the server answers other requests while the worker is busy
    assert server.get("/api/info").status_code == 200
    for t in threads:
        t.join()
    positions = sorted(a["queue_position_at_submit"] for a in answers)
    jobs = []
    for a in answers:
        job = a
        while job["status"] in ("queued", "running"):
            time.sleep(0.02)
            job = server.get(f"/api/jobs/{a['job_id']}").json()
        assert job["status"] == "done"
        jobs.append(job)
    spans = sorted((j["started_at"], j["finished_at"]) for j in jobs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end  # never two jobs at once
    depth = server.get("/api/queue").json()["max_depth_seen"]
    print(f"\nqueue: {n} concurrent explain requests; places at submit {positions}; "
          f"max depth seen {depth}")
    assert max(positions) >= n - 2 and depth >= n - 1


def test_a_full_queue_answers_429_naming_the_limit(nla, tiny_store):
    app = create_app(nla, limits=ServeLimits(max_queue=2, max_new_tokens=8, max_positions=256,
                                             default_new_tokens=8), chunk=64)
    long = (SAMPLE_TEXT + " ") * 3
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        codes = [c.post("/api/explain", json={"text": long, "positions": "all"})
                 for _ in range(6)]
        assert 429 in [r.status_code for r in codes]
        full = next(r for r in codes if r.status_code == 429).json()
        assert full["limit"] == "max_queue" and "queue is full" in full["error"]
        assert c.get("/api/info").status_code == 200


def test_model_output_is_html_escaped_in_every_page(nla, tiny_store, tmp_path):
    hostile = with_explanations(tiny_viewer_nla(nla.target(), tiny_store.layer), HOSTILE)
    run = write_run(hostile, tiny_store, tmp_path / "run")
    assert json.loads((run / "eval" / "eval.json").read_text())["rows"][0]["explanation"] \
        == HOSTILE
    app = create_app(hostile, acts=tiny_store.path, eval_dir=run, limits=LIMITS)
    with BackgroundServer(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        rid = c.get("/api/rows").json()["rows"][0]["row_id"]
        for path in ("/browse", f"/browse/rows/{rid}", f"/reconstruct?row_id={rid}",
                     "/browse?q=<script>alert(1)</script>"):
            page = c.get(path).text
            assert "<script>document" not in page and "<img src=x" not in page, path
            assert "<script>alert" not in page
            assert page.count("<script") == 1  # only /static/app.js
        assert "&lt;script&gt;document.title=" in c.get("/browse").text
        # the API returns the text itself (JSON), unchanged
        r = c.post("/api/explain", json={"text": "hi", "positions": "last", "wait": True})
        assert r.json()["result"]["results"][0]["explanation"] == HOSTILE


def test_serving_an_nla_directory_and_refusing_a_mismatched_run(nla, tiny, tiny_store,
                                                               run_dir, tmp_path):
    root = nla.save(tmp_path / "nla")
    app = create_app(root, eval_dir=run_dir / "eval")  # audit/ found next to eval/
    with BackgroundServer(app) as url:
        info = httpx.get(f"{url}/api/info").json()
        assert info["layer"] == nla.layer and info["has_audit"]
        assert info["has_acts"]  # the store named in eval.json
    other = tiny_viewer_nla(tiny, 1)
    with pytest.raises(NLAError, match="layer"):
        create_app(other, eval_dir=run_dir)
    with pytest.raises(NLAError, match="no eval.json"):
        create_app(nla, eval_dir=tmp_path)


def test_serve_binds_loopback_and_warns_for_another_host(nla, monkeypatch, caplog, capsys):
    import uvicorn

    from nlakit.apps.serve import serve

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    with caplog.at_level(logging.WARNING, logger="nlakit.apps.serve.server"):
        serve(nla, port=8123)
        assert not caplog.records
        serve(nla, host="0.0.0.0", port=8124)
    assert calls[0]["host"] == "127.0.0.1" and calls[1]["host"] == "0.0.0.0"
    assert any("anyone who can reach" in r.message for r in caplog.records)
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out


def test_limits_are_validated():
    with pytest.raises(NLAError, match="max_tokens"):
        ServeLimits(max_tokens=0)
    with pytest.raises(NLAError, match="default_new_tokens"):
        ServeLimits(max_new_tokens=4, default_new_tokens=8)



def test_the_serve_subcommand_flags_come_from_the_dataclasses(nla, tmp_path, monkeypatch):
    """The flags of `nlakit serve` (cli.py) are generated from ServeInputs and ServeLimits."""
    import argparse

    import uvicorn

    from nlakit.apps.serve import run_serve
    from nlakit.apps.serve.config import ServeInputs
    from nlakit.run.cli import add_dataclass_flags

    parser = argparse.ArgumentParser(prog="nlakit serve")
    add_dataclass_flags(parser, ServeInputs, "inputs")
    add_dataclass_flags(parser, ServeLimits, "limits")
    root = nla.save(tmp_path / "nla")
    args = parser.parse_args(["--nla", str(root), "--port", "8125", "--max-tokens", "99",
                              "--max-best-of", "3"])
    given = {g: {k.split(":", 1)[1]: v for k, v in vars(args).items()
                 if k.startswith(g + ":")} for g in ("inputs", "limits")}
    inputs, limits = ServeInputs(**given["inputs"]), ServeLimits(**given["limits"])
    assert inputs.host == "127.0.0.1" and inputs.port == 8125 and inputs.eval is None
    assert limits.max_tokens == 99 and limits.max_best_of == 3 and limits.max_queue == 32
    seen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append(
        (app.state.viewer.limits, app.state.viewer.nla.layer, kw)))
    assert run_serve(inputs, limits) == 0
    assert seen[0][0] == limits and seen[0][1] == nla.layer
    assert seen[0][2]["host"] == "127.0.0.1" and seen[0][2]["port"] == 8125
    official = nla.save(tmp_path / "official", layout="official")
    args = parser.parse_args(["--av", str(official / "av"), "--ar", str(official / "ar")])
    inputs = ServeInputs(**{k.split(":", 1)[1]: v for k, v in vars(args).items()
                            if k.startswith("inputs:")})
    assert run_serve(inputs) == 0 and seen[1][1] == nla.layer
    with pytest.raises(NLAError, match="--nla NLA_DIR, or both"):
        ServeInputs(av="x")
    with pytest.raises(NLAError, match="port"):
        ServeInputs(nla="x", port=70000)
