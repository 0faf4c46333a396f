"""Faithfulness audit (`nlakit audit`): does the reconstruction survive meaning-preserving edits?

A private code hidden in the wording (token choice, order, punctuation) would collapse under
edits that keep the meaning; natural language read for its meaning survives them. For each edit
the AR reads the edited explanations and every row gets a paired drop
``fve_original − fve_edited`` (same row, same denominator), summarised with a document-level
bootstrap CI. Edits:

  paraphrase        rewritten by a paraphraser (`rules`, `local` model, or `openai` endpoint)
  shuffle_units     lines (or sentences, for one-line text) in a seeded random order
  delete_quotes     quoted spans ("...", “...”, `...`, '...') removed
  ablate_unit_K     the K-th line/sentence removed (attribution: which unit carries how much)

Each test ends with a verdict sentence that says what the numbers support and no more.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from nlakit.config import hint
from nlakit.errors import NLAError
from nlakit.eval.evaluate import ScoringConfig
from nlakit.eval.scoring import (
    Denominators,
    EvalRows,
    denominators,
    doc_ci,
    row_metrics,
    select_rows,
)
from nlakit.fileio import stable_seed
from nlakit.model.arch import require_chat_template
from nlakit.model.generate import generate_continuations

MAX_ABLATED_UNITS = 5

# ---- units of an explanation ------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def split_units(text: str) -> tuple[list[str], str]:
    """(units, joiner): non-empty lines when the text has several, else sentences."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 2:
        return lines, "\n"
    sents = [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]
    return sents, " "


def shuffle_units(text: str, seed: int = 0) -> str:
    """The text's units in a seeded random order that differs from the original whenever the
    text has >= 2 distinct units (a no-op permutation is replaced by a rotation)."""
    units, joiner = split_units(text)
    if len(units) < 2:
        return text
    rng = np.random.default_rng(stable_seed(seed, "shuffle", text))
    order = rng.permutation(len(units)).tolist()
    if order == list(range(len(units))):
        order = order[1:] + order[:1]
    return joiner.join(units[i] for i in order)


_QUOTES = [re.compile(p) for p in (r'"[^"\n]*"', r"“[^”]*”", r"`[^`\n]*`", r"«[^»]*»",
                                   r"(?<![\w'])'[^'\n]+'(?![\w'])", r"‘[^’]*’")]


def delete_quotes(text: str) -> str:
    """The text with every quoted span (quotes included) removed and spaces tidied."""
    out = text
    for pat in _QUOTES:
        out = pat.sub("", out)
    out = re.sub(r"[ \t]{2,}", " ", out)
    out = re.sub(r" +([,.;:!?])", r"\1", out)
    return "\n".join(ln.strip() for ln in out.splitlines()).strip()


def ablate_unit(text: str, k: int) -> str | None:
    """The text without its k-th unit (0-based); None when it has no such unit or only one."""
    units, joiner = split_units(text)
    if len(units) < 2 or k >= len(units):
        return None
    return joiner.join(u for i, u in enumerate(units) if i != k)


# ---- paraphrasers -------------------------------------------------------------------------

PARAPHRASE_INSTRUCTION = "Rewrite this text with different words, keeping its meaning:"
# one worked example keeps small local models on task (answer = the rewrite, nothing else)
PARAPHRASE_ONE_SHOT = [
    {"role": "user", "content": f"{PARAPHRASE_INSTRUCTION}\n\nThe text ends with \"the cat "
                                "sat on\"; the next word is probably a place."},
    {"role": "assistant", "content": "The passage finishes with \"the cat sat on\", so a "
                                     "location likely comes next."},
]


class Paraphraser:
    """texts -> rewritten texts (None where the paraphraser failed for a row).

    per_unit: paraphrase each line/sentence on its own and re-join them, which keeps the
    structure when a small model would otherwise drop or merge lines."""

    kind = "?"
    per_unit = False

    def paraphrase_texts(self, texts: list[str]) -> list[str | None]:
        if not self.per_unit:
            return self.paraphrase(texts)
        spans, flat = [], []
        for t in texts:
            units, joiner = split_units(t)
            units = units or [t]
            spans.append((len(flat), len(units), joiner))
            flat.extend(units)
        done = self.paraphrase(flat)
        out: list[str | None] = []
        for start, n, joiner in spans:
            part = done[start : start + n]
            out.append(None if any(p is None for p in part) else joiner.join(
                " ".join(p.split()) for p in part))
        return out

    def paraphrase(self, texts: list[str]) -> list[str | None]:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


class RulesParaphraser(Paraphraser):
    """A deterministic, rule-based rewrite (synonym table + a few phrase swaps). Not a real
    paraphraser: it changes surface words only where its small table matches. Used in tests
    and as a cheap first check; a model paraphraser is the real test."""

    kind = "rules"
    SYNONYMS: ClassVar[dict[str, str]] = {
        "the": "this", "a": "one", "is": "appears", "are": "appear", "text": "passage",
        "word": "term", "words": "terms", "next": "following", "token": "piece",
        "tokens": "pieces", "likely": "probably", "model": "network", "about": "concerning",
        "expects": "anticipates", "expect": "anticipate", "predict": "forecast",
        "predicts": "forecasts", "context": "surrounding text", "sentence": "clause",
        "code": "program text", "function": "routine", "last": "final", "ends": "finishes",
        "with": "using", "and": "plus", "after": "following", "before": "prior to",
        "starts": "begins", "start": "begin", "describes": "explains", "about:": "concerning:",
        "name": "identifier", "number": "numeral", "list": "enumeration", "kind": "type",
        "of": "of", "uses": "employs", "use": "employ", "shows": "displays", "this": "the",
    }

    def _word(self, m: re.Match) -> str:
        w = m.group(0)
        rep = self.SYNONYMS.get(w.lower())
        if rep is None:
            return w
        if w[0].isupper():
            rep = rep[0].upper() + rep[1:]
        return rep

    def _rewrite(self, text: str) -> str:
        out, last = [], 0
        for m in sorted((m for pat in _QUOTES for m in pat.finditer(text)),
                        key=lambda m: m.start()):
            if m.start() < last:
                continue
            out.append(re.sub(r"[A-Za-z]+", self._word, text[last:m.start()]))
            out.append(m.group(0))  # quoted spans are literal copies of the context: kept
            last = m.end()
        out.append(re.sub(r"[A-Za-z]+", self._word, text[last:]))
        return "".join(out)

    def paraphrase(self, texts: list[str]) -> list[str | None]:
        return [self._rewrite(t) for t in texts]

    def describe(self) -> str:
        return "rules (fixed synonym table outside quoted spans; surface rewrite only)"


class LocalParaphraser(Paraphraser):
    """An instruct model run locally (any `load_model` spec), chat prompt, batched greedy
    generation with left padding."""

    kind = "local"

    def __init__(self, model: str, *, dtype=None, device=None, batch_size: int = 8,
                 max_new_tokens: int = 160, loaded=None):
        self.model_spec, self.dtype, self.device = model, dtype, device
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self._loaded = loaded

    def _load(self):
        if self._loaded is None:
            from nlakit.model.load import load_model

            self._loaded = load_model(self.model_spec, dtype=self.dtype, device=self.device)
        require_chat_template(self._loaded[1], self.model_spec, "local paraphraser")
        return self._loaded

    def prompt(self, text: str) -> str:
        _, tok = self._load()
        msg = [*PARAPHRASE_ONE_SHOT,
               {"role": "user", "content": f"{PARAPHRASE_INSTRUCTION}\n\n{text}"}]
        return tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)

    def paraphrase(self, texts: list[str]) -> list[str | None]:
        model, tok = self._load()
        out: list[str | None] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            new = generate_continuations(model, tok, [self.prompt(t) for t in chunk],
                                         max_new_tokens=self.max_new_tokens)
            out.extend(s.strip() or None for s in new)
        return out

    def describe(self) -> str:
        return f"local model {self.model_spec} (greedy, max {self.max_new_tokens} new tokens)"


class OpenAIParaphraser(Paraphraser):
    """An OpenAI-compatible chat-completions endpoint, through the labeller's HTTP client
    (retries, backoff, request budget, concurrency)."""

    kind = "openai"

    def __init__(self, base_url: str, api_model: str, **options):
        from nlakit.labels.openai import OpenAILabeller

        class _Client(OpenAILabeller):
            def request(self, row):  # row: the text to paraphrase
                import json

                payload = {"model": self.api_model, "temperature": self.temperature,
                           "max_tokens": self.max_tokens,
                           "messages": [{"role": "user", "content":
                                         f"{PARAPHRASE_INSTRUCTION}\n\n{row}"}]}
                return self._request(json.dumps(payload).encode("utf-8"))

        self.client = _Client(base_url, api_model, **options)

    def paraphrase(self, texts: list[str]) -> list[str | None]:
        from nlakit.labels import LabelFailure

        out: list[str | None] = [None] * len(texts)
        for i, res in self.client.iter_labels(list(texts)):
            if not isinstance(res, LabelFailure):
                out[i] = res.strip() or None
        return out

    def describe(self) -> str:
        return f"openai endpoint {self.client.base_url} model {self.client.api_model}"


# the options each paraphraser takes (per_unit: every kind); another option is an error
PARAPHRASER_OPTIONS = {
    "rules": ("per_unit",),
    "local": ("per_unit", "model", "dtype", "device", "batch_size", "max_new_tokens"),
    "openai": ("per_unit", "base_url", "api_model", "api_key_env", "no_api_key", "concurrency",
               "max_requests", "max_retries", "timeout", "max_new_tokens"),
}


def paraphraser_names() -> list[str]:
    return sorted(PARAPHRASER_OPTIONS)


def make_paraphraser(kind: str, **options) -> Paraphraser:
    """A paraphraser by kind; ``options`` (None values mean default) must apply to that kind."""
    if kind not in PARAPHRASER_OPTIONS:
        raise NLAError(f"unknown paraphraser {kind!r}: use {', '.join(paraphraser_names())}")
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(PARAPHRASER_OPTIONS[kind]))
    if unknown:
        raise NLAError(f"option(s) {', '.join(unknown)} do not apply to the {kind!r} "
                       f"paraphraser; it takes {', '.join(PARAPHRASER_OPTIONS[kind])}")
    per_unit = bool(options.pop("per_unit", False))
    if kind == "rules":
        p: Paraphraser = RulesParaphraser()
    elif kind == "local":
        if "model" not in options:
            raise NLAError("the local paraphraser needs a model (--paraphraser-model, e.g. "
                           "smollm2-135m)")
        p = LocalParaphraser(options.pop("model"), **options)
    else:
        if "base_url" not in options or "api_model" not in options:
            raise NLAError("the openai paraphraser needs --paraphraser-base-url and "
                           "--paraphraser-api-model")
        kw = {k: v for k, v in options.items()
              if k not in ("base_url", "api_model", "no_api_key", "max_new_tokens")}
        if "max_new_tokens" in options:
            kw["max_tokens"] = options["max_new_tokens"]
        if options.get("no_api_key"):
            kw["api_key_env"] = None
        p = OpenAIParaphraser(options["base_url"], options["api_model"], **kw)
    p.per_unit = per_unit
    return p


# ---- the audit ----------------------------------------------------------------------------


EDITS = ("paraphrase", "shuffle_units", "delete_quotes", "ablation")



@dataclass
class AuditConfig(ScoringConfig):
    """The ``audit`` stage: which rows, which edits, and the paraphraser."""

    edits: tuple[str, ...] = field(default=EDITS, metadata=hint(
        "the edits to run (comma-separated on the command line)"))
    paraphraser: str = field(default="rules", metadata=hint(
        "paraphraser of the paraphrase edit: rules, local, openai, or none"))
    paraphraser_options: dict = field(default_factory=dict, metadata=hint(
        "the paraphraser's options (see ParaphraserOptions); another option is an error"))

    def __post_init__(self):
        if isinstance(self.edits, str):
            self.edits = [e.strip() for e in self.edits.split(",") if e.strip()]
        self.edits = tuple(self.edits)
        unknown = sorted(set(self.edits) - set(EDITS))
        if unknown:
            raise NLAError(f"audit: unknown edit(s) {unknown}; edits: {', '.join(EDITS)}")
        self.check_positive("audit")
        if self.paraphraser not in (*PARAPHRASER_OPTIONS, "none"):
            raise NLAError(f"audit: unknown paraphraser {self.paraphraser!r}; use "
                           f"{', '.join(paraphraser_names())} or none")
        if not isinstance(self.paraphraser_options, dict):
            raise NLAError("audit: paraphraser_options must be a mapping")
        if self.paraphraser != "none":
            from nlakit.labels import check_options

            check_options(f"the {self.paraphraser!r} paraphraser", self.paraphraser_options,
                          PARAPHRASER_OPTIONS[self.paraphraser])


@dataclass
class ParaphraserOptions:
    """The options of the paraphrasers (each takes the ones in ``PARAPHRASER_OPTIONS``); on
    the command line ``--paraphraser-NAME``, in a pipeline config ``paraphraser_options``."""

    per_unit: bool | None = field(default=None, metadata=hint(
        "paraphrase each line/sentence separately (keeps structure with small models; off)"))
    model: str | None = field(default=None, metadata=hint("local: model spec"))
    dtype: str | None = field(default=None, metadata=hint(
        "local: float32, bfloat16 ... (the device's)"))
    device: str | None = field(default=None, metadata=hint(
        "local: cpu, cuda, auto (the audit's --device)"))
    batch_size: int | None = field(default=None, metadata=hint("local: texts per batch (8)"))
    max_new_tokens: int | None = field(default=None, metadata=hint(
        "local/openai: cap on generated tokens (160 local, 200 openai)"))
    base_url: str | None = field(default=None, metadata=hint("openai: endpoint base URL"))
    api_model: str | None = field(default=None, metadata=hint("openai: model name"))
    api_key_env: str | None = field(default=None, metadata=hint(
        "openai: environment variable with the key (OPENAI_API_KEY)"))
    no_api_key: bool | None = field(default=None, metadata=hint("openai: send no key"))
    concurrency: int | None = field(default=None, metadata=hint("openai: concurrent requests (8)"))
    max_requests: int | None = field(default=None, metadata=hint("openai: request budget (none)"))
    max_retries: int | None = field(default=None, metadata=hint("openai: retries per request (5)"))
    timeout: float | None = field(default=None, metadata=hint("openai: seconds per request (60)"))


def verdict(name: str, orig: dict, edited: dict, drop: dict, n_changed: int,
            n_rows: int) -> str:
    """One sentence saying what a paired drop means, without claiming more than it shows."""
    o, e = orig["mean"], edited["mean"]
    lo, hi = drop["ci"]
    if n_changed == 0:
        return f"{name}: the edit changed no explanation on these rows, so it tests nothing."
    if o <= 0:
        return (f"{name}: the unedited explanations do not reach positive FVE (mean {o:+.3f}), "
                "so robustness cannot be judged: there is little reconstruction to lose.")
    kept = e / o
    share = f"keeps {kept:.0%} of the FVE (drop {drop['mean']:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}])"
    what = {
        "paraphrase": (("no sign of a private code in the exact wording (for this paraphraser; "
                       "it does not show the words are accurate)"),
                       ("the AR leans on the exact wording: consistent with a surface code, or "
                       "with a paraphraser that loses meaning (read the examples)")),
        "shuffle_units": ("the order of lines/sentences carries little of the information",
                          ("the order of lines/sentences matters to the AR, which meaning "
                          "alone would not require")),
        "delete_quotes": ("the quoted spans are not where the information sits",
                          ("much of the information sits in quoted spans, i.e. in literal "
                          "copies of context text rather than in description")),
    }.get(name, ("the edit removes little information", "the edit removes much information"))
    if lo > 0 and kept < 0.5:
        return f"{name} {share}: {what[1]}."
    if hi < 0:
        return f"{name} {share}: the edited text reconstructs better; {what[0]}."
    if kept >= 0.8 or lo <= 0:
        tail = "" if lo > 0 else " (the drop is not distinguishable from zero)"
        return f"{name} {share}{tail}: {what[0]}."
    return (f"{name} {share}: a moderate, significant loss; part of the information depends "
            "on what this edit changes.")


def _audited_texts(nla, rows: EvalRows, cfg: AuditConfig, explanations: dict[int, str] | None,
                   source: str) -> tuple[list[str], str]:
    """The explanations to edit and where they come from."""
    if explanations is not None:
        missing = [int(r) for r in rows.row_ids if int(r) not in explanations]
        if missing:
            raise NLAError(f"{len(missing)} audited rows (e.g. row {missing[0]}) have no given "
                           "explanation; use the same --split/--max-rows/--seed as the eval")
        return [explanations[int(r)] for r in rows.row_ids], source
    exps = nla.explain(rows.vectors, n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.batch_size)
    return [e.text for e in exps], "generated (greedy)"


class _PairedEdits:
    """Scores edited explanations against the originals, row by row (paired drops)."""

    def __init__(self, nla, rows: EvalRows, den: Denominators, cfg: AuditConfig,
                 texts: list[str]):
        self.nla, self.rows, self.den, self.cfg, self.texts = nla, rows, den, cfg, texts
        self.tests: dict[str, dict] = {}
        self.examples: dict[str, list] = {}
        self.base = self.fve(texts)

    def fve(self, ts: list[str], idx=None) -> np.ndarray:
        v = self.rows.vectors
        target = v if idx is None else v[torch.as_tensor(idx)]
        pred = self.nla.reconstruct(ts, batch_size=self.cfg.batch_size)
        return row_metrics(pred, target, self.den)["fve_nrm"]

    def paired(self, name: str, edited: list[str | None], note: str) -> None:
        """Test `name`: the rows whose edit exists, scored before and after the edit."""
        cfg, base, texts = self.cfg, self.base, self.texts
        idx = np.asarray([i for i, e in enumerate(edited) if e is not None], dtype=np.int64)
        if idx.size == 0:
            self.tests[name] = {"skipped": "no row could be edited", "note": note}
            return
        ts = [edited[i] for i in idx]
        f_edit = self.fve(ts, idx)
        drop = base[idx] - f_edit
        g = self.rows.doc_ids[idx]
        changed = np.asarray([ts[j] != texts[i] for j, i in enumerate(idx)])
        res = {"n_rows": int(idx.size), "n_docs": int(np.unique(g).size),
               "n_changed": int(changed.sum()), "note": note,
               "fve_original": doc_ci(base[idx], g, cfg), "fve_edited": doc_ci(f_edit, g, cfg),
               "drop": doc_ci(drop, g, cfg)}
        if changed.any() and not changed.all():
            res["drop_changed_rows"] = doc_ci(drop[changed], g[changed], cfg)
        res["kept_fraction"] = (res["fve_edited"]["mean"] / res["fve_original"]["mean"]
                                if res["fve_original"]["mean"] > 0 else None)
        res["verdict"] = verdict(name, res["fve_original"], res["fve_edited"], res["drop"],
                                 res["n_changed"], int(idx.size))
        self.tests[name] = res
        order = np.argsort(-drop)
        self.examples[name] = [
            {"row_id": int(self.rows.row_ids[idx[j]]), "original": texts[idx[j]],
             "edited": ts[j], "fve_original": float(base[idx[j]]),
             "fve_edited": float(f_edit[j])}
            for j in list(order[:2]) + list(order[-1:]) if changed[j]]

    def paraphrase(self, paraphraser: Paraphraser | None) -> None:
        if paraphraser is None:
            self.tests["paraphrase"] = {"skipped": "no paraphraser given"}
            return
        para = paraphraser.paraphrase_texts(self.texts)
        failed = sum(p is None for p in para)
        self.paired("paraphrase", para, f"paraphraser: {paraphraser.describe()}"
                    + ("; each line/sentence paraphrased on its own" if paraphraser.per_unit
                       else "")
                    + (f"; {failed} rows failed and are left out" if failed else ""))


def audit(nla, store, config: AuditConfig | None = None, *, paraphraser: Paraphraser | None =
          None, explanations: dict[int, str] | None = None,
          explanations_source: str = "given (from an eval result)") -> dict:
    """Run the edits on the explanations of the chosen rows (generated greedily, or taken from
    `explanations` {row_id: text}, e.g. an eval.json's, described by `explanations_source`) and
    return the JSON-ready result."""
    cfg = config or AuditConfig()
    if store.layer != nla.layer or store.d_model != nla.d_model:
        raise NLAError(f"store layer {store.layer}/d {store.d_model} does not match the NLA "
                       f"(layer {nla.layer}, d {nla.d_model})")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    rows: EvalRows = select_rows(store, cfg.split, cfg.max_rows, cfg.seed)
    den: Denominators = denominators(store, rows)
    t = time.perf_counter()
    texts, source = _audited_texts(nla, rows, cfg, explanations, explanations_source)
    timings["explanations"] = time.perf_counter() - t
    t = time.perf_counter()
    ed = _PairedEdits(nla, rows, den, cfg, texts)
    timings["original"] = time.perf_counter() - t
    edits = {
        "paraphrase": lambda: ed.paraphrase(paraphraser),
        "shuffle_units": lambda: ed.paired(
            "shuffle_units", [shuffle_units(x, cfg.seed) for x in texts],
            "lines (or sentences) in a seeded random order; rows with one unit unchanged"),
        "delete_quotes": lambda: ed.paired(
            "delete_quotes", [delete_quotes(x) for x in texts],
            "quoted spans removed; rows without quotes unchanged"),
    }
    for name, run in edits.items():
        if name in cfg.edits:
            t = time.perf_counter()
            run()
            if name != "paraphrase" or paraphraser is not None:
                timings[name] = time.perf_counter() - t
    ablation = None
    if "ablation" in cfg.edits:
        t = time.perf_counter()
        ablation = _ablation(texts, ed.base, rows.doc_ids, ed.fve, cfg)
        timings["ablation"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return {
        "kind": "nlakit_audit", "split": rows.split, "n_rows": len(rows), "n_docs": rows.n_docs,
        "layer": int(nla.layer), "store": str(store.path),
        "rawvar": den.rawvar, "meannorm": den.meannorm,
        "denominator": {"fve_nrm": f"rawvar = {den.rawvar:.6f} from {den.rawvar_source}"},
        "ci": f"95% percentile bootstrap over documents ({cfg.n_boot} resamples); drop = "
              "fve_original - fve_edited per row",
        "explanations_source": source,
        "config": {"max_rows": cfg.max_rows, "max_new_tokens": cfg.max_new_tokens,
                   "seed": cfg.seed, "edits": list(cfg.edits)},
        "fve_original": doc_ci(ed.base, rows.doc_ids, cfg),
        "tests": ed.tests, "ablation": ablation, "examples": ed.examples,
        "timings_s": {k: round(x, 3) for k, x in timings.items()},
    }


def _ablation(texts, base, groups, fve, cfg) -> dict:
    """Per-unit ablation: drop in fve_nrm when the k-th line/sentence is removed."""
    jobs = []  # (row, k, text)
    n_units = []
    for i, t in enumerate(texts):
        units, _ = split_units(t)
        n_units.append(len(units))
        for k in range(min(len(units), MAX_ABLATED_UNITS)):
            edited = ablate_unit(t, k)
            if edited is not None:
                jobs.append((i, k, edited))
    out: dict = {"n_rows": len(texts),
                 "n_rows_ablatable": int(sum(n >= 2 for n in n_units)),
                 "units_per_row": {"mean": float(np.mean(n_units)) if n_units else 0.0,
                                   "max": int(max(n_units)) if n_units else 0},
                 "by_unit": {}}
    if not jobs:
        out["verdict"] = "ablation: no explanation has two or more lines/sentences to ablate."
        return out
    idx = np.asarray([j[0] for j in jobs])
    f = fve([j[2] for j in jobs], idx)
    drops = base[idx] - f
    ks = np.asarray([j[1] for j in jobs])
    for k in sorted(set(ks.tolist())):
        sel = ks == k
        out["by_unit"][f"unit_{k + 1}"] = {**doc_ci(drops[sel], groups[idx[sel]], cfg),
                                           "n_docs": int(np.unique(groups[idx[sel]]).size)}
    # per row: the largest single-unit drop
    best = {}
    for r, d in zip(idx.tolist(), drops.tolist()):
        best[r] = max(best.get(r, -np.inf), d)
    rows_b = np.asarray(sorted(best))
    out["max_unit_drop"] = doc_ci(np.asarray([best[r] for r in rows_b]), groups[rows_b], cfg)
    parts = [f"unit {k.split('_')[1]}: {s['mean']:+.3f} [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]"
             for k, s in out["by_unit"].items()]
    orig = float(np.mean(base[rows_b]))
    top = max(out["by_unit"].items(), key=lambda kv: kv[1]["mean"])
    if orig <= 0:
        tail = ("the unedited FVE of these rows is not positive, so no unit carries "
                "reconstruction worth attributing")
    else:
        tail = (f"the {top[0].replace('_', ' ')} carries the most (removing it costs "
                f"{top[1]['mean'] / orig:.0%} of these rows' mean FVE {orig:+.3f}); drops are "
                "not additive, so shares need not sum to 100%")
    out["verdict"] = "ablation (drop in fve_nrm when one unit is removed) " + "; ".join(parts) + \
        f": {tail}."
    return out


