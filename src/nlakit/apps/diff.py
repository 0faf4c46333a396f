"""Auditing by model diffing (`nlakit diff`): what did a fine-tune change, in words?

Both models, base and fine-tuned, read the same documents; their block-K activations at the same
token positions are extracted (the ordinary extraction, one pass each, stopped after block K, into
OUT/acts/base and OUT/acts/finetuned) and explained by the *base* model's NLA (greedy). Reported:

  round_trip   per model: the base NLA's AR reconstruction of each row's explanation against
               that model's own activation (fve_nrm, mse_nrm, cos, fve_meannorm), and the paired
               fine-tuned − base difference, all with document-level bootstrap CIs. Denominators
               follow `nlakit eval`: rawvar of each model's own store statistics, meannorm of its
               rows. A drop says the base NLA reads the fine-tune less well (its activations
               left the distribution the NLA was trained on).
  change       per row: act_mse_nrm = ||ĝ_f − ĝ_b||² (direction change, 0..4), act_rel_diff =
               ||g_f − g_b|| / ||g_b||, text_distance = 1 − Jaccard of the two explanations'
               word sets, explanation_mse_nrm = mse_nrm between the AR readings of the two
               explanations (how differently the NLA *means* them).
  top_rows     the rows that changed most by activation (act_mse_nrm) and by explanation
               (text_distance, ties by explanation_mse_nrm).
  words        unigrams/bigrams over-used in the fine-tuned model's explanations relative to the
               base's: log-odds with an informative Dirichlet prior (`nlakit.apps.wordstats`).

Each side's explanations are kept in OUT/explanations/{base,finetuned}.json under a key of the
AV's files, the exact vectors explained and the decoding settings: a rerun (other reporting
settings, or after a crash) reads them instead of generating them again.

Rows are paired by (document id, token position) and the pairing is checked (same prefix text);
everything that can be checked without running a model is checked first (`preflight`).
A fine-tuned model is a model spec (`nlakit.model.load.load_model`) or a directory of peft LoRA
adapters (adapter_config.json) applied to the base and merged (`nlakit.apps.finetuned`).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from nlakit import __version__, metrics
from nlakit.apps.finetuned import (
    ModelFacts,
    check_models,
    load_finetuned,
    model_facts,
    record_adapter_base,
)
from nlakit.apps.wordstats import (
    log_odds_ranking,  # re-exported: the ranking diff.json's words come from
)

# re-exported: the auditing game loads its model organism with these
from nlakit.config import hint, required
from nlakit.errors import NLAError
from nlakit.eval.scoring import doc_ci
from nlakit.fileio import stable_hash, write_json, write_text_atomic
from nlakit.model.load import load_model, resolve_model, weights_hash
from nlakit.report.tables import format_diff_markdown

log = logging.getLogger(__name__)

DIFF_SPLIT = "diff"  # the stores' single split: every document is diffed
PREFIX_CHARS_KEPT = 300
METRICS = ("fve_nrm", "mse_nrm", "cos", "fve_meannorm")
CHANGE = ("act_mse_nrm", "act_rel_diff", "text_distance", "explanation_mse_nrm")


@dataclass
class DiffConfig:
    """`nlakit diff`: the models, the NLA, the corpus and how much of it to explain."""

    nla: str = required("the base model's NLA: a directory (av/, ar/) or a shipped name")
    base: str = required("the base model (the NLA's target): alias, .gguf, HF dir or id")
    finetuned: str = required("the fine-tuned model: alias, .gguf, HF dir or id, or a peft "
                              "LoRA adapter directory (applied to --base and merged)")
    corpus: str = required("builtin[:docs|chats|writing|code|wide], a text file/folder, "
                           ".jsonl, .parquet, or a saved datasets folder")
    out: str = required("output directory (diff.json, diff.md, rows.jsonl, acts/, "
                        "explanations/)")
    layer: int | None = field(default=None, metadata=hint(
        "block K (None: the NLA's layer; another value is an error)"))
    text_field: str = field(default="text", metadata=hint("text field/column of jsonl/parquet"))
    blocks: bool = field(default=False, metadata=hint(
        "text files: one document per blank-line separated block"))
    max_docs: int | None = field(default=100, metadata=hint("read at most this many documents"))
    max_tokens_per_doc: int = field(default=512, metadata=hint(
        "truncate documents to this many tokens"))
    positions_per_doc: int = field(default=5, metadata=hint(
        "token positions sampled per document (the same for both models)"))
    min_position: int = field(default=50, metadata=hint(
        "sample only tokens at index >= this (early positions have outlier norms)"))
    seed: int = field(default=0, metadata=hint("seed of the positions and the bootstrap"))
    max_new_tokens: int = field(default=150, metadata=hint("explanation length cap in tokens"))
    batch_size: int = field(default=16, metadata=hint(
        "rows per generation/AR batch (and documents per extraction forward)"))
    n_boot: int = field(default=1000, metadata=hint("bootstrap resamples"))
    top_rows: int = field(default=20, metadata=hint("rows listed per 'changed most' ranking"))
    top_terms: int = field(default=30, metadata=hint("terms listed per side of the word ranking"))
    ngrams: tuple[int, ...] | str = field(default=(1, 2), metadata=hint(
        "n-gram orders of the word ranking (comma-separated)"))
    min_count: int = field(default=3, metadata=hint(
        "rank only terms seen at least this often in both models' explanations together"))
    binary_counts: bool = field(default=True, metadata=hint(
        "count a term once per explanation (robust to an explanation that repeats itself)"))
    z_threshold: float = field(default=1.96, metadata=hint(
        "|z| above which a term is listed as significant (per term, uncorrected)"))
    device: str | None = field(default=None, metadata=hint("cpu (default), cuda, cuda:N, auto"))
    dtype: str | None = field(default=None, metadata=hint(
        "float32 (CPU default), bfloat16, float16 or auto"))
    overwrite: bool = field(default=False, metadata=hint(
        "replace activation stores in OUT/acts made with another configuration"))
    progress: bool = field(default=True, metadata=hint("show progress bars"))

    def __post_init__(self):
        for name in ("nla", "base", "finetuned", "corpus", "out"):
            if not str(getattr(self, name) or "").strip():
                raise NLAError(f"diff: {name} is required")
        for name in ("max_new_tokens", "batch_size", "n_boot", "top_rows", "top_terms",
                     "min_count"):
            if getattr(self, name) < 1:
                raise NLAError(f"diff: {name} must be >= 1, got {getattr(self, name)}")
        if not self.z_threshold > 0:
            raise NLAError(f"diff: z_threshold must be positive, got {self.z_threshold}")
        self.ngrams = _orders(self.ngrams)
        self.extract_config()  # validates the extraction fields now, not after loading models

    def extract_config(self):
        """The `ExtractConfig` both extractions use (one split: every document is diffed)."""
        from nlakit.extract.extraction import ExtractConfig

        return ExtractConfig(corpus=self.corpus, text_field=self.text_field, blocks=self.blocks,
                             max_docs=self.max_docs, max_tokens_per_doc=self.max_tokens_per_doc,
                             positions_per_doc=self.positions_per_doc,
                             min_position=self.min_position, seed=self.seed,
                             splits={DIFF_SPLIT: 1.0}, batch_size=self.batch_size)


def _orders(value) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [x for x in value.split(",") if x.strip()]
    try:
        orders = tuple(int(n) for n in value)
    except (TypeError, ValueError):
        raise NLAError(f"diff: ngrams must be comma-separated orders like 1,2, got {value!r}") \
            from None
    if not orders or min(orders) < 1:
        raise NLAError(f"diff: ngrams must be positive orders like 1,2, got {orders}")
    return orders


# ---- checks before any heavy work ---------------------------------------------------------------


def nla_facts(nla_spec: str) -> dict:
    """The NLA's layer, d_model and target provenance from its nla_meta.yaml files (no
    weights loaded)."""
    from nlakit.nla.checkpoint import read_meta
    from nlakit.nla.pretrained import resolve

    root = resolve(nla_spec) or Path(nla_spec)
    if not (root / "av").is_dir() or not (root / "ar").is_dir():
        raise NLAError(f"NLA {nla_spec!r} not found: expected a directory holding av/ and ar/ "
                       "or the name of a shipped NLA (`nlakit shipped`)")
    av, ar = read_meta(root / "av", "av"), read_meta(root / "ar", "ar")
    layer = av.get("extraction", {}).get("layer", ar.get("extraction", {}).get("layer"))
    if layer is None:
        raise NLAError(f"{root}: nla_meta.yaml records no layer; cannot diff at an unknown layer")
    return {"path": str(root), "layer": int(layer), "d_model": int(av["d_model"]),
            "target": dict(av.get("nlakit", {}).get("target_model", {}))}


def check_nla_target(nla: dict, base_spec: str, base: ModelFacts) -> None:
    """NLAError unless the NLA was trained on the base: its recorded target weights hash must
    match --base's (compared when both are content hashes; otherwise by spec, a warning)."""
    if nla["d_model"] != base.d_model:
        raise NLAError(f"the NLA reads d_model {nla['d_model']} but the base {base_spec!r} has "
                       f"{base.d_model}: pass the NLA's target model as --base")
    want, spec = nla["target"].get("weights_hash"), nla["target"].get("spec")
    have = weights_hash(resolve_model(base_spec))
    if want and want.startswith("sha256:") and have.startswith("sha256:"):
        if want != have:
            raise NLAError(f"the NLA was trained on target {spec!r} with weights {want}, but "
                           f"--base {base_spec!r} has {have}: pass the NLA's target as --base")
        return
    if want and want == have:
        return
    log.warning("cannot verify that the NLA (target %r, %s) was trained on --base %r (%s)",
                spec, want, base_spec, have)


def _layer(config: DiffConfig, nla: dict) -> int:
    if config.layer is not None and config.layer != nla["layer"]:
        raise NLAError(f"the NLA was trained on layer {nla['layer']}, not {config.layer}: an "
                       "NLA reads one layer only. Drop --layer or pass an NLA of that layer")
    return nla["layer"]


@dataclass
class Plan:
    """Everything `preflight` checked: what the heavy work runs on."""

    base: ModelFacts
    finetuned: ModelFacts
    nla: dict
    layer: int
    corpus: object  # nlakit.corpus.documents.Corpus


def preflight(config: DiffConfig) -> Plan:
    """Every check that needs no forward pass: the NLA, both models, the corpus."""
    from nlakit.corpus.load import load_corpus

    nla = nla_facts(config.nla)
    layer = _layer(config, nla)
    base = model_facts(config.base)
    if base.kind == "lora":
        raise NLAError(f"--base {config.base!r} is an adapter directory; pass the base model "
                       "itself (the adapters go in --finetuned)")
    finetuned = model_facts(config.finetuned, config.base)
    check_models(base, finetuned, layer)
    check_nla_target(nla, config.base, base)
    corpus = load_corpus(config.corpus, tokenizer=base.tokenizer, text_field=config.text_field,
                         blocks=config.blocks, max_docs=config.max_docs)
    return Plan(base, finetuned, nla, layer, corpus)


# ---- pairing the two extractions ------------------------------------------------------------


def pair_index(keys_a: list, keys_b: list) -> np.ndarray:
    """idx with keys_b[idx[i]] == keys_a[i]; NLAError unless both hold the same unique keys."""
    where: dict = {}
    for j, k in enumerate(keys_b):
        if k in where:
            raise NLAError(f"row key {k} appears twice in one extraction")
        where[k] = j
    missing = [k for k in keys_a if k not in where]
    extra = len(where) - (len(keys_a) - len(missing))
    if missing or extra or len(set(keys_a)) != len(keys_a):
        raise NLAError(f"the two extractions hold different rows ({len(missing)} without a "
                       f"partner, e.g. {missing[:3]}; {extra} extra): they must read the same "
                       "documents at the same positions")
    return np.asarray([where[k] for k in keys_a], dtype=np.int64)


def _keys(rows) -> list[tuple[str, int]]:
    return [(str(d), int(p)) for d, p in zip(rows.doc_ids, rows.positions)]


def align_rows(base, other):
    """`other`'s rows (an `evaluate.EvalRows`) reordered to pair with `base`'s row by row, by
    (document id, position); NLAError when the rows or their prefix texts differ."""
    from nlakit.eval.scoring import EvalRows

    idx = pair_index(_keys(base), _keys(other))
    aligned = EvalRows(split=other.split, row_ids=other.row_ids[idx],
                       doc_ids=other.doc_ids[idx], positions=other.positions[idx],
                       prefixes=[other.prefixes[i] for i in idx],
                       vectors=other.vectors[torch.as_tensor(idx)])
    if _keys(aligned) != _keys(base):  # the pairing itself, checked
        raise NLAError("internal error: rows paired out of order")
    bad = [k for k, a, b in zip(_keys(base), base.prefixes, aligned.prefixes) if a != b]
    if bad:
        raise NLAError(f"{len(bad)} paired rows have different prefix texts (e.g. {bad[0]}): the "
                       "two models tokenize the documents differently")
    return aligned


# ---- the heavy work -----------------------------------------------------------------------------


def _extract_side(side: str, plan: Plan, config: DiffConfig):
    from nlakit.extract.extraction import extract

    if side == "base":
        model_tok = load_model(config.base, dtype=config.dtype, device=config.device)
    else:
        model_tok = load_finetuned(config.finetuned, config.base, dtype=config.dtype,
                                   device=config.device)
    store = extract(model_tok, plan.corpus, Path(config.out) / "acts" / side,
                    config.extract_config(), layer=plan.layer, overwrite=config.overwrite,
                    progress=config.progress)
    source = dict(model_tok[0].nlakit_source)
    del model_tok  # one model in memory at a time
    gc.collect()
    return store, source


def _explain(nla, rows, config: DiffConfig):
    """(explanations, AR readings [n, d]) of the rows' vectors, greedy."""
    exps = nla.explain(rows.vectors, n=1, temperature=0.0, max_new_tokens=config.max_new_tokens,
                       batch_size=config.batch_size)
    return exps, nla.reconstruct([e.text for e in exps], batch_size=config.batch_size)


def explanation_key(av: str, rows, config: DiffConfig) -> str:
    """What a side's greedy explanations depend on: the AV (its files' digest), the vectors
    (bytes), their row ids, the cap, the device and the dtype."""
    import hashlib

    vectors = np.ascontiguousarray(rows.vectors.numpy())
    return stable_hash(av, hashlib.sha256(vectors.tobytes()).hexdigest(), vectors.shape,
                       [int(i) for i in rows.row_ids], config.max_new_tokens, config.device,
                       config.dtype)


def _cached_explanations(path: Path, key: str) -> list | None:
    """The explanations stored at `path` under `key`, else None (missing, stale or unreadable:
    they are generated again)."""
    from nlakit.nla.prompt import Explanation

    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            log.info("%s was made for other vectors or settings: explaining again", path)
            return None
        return [Explanation(**e) for e in data["explanations"]]
    except (ValueError, TypeError, KeyError) as err:
        log.warning("%s is unreadable (%s): explaining again", path, err)
        return None


def _store_explanations(path: Path, key: str, exps: list) -> None:
    write_json(path, {"key": key, "explanations": [
        {"text": e.text, "complete": e.complete, "raw": e.raw, "n_tokens": e.n_tokens,
         "hit_cap": e.hit_cap} for e in exps]})


def _change(rows_b, rows_f, exps_b, exps_f, pred_b, pred_f) -> dict:
    """Per-row float64 arrays of how the two models' rows and explanations differ."""
    from nlakit.apps.wordstats import word_distance

    gb, gf = rows_b.vectors.double(), rows_f.vectors.double()
    return {
        "act_mse_nrm": metrics.mse_nrm(gf, gb).numpy(),
        "act_rel_diff": ((gf - gb).norm(dim=-1) / gb.norm(dim=-1)).numpy(),
        "text_distance": np.asarray([word_distance(a.text, b.text)
                                     for a, b in zip(exps_b, exps_f)], dtype=np.float64),
        "explanation_mse_nrm": metrics.mse_nrm(pred_f, pred_b).double().numpy(),
    }


def _round_trip(per_row: dict, groups, config: DiffConfig) -> dict:
    out = {side: {k: doc_ci(per_row[side][k], groups, config) for k in METRICS}
           for side in ("base", "finetuned")}
    out["finetuned_minus_base"] = {
        k: doc_ci(per_row["finetuned"][k] - per_row["base"][k], groups, config)
        for k in ("fve_nrm", "cos")}
    return out


def _words(exps_b, exps_f, config: DiffConfig) -> dict:
    ranking = log_odds_ranking([e.text for e in exps_f], [e.text for e in exps_b],
                               ngrams=config.ngrams, min_count=config.min_count,
                               binary=config.binary_counts)
    up = [r for r in ranking if r["z"] > 0][: config.top_terms]
    down = [r for r in reversed(ranking) if r["z"] < 0][: config.top_terms]
    return {
        "method": "log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn "
                  "2008), prior = both models' explanations pooled; z > 0: more in the "
                  "fine-tuned model's explanations (count_a), z < 0: more in the base's (count_b)",
        "counts": "explanations containing the term" if config.binary_counts else "occurrences",
        "ngrams": list(config.ngrams), "min_count": config.min_count,
        "z_threshold": config.z_threshold, "n_terms": len(ranking),
        "n_significant_finetuned": sum(r["z"] > config.z_threshold for r in ranking),
        "n_significant_base": sum(r["z"] < -config.z_threshold for r in ranking),
        "more_in_finetuned": up, "more_in_base": down,
    }


def _row_records(rows, exps_b, exps_f, per_row: dict, change: dict) -> list[dict]:
    return [
        {"doc_id": str(rows.doc_ids[i]), "position": int(rows.positions[i]),
         "prefix_tail": rows.prefixes[i][-PREFIX_CHARS_KEPT:],
         "explanation_base": exps_b[i].text, "explanation_finetuned": exps_f[i].text,
         "complete_base": bool(exps_b[i].complete),
         "complete_finetuned": bool(exps_f[i].complete),
         **{f"{k}_{side}": float(per_row[side][k][i]) for side in ("base", "finetuned")
            for k in ("fve_nrm", "cos")},
         **{k: float(change[k][i]) for k in CHANGE}}
        for i in range(len(rows))
    ]


def _top_rows(records: list[dict], change: dict, n: int) -> dict:
    by_act = np.argsort(-change["act_mse_nrm"], kind="stable")[:n]
    by_text = np.lexsort((-change["explanation_mse_nrm"], -change["text_distance"]))[:n]
    return {"by_activation": [records[i] for i in by_act],
            "by_text": [records[i] for i in by_text]}


@dataclass
class _Side:
    """One model's half of the diff, filled step by step."""

    store: object  # ActivationStore
    source: dict  # the model's nlakit_source
    rows: object  # evaluate.EvalRows, paired row by row with the other side's
    den: object  # evaluate.Denominators
    exps: list | None = None
    pred: torch.Tensor | None = None  # [n, d] the AR's readings of the explanations
    per_row: dict | None = None


def _extract_both(plan: Plan, config: DiffConfig, timings: dict) -> dict[str, _Side]:
    from nlakit.eval.scoring import denominators, select_rows

    sides = {}
    for name in ("base", "finetuned"):
        t = time.perf_counter()
        store, source = _extract_side(name, plan, config)
        rows = select_rows(store, "all")
        sides[name] = _Side(store, source, rows, denominators(store, rows))
        timings[f"extract_{name}"] = time.perf_counter() - t
    if sides["base"].source["weights_hash"] == sides["finetuned"].source["weights_hash"]:
        log.warning("the fine-tuned model has the same weights as the base: expect no change")
    sides["finetuned"].rows = align_rows(sides["base"].rows, sides["finetuned"].rows)
    return sides


def _explain_both(sides: dict[str, _Side], config: DiffConfig, timings: dict) -> None:
    from nlakit.eval.scoring import row_metrics
    from nlakit.nla.checkpoint import av_digest
    from nlakit.nla.facade import NLA
    from nlakit.nla.pretrained import resolve

    t = time.perf_counter()
    nla = NLA.load(config.nla, device=config.device, dtype=config.dtype)
    av = av_digest((resolve(config.nla) or Path(config.nla)) / "av")
    for name, side in sides.items():
        path = Path(config.out) / "explanations" / f"{name}.json"
        key = explanation_key(av, side.rows, config)
        side.exps = _cached_explanations(path, key)
        if side.exps is None:
            side.exps, side.pred = _explain(nla, side.rows, config)
            _store_explanations(path, key, side.exps)
        else:
            log.info("%s: %d explanations read from %s", name, len(side.exps), path)
            side.pred = nla.reconstruct([e.text for e in side.exps], batch_size=config.batch_size)
        side.per_row = row_metrics(side.pred, side.rows.vectors, side.den)
    timings["explain"] = time.perf_counter() - t


def _assemble(plan: Plan, sides: dict[str, _Side], config: DiffConfig):
    """(diff.json's data, rows.jsonl's records)."""
    b, f = sides["base"], sides["finetuned"]
    per_row = {name: s.per_row for name, s in sides.items()}
    change = _change(b.rows, f.rows, b.exps, f.exps, b.pred, f.pred)
    records = _row_records(b.rows, b.exps, f.exps, per_row, change)
    groups = b.rows.doc_ids
    data = {
        "kind": "nlakit_diff", "nlakit_version": __version__,
        "models": {name: s.source for name, s in sides.items()}, "nla": plan.nla,
        "layer": plan.layer, "n_rows": len(b.rows), "n_docs": b.rows.n_docs,
        "corpus": plan.corpus.description,
        "stores": {name: str(s.store.path) for name, s in sides.items()},
        "denominators": {name: {"rawvar": s.den.rawvar, "rawvar_source": s.den.rawvar_source,
                                "meannorm": s.den.meannorm,
                                "meannorm_source": s.den.meannorm_source}
                         for name, s in sides.items()},
        "ci": f"95% percentile bootstrap over documents ({config.n_boot} resamples)",
        "round_trip": _round_trip(per_row, groups, config),
        "change": {**{k: doc_ci(change[k], groups, config) for k in CHANGE},
                   "explanations_changed": float(np.mean(
                       [x.text != y.text for x, y in zip(b.exps, f.exps)]))},
        "words": _words(b.exps, f.exps, config),
        "top_rows": _top_rows(records, change, config.top_rows),
        "config": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in asdict(config).items()},
    }
    return data, records


def run(config: DiffConfig) -> dict:
    """Diff the base and fine-tuned models through the base's NLA (module doc); writes
    OUT/diff.json, OUT/diff.md and OUT/rows.jsonl (atomically) and returns diff.json's data."""
    t0, timings = time.perf_counter(), {}
    plan = preflight(config)  # every cheap check before the first forward
    sides = _extract_both(plan, config, timings)
    _explain_both(sides, config, timings)
    data, records = _assemble(plan, sides, config)
    timings["total"] = time.perf_counter() - t0
    data["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    write_outputs(data, records, Path(config.out))
    return data


# ---- outputs -------------------------------------------------------------------------------------


def write_outputs(data: dict, records: list[dict], out: Path) -> None:
    """diff.json, diff.md and rows.jsonl, each written atomically."""
    write_json(out / "diff.json", data)
    write_text_atomic(out / "rows.jsonl", "".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_text_atomic(out / "diff.md", format_diff_markdown(data))










__all__ = ["DiffConfig", "ModelFacts", "Plan", "align_rows", "check_models",
           "load_finetuned", "log_odds_ranking", "model_facts", "nla_facts",
           "pair_index", "preflight", "record_adapter_base", "run"]
