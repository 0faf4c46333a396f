// nlakit serve: the pages' behaviour. Model output is untrusted text: it is only ever put
// into the page with textContent (never innerHTML), and the server's CSP forbids inline script.
"use strict";

const $ = (id) => document.getElementById(id);
const fmt = (x) => (x === null || x === undefined ? "–" : (x >= 0 ? "+" : "") + x.toFixed(3));

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

async function api(method, path, body) {
  const opt = { method, headers: {} };
  if (body !== undefined) {
    opt.headers["Content-Type"] = "application/json";
    opt.body = JSON.stringify(body);
  }
  const r = await fetch(path, opt);
  let data = null;
  try { data = await r.json(); } catch (e) { data = { error: `HTTP ${r.status}` }; }
  if (!r.ok) {
    const err = new Error(data && data.error ? data.error : `HTTP ${r.status}`);
    err.status = r.status; err.data = data;
    throw err;
  }
  return data;
}

function bucket(score) {
  if (score === null || score === undefined || Number.isNaN(score)) return "bnone";
  return "b" + Math.round(Math.max(0, Math.min(1, score)) * 10);
}

async function pollQueue() {
  const q = $("queue-state");
  if (!q) return;
  try {
    const s = await api("GET", "/api/queue");
    q.textContent = s.running ? `queue: 1 running, ${s.waiting.length} waiting` : "queue: idle";
  } catch (e) { q.textContent = ""; }
}

// ---- Explain ---------------------------------------------------------------------------

const explainState = { tokens: [], results: {}, jobId: null, selected: null, text: null, info: null };

function chatMessages() {
  return Array.from(document.querySelectorAll("#turns .turn")).map((t) => ({
    role: t.querySelector("select").value, content: t.querySelector("textarea").value,
  }));
}

function addTurn(role, content) {
  const t = el("div", null, "turn controls");
  const sel = el("select");
  for (const r of ["system", "user", "assistant"]) {
    const o = el("option", r); o.value = r; if (r === role) o.selected = true; sel.appendChild(o);
  }
  const ta = el("textarea"); ta.rows = 2; ta.value = content || "";
  t.appendChild(sel); t.appendChild(ta);
  $("turns").appendChild(t);
}

function inputBody() {
  if ($("mode-chat") && $("mode-chat").checked) return { messages: chatMessages() };
  return { text: $("text").value };
}

function setStatus(state, text, done, total) {
  const s = $("status");
  s.dataset.state = state;
  s.textContent = text;
  const p = $("progress");
  if (total) { p.hidden = false; p.max = total; p.value = done; } else { p.hidden = true; }
}

function scoreOf(r) { return r.fve_nrm !== null && r.fve_nrm !== undefined ? r.fve_nrm : r.cos; }

function paintToken(pos) {
  const span = document.querySelector(`#tokens .tok[data-pos="${pos}"]`);
  if (!span) return;
  const r = explainState.results[pos];
  span.className = "tok " + (r ? bucket(scoreOf(r)) : "bnone") +
    (explainState.selected === pos ? " sel" : "");
  if (r) { span.dataset.explained = "yes"; span.title = r.explanation; }
}

function renderTokens(data) {
  explainState.tokens = data.tokens;
  explainState.results = {};
  explainState.text = data.text;
  explainState.selected = null;
  const box = $("tokens");
  box.textContent = "";
  box.dataset.job = "";
  for (const t of data.tokens) {
    const s = el("span", t.token.replace(/\n/g, "↵\n"), "tok bnone");
    s.dataset.pos = t.position;
    s.addEventListener("mouseenter", () => showDetail(t.position));
    s.addEventListener("mouseleave", () => { if (explainState.selected !== null) showDetail(explainState.selected); });
    s.addEventListener("click", () => selectToken(t.position));
    box.appendChild(s);
  }
  box.dataset.ntokens = data.tokens.length;
}

function selectToken(pos) {
  const prev = explainState.selected;
  explainState.selected = pos;
  if (prev !== null) paintToken(prev);
  paintToken(pos);
  showDetail(pos);
}

function showDetail(pos) {
  const t = explainState.tokens[pos];
  if (!t) return;
  $("detail").hidden = false;
  $("detail").dataset.pos = pos;
  $("d-pos").textContent = `#${pos}`;
  $("d-token").textContent = t.token;
  const r = explainState.results[pos];
  $("d-explanation").textContent = r ? r.explanation : "(not explained yet: explain all tokens, or this one)";
  $("d-explanation").dataset.ready = r ? "yes" : "no";
  $("d-fve").textContent = r ? fmt(r.fve_nrm) : "–";
  $("d-cos").textContent = r ? fmt(r.cos) : "–";
  $("d-mse").textContent = r ? (r.mse_nrm === null ? "–" : r.mse_nrm.toFixed(3)) : "–";
  $("d-bestof").textContent = r ? String(r.best_of) : "–";
  $("d-claims").textContent = r ? (r.verification || "(no checkable claim)") : "–";
  const top = $("d-top");
  top.textContent = "";
  for (const n of t.top_next || []) {
    top.appendChild(el("li", `${JSON.stringify(n.token)}  ${(100 * n.prob).toFixed(1)}%`));
  }
  const samples = $("d-samples");
  samples.textContent = "";
  if (r && r.samples) {
    samples.appendChild(el("h3", `the ${r.samples.length} samples (kept: best mse_nrm)`));
    for (const s of r.samples) samples.appendChild(el("div", `${fmt(scoreOf(s))}  ${s.explanation}`, "sample"));
  }
  const q = new URLSearchParams({ text: explainState.text || "", position: String(pos), explanation: r ? r.explanation : "" });
  $("to-reconstruct").href = "/reconstruct?" + q.toString();
}

async function tokenize() {
  setStatus("busy", "reading the text…");
  try {
    const data = await api("POST", "/api/tokenize", { ...inputBody(), top_k: 5 });
    renderTokens(data);
    setStatus("tokenized", `${data.n_tokens} tokens`);
    return data;
  } catch (e) {
    setStatus("error", e.message);
    throw e;
  }
}

async function runExplain(positions, bestOf) {
  if (!explainState.tokens.length || explainState.lastInput !== JSON.stringify(inputBody())) {
    await tokenize();
    explainState.lastInput = JSON.stringify(inputBody());
  }
  const body = { ...inputBody(), positions, best_of: bestOf,
                 max_new_tokens: parseInt($("max-new").value, 10) || undefined };
  let job;
  try {
    job = await api("POST", "/api/explain", body);
  } catch (e) { setStatus("error", e.message); return; }
  explainState.jobId = job.job_id;
  $("tokens").dataset.job = job.job_id;
  let since = 0;
  for (;;) {
    since = absorb(job, since);
    if (job.status === "queued") {
      setStatus("queued", `queued: place ${job.queue_position} (${job.jobs_ahead} job(s) ahead)`, 0, job.total);
    } else if (job.status === "running") {
      setStatus("running", `explaining: ${job.done} of ${job.total} tokens`, job.done, job.total);
    } else if (job.status === "done") {
      setStatus("done", `done: ${job.total} token(s) explained`, job.total, job.total);
      break;
    } else {
      setStatus("error", job.error ? job.error.error : "the job failed");
      break;
    }
    await new Promise((res) => setTimeout(res, 250));
    try { job = await api("GET", `/api/jobs/${job.job_id}?since=${since}`); }
    catch (e) { setStatus("error", e.message); return; }
  }
  if (explainState.selected !== null) showDetail(explainState.selected);
}

function absorb(job, since) {
  for (const r of job.partial || []) {
    explainState.results[r.position] = r;
    paintToken(r.position);
  }
  const n = since + (job.partial || []).length;
  if (explainState.selected !== null) showDetail(explainState.selected);
  return n;
}

function initExplain() {
  $("mode-text").addEventListener("change", () => { $("text").hidden = false; $("chat").hidden = true; });
  const chat = $("mode-chat");
  if (chat) chat.addEventListener("change", () => {
    $("text").hidden = true; $("chat").hidden = false;
    if (!$("turns").children.length) { addTurn("user", "What does a Python assignment statement do?"); addTurn("assistant", "It evaluates the expression list and"); }
  });
  $("add-turn").addEventListener("click", () => addTurn("user", ""));
  $("tokenize").addEventListener("click", async () => {
    explainState.lastInput = JSON.stringify(inputBody());
    try { await tokenize(); } catch (e) { /* shown in the status */ }
  });
  $("explain-all").addEventListener("click", () => runExplain("all", 1));
  $("explain-one").addEventListener("click", () => {
    if (explainState.selected !== null) runExplain([explainState.selected], 1);
  });
  $("best-one").addEventListener("click", () => {
    if (explainState.selected !== null) runExplain([explainState.selected], parseInt($("best-of").value, 10) || 1);
  });
}

// ---- Browse: one row ------------------------------------------------------------------

function initRow() {
  const btn = $("run-edits");
  if (!btn) return;
  btn.addEventListener("click", async () => {
    const id = $("row").dataset.row;
    $("edits-status").textContent = "queued…";
    btn.disabled = true;
    try {
      const d = await api("POST", `/api/rows/${id}/edits`, {});
      const body = document.querySelector("#edits tbody");
      body.textContent = "";
      for (const e of d.edits) {
        const tr = el("tr");
        for (const v of [e.edit, d.original.text, e.text, fmt(d.original[d.drop_of]), fmt(e[d.drop_of]), fmt(e.drop)]) tr.appendChild(el("td", v));
        tr.children[1].className = "expl"; tr.children[2].className = "expl";
        body.appendChild(tr);
      }
      $("edits").hidden = false;
      $("edits-status").textContent = `score = ${d.drop_of}; drop = original − edited`;
    } catch (e) { $("edits-status").textContent = e.message; }
    btn.disabled = false;
  });
}

// ---- Reconstruct ----------------------------------------------------------------------

function initReconstruct() {
  const last = {};
  let timer = null;
  let seq = 0;
  async function go() {
    const body = { explanation: $("r-explanation").value };
    if ($("against-text").checked) { body.text = $("r-text").value; body.position = parseInt($("r-position").value, 10); }
    else { body.row_id = parseInt($("r-row").value, 10); }
    const mine = ++seq;
    $("r-status").textContent = "reconstructing…";
    try {
      const d = await api("POST", "/api/reconstruct", body);
      if (mine !== seq) return;
      for (const [k, id] of [["cos", "r-cos"], ["fve_nrm", "r-fve"], ["mse_nrm", "r-mse"]]) {
        $(id).textContent = fmt(d[k]);
        const delta = $(id + "-d");
        if (last[k] !== undefined && d[k] !== null && last[k] !== null) {
          const dd = d[k] - last[k];
          const better = k === "mse_nrm" ? dd < 0 : dd > 0;
          delta.textContent = Math.abs(dd) < 5e-4 ? "" : `${dd >= 0 ? "+" : ""}${dd.toFixed(3)}`;
          delta.className = "delta " + (better ? "up" : "down");
        }
        last[k] = d[k];
      }
      $("r-status").textContent = d.target.row_id !== undefined ? `against row ${d.target.row_id}` : `against token ${d.target.position} ${JSON.stringify(d.target.token)}`;
    } catch (e) { if (mine === seq) $("r-status").textContent = e.message; }
  }
  function against() { $("r-text").hidden = !$("against-text").checked; }
  $("against-text").addEventListener("change", against);
  $("against-row").addEventListener("change", against);
  against();
  $("r-go").addEventListener("click", go);
  $("r-explanation").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(go, 500); });
  if ($("r-explanation").value.trim() && ($("recon").dataset.row || $("recon").dataset.text)) go();
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "explain") initExplain();
  if (page === "browse" && $("row")) initRow();
  if (page === "reconstruct") initReconstruct();
  pollQueue();
  setInterval(pollQueue, 2000);
});
