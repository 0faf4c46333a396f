"""Held-out evaluation of an NLA against null baselines and controls (`nlakit eval`).

Every method produces one prediction per evaluated row; each is scored against the row's true
activation with the same per-row metrics, and summarised as a mean with a *document-level*
bootstrap 95% CI (rows of a document are correlated). Methods:

  nla              the AV's greedy explanation, read by the AR
  nla_best_of_N    of the greedy explanation and N-1 samples (temperature 1), the one the AR
                   reconstructs best against the true vector (which the AV is given anyway)
  quote_rerank_N   the same rerank given to the quotes: of N quote lengths up to the longest
                   quote_N, the one the AR reconstructs best (the fair baseline for best-of-N)
  mean_direction   the constant μ̂ = E ĝ / ||E ĝ|| over the *evaluated rows themselves*
                   (so fve_meannorm = 0 exactly, fve_nrm = 1 − meannorm/rawvar): a pipeline check.
                   It is fitted in-sample: on a --max-rows subset it can beat the split's rawvar
  mean_direction_train  the mean direction of the training splits: the out-of-sample constant
  wrong_document   row i scored against the NLA explanation of a row of *another document*
  quote_N          the AR fed the literal last N tokens of the row's context
  quote_N_fit      an AR trained on quotes of *training* rows with the NLA's AR budget, fed the
                   quotes of the evaluated rows: the fair quote baseline (`nlakit.eval.baselines`)
  reread_N         the frozen target re-reading the raw last N tokens (identity head, no
                   training): how local the layer is, a reference point for every table
  label            the AR fed the warm-start label (written from the text alone), where one exists:
                   the AR's ceiling for that label format; label - nla is what the verbalizer loses
  control          explanations from a control AV (trained on shuffled activations), same AR

Spliced metrics (``spliced``, on by default; `nlakit.eval.splice`): every method's prediction,
rescaled to the true vector's norm, replaces the block-K output at the row's position; the
target's next-token distribution there is compared with the unmodified one: ``kl`` (nats),
``delta_ce`` and ``ce_recovered`` (1 = as good as the true activation, 0 = no better than the
mean-activation ablation), with document-level CIs, in each method's summary and per row.
``spliced.reference`` holds the true vector's kl (the float noise floor) and the ablation's.

Claim checks (``claims`` in the JSON, ``claims`` in each row): every checkable field of the
explanation format checked against the row's context and the target's real next-token
distribution there (`nlakit.nla.claims`: the current token, the tokens before it, the kind of text,
the stated predictions against the real top 5 and probabilities, the ending's words), with
document-level CIs over the rows that make the claim, and the count of rows whose field was
there but unreadable.

Denominators (stated in the output): fve_nrm = 1 − mse_nrm / rawvar with rawvar of the store's
statistics for the evaluated split ("all" for all splits); fve_meannorm = 1 − mse_nrm / meannorm
with meannorm = 2(1 − ||E ĝ||) of the evaluated rows (the mse_nrm of the mean_direction method).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from nlakit import metrics
from nlakit.config import hint, token_counts
from nlakit.errors import NLAError
from nlakit.eval.scoring import (
    Denominators,
    EvalRows,
    bootstrap_summary,
    denominators,
    row_metrics,
    select_rows,
)
from nlakit.extract.store import AR_SFT, HELDOUT, TRAINING_SPLITS, load_target
from nlakit.fileio import stable_seed, write_json
from nlakit.nla.hedge import check_hedge

log = logging.getLogger(__name__)

DEFAULT_QUOTE_TOKENS = (8, 32)
DEFAULT_REREAD_TOKENS = (8, 32)
PREFIX_CHARS_KEPT = 400  # characters of the source text kept per row for reports


# ---- baselines ---------------------------------------------------------------------------


def mean_direction_prediction(vectors: torch.Tensor) -> torch.Tensor:
    """The unit mean direction μ̂ = E ĝ / ||E ĝ|| of `vectors`, repeated for each row. [n, d]"""
    m = metrics.mean_unit_direction(vectors)
    if float(m.norm()) == 0:
        raise NLAError("the evaluated vectors have no mean direction (E g_hat = 0)")
    return (m / m.norm()).expand(vectors.shape[0], -1).clone()


def training_mean_direction(store, split: str, training=TRAINING_SPLITS):
    """(E ĝ over the training splits other than `split` [d], their names), or None when the
    store has none (or `split` is "all", whose rows include them)."""
    if split == "all":
        return None
    names = [s for s in training if s != split and s in store.meta.get("stats", {})
             and store.stats(s).get("n", 0) > 0]
    if not names:
        return None
    total = sum(store.stats(s)["n"] for s in names)
    mu = sum(store.mean_unit_direction(s).double() * store.stats(s)["n"] for s in names) / total
    return mu.float(), names


def wrong_document_index(doc_ids, seed: int = 0) -> np.ndarray:
    """idx[i]: a row of a *different* document whose explanation row i is scored with.

    Documents are put in a seeded random cycle; every row of document k borrows, in order and
    wrapping around, the rows of the next document in the cycle. Needs >= 2 documents."""
    doc_ids = np.asarray(doc_ids, dtype=object)
    docs = sorted(set(doc_ids.tolist()), key=lambda d: stable_seed(seed, "wrong-doc", d))
    if len(docs) < 2:
        raise NLAError("the wrong-document baseline needs rows from at least 2 documents")
    rows_of = {d: np.flatnonzero(doc_ids == d) for d in docs}
    idx = np.empty(doc_ids.size, dtype=np.int64)
    for k, d in enumerate(docs):
        donor = rows_of[docs[(k + 1) % len(docs)]]
        mine = rows_of[d]
        idx[mine] = donor[np.arange(mine.size) % donor.size]
    return idx


def quote_text(prefix: str, tokenizer, n: int) -> tuple[str, int]:
    """The literal last `n` tokens of `prefix` under `tokenizer`, decoded, and how many tokens
    that is (fewer only when the whole prefix is shorter)."""
    if n < 1:
        raise NLAError(f"quote length must be >= 1 token, got {n}")
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    tail = ids[-n:]
    return tokenizer.decode(tail, skip_special_tokens=False), len(tail)


def rerank_quote_lengths(n: int, longest: int) -> list[int]:
    """n quote lengths spread evenly up to `longest` tokens (distinct, >= 1)."""
    return sorted({max(1, round(longest * (i + 1) / n)) for i in range(n)})


def best_quote(nla, prefixes: list[str], vectors: torch.Tensor, lengths: list[int],
               batch_size: int) -> torch.Tensor:
    """For each row, the AR's reading of whichever of its quotes of `lengths` tokens it
    reconstructs best: the same true-vector rerank best-of-N gets, given to the quotes."""
    tok = nla.ar.tokenizer
    texts = [quote_text(p, tok, k)[0] for p in prefixes for k in lengths]
    pred = nla.reconstruct(texts, batch_size=batch_size)
    return pred[metrics.best_candidates(pred, vectors, len(lengths))]


# ---- the evaluation ----------------------------------------------------------------------


class ReconstructorOnly:
    """An AR without an AV: enough for the baselines (`nlakit eval --baselines-only`), e.g. to
    score quote/label baselines of an AR before its AV exists."""

    av = None

    def __init__(self, ar):
        self.ar = ar

    @property
    def layer(self) -> int:
        return self.ar.layer

    @property
    def d_model(self) -> int:
        return self.ar.d_model

    def reconstruct(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        return self.ar.reconstruct(texts, batch_size=batch_size)

    @classmethod
    def load(cls, ar_dir: str | Path, device: str | None = None,
             dtype: str | None = None) -> ReconstructorOnly:
        from nlakit.model.load import resolve_device, resolve_dtype
        from nlakit.nla.facade import load_ar

        dev = resolve_device(device)
        ar, _ = load_ar(Path(ar_dir), resolve_dtype(dtype, dev), dev)
        return cls(ar)



@dataclass
class ScoringConfig:
    """What the eval and the audit share: which rows, the explanation cap, the bootstrap."""

    split: str = field(default=HELDOUT, metadata=hint("a split name, or all"))
    max_rows: int | None = field(default=None, metadata=hint(
        "score about this many rows, choosing whole documents (seeded)"))
    max_new_tokens: int = field(default=150, metadata=hint("explanation length cap in tokens"))
    batch_size: int = field(default=16, metadata=hint("rows per generation/AR batch"))
    seed: int = field(default=0, metadata=hint("seed of the row choice, sampling and bootstrap"))
    n_boot: int = field(default=1000, metadata=hint("bootstrap resamples"))

    def check_positive(self, stage: str, *names: str) -> None:
        for name in ("max_new_tokens", "batch_size", "n_boot", *names):
            if getattr(self, name) < 1:
                raise NLAError(f"{stage}: {name} must be >= 1, got {getattr(self, name)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise NLAError(f"{stage}: max_rows must be >= 1, got {self.max_rows}")


@dataclass
class EvalConfig(ScoringConfig):
    """The ``eval`` stage: which rows, and how the NLA and its baselines are scored."""

    quote_tokens: tuple[int, ...] = field(default=DEFAULT_QUOTE_TOKENS, metadata=hint(
        "quote baseline lengths in tokens (comma-separated on the command line)"))
    best_of: int = field(default=1, metadata=hint(
        "also score best-of-N sampled explanations reranked by the AR"))
    labels: bool = field(default=True, metadata=hint(
        "score the warm-start labels as a baseline when a label set is given"))
    reread_tokens: tuple[int, ...] = field(default=DEFAULT_REREAD_TOKENS, metadata=hint(
        "reread_N reference points: the frozen target re-reading the last N tokens"))
    quote_fit_tokens: tuple[int, ...] = field(default=(), metadata=hint(
        "quote_N_fit baselines: an AR trained on quotes of training rows (costs an AR training "
        "each)"))
    quote_fit_steps: int | None = field(default=None, metadata=hint(
        "quote_N_fit training steps (None: the NLA's AR's own recorded budget, else 150)"))
    hedge: float | None = field(default=None, metadata=hint(
        "leave out the claims the AV wrote with less confidence than this (nlakit.nla.hedge; "
        "None: the NLA's own decoding.hedge, 0 keeps every claim)"))
    spliced: bool = field(default=True, metadata=hint(
        "splice every method's prediction into the target and score kl / ce_recovered of the "
        "next-token distribution (one extra forward of the target per document)"))

    def __post_init__(self):
        for name in ("quote_tokens", "reread_tokens", "quote_fit_tokens"):
            setattr(self, name, token_counts(name, getattr(self, name)))
        self.check_positive("eval", "best_of")
        if self.hedge is not None:
            check_hedge(self.hedge, "eval.hedge")
        if self.quote_fit_steps is not None and self.quote_fit_steps < 1:
            raise NLAError(f"eval: quote_fit_steps must be >= 1, got {self.quote_fit_steps}")


@dataclass
class EvalResult:
    data: dict  # the JSON document


def _labels_for(labels, store, rows: EvalRows) -> tuple[np.ndarray, list[str]] | None:
    """(indices into rows, label texts) of the evaluated rows that have a warm-start label."""
    from nlakit.labels import LabelSet

    ls = labels if isinstance(labels, LabelSet) else LabelSet(labels)
    ls.check_store(store)
    splits = ls.splits if rows.split == "all" else [rows.split]
    if not any(s in ls.splits for s in splits):
        return None
    table = ls.table(None)
    by_row = dict(zip(table.column("row_id").to_pylist(), table.column("label").to_pylist()))
    idx = [i for i, r in enumerate(rows.row_ids.tolist()) if r in by_row]
    if not idx:
        return None
    return np.asarray(idx), [by_row[int(rows.row_ids[i])] for i in idx]


class _Scores:
    """The scored methods of one evaluation: per-method CI summaries, per-row metrics, notes
    of what was skipped and timings."""

    def __init__(self, rows: EvalRows, den: Denominators, cfg: EvalConfig):
        self.rows, self.den, self.cfg = rows, den, cfg
        self.methods: dict[str, dict] = {}
        self.per_row: dict[str, dict] = {}
        self.notes: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.preds: dict[str, torch.Tensor] = {}  # [n, d] per method, NaN rows where it has none
        self.best_of_texts: list[str] | None = None  # the chosen best-of-N explanation per row
        self.claim_rows: dict[str, np.ndarray] = {}  # verdict -> per-row value (NaN: no claim)

    def record(self, name: str, pred: torch.Tensor, idx: np.ndarray | None = None,
               note: str = "") -> None:
        """Score predictions [m, d] of the rows `idx` (None: all rows) as method `name`."""
        v, groups = self.rows.vectors, self.rows.doc_ids
        target = v if idx is None else v[torch.as_tensor(idx)]
        g = groups if idx is None else groups[idx]
        pr = row_metrics(pred, target, self.den)
        summary = bootstrap_summary(pr, g, n_boot=self.cfg.n_boot, seed=self.cfg.seed)
        summary["n_rows"] = int(target.shape[0])
        summary["n_docs"] = int(np.unique(g).size)
        if note:
            summary["note"] = note
        self.methods[name] = summary
        full = {k: np.full(len(self.rows), np.nan) for k in pr}
        for k, a in pr.items():
            if idx is None:
                full[k] = a
            else:
                full[k][idx] = a
        self.per_row[name] = full
        if idx is None:
            self.preds[name] = pred.detach().float().cpu()
        else:
            whole = torch.full(tuple(v.shape), float("nan"))
            whole[torch.as_tensor(idx)] = pred.detach().float().cpu()
            self.preds[name] = whole

    def timed(self, name: str, fn):
        t = time.perf_counter()
        out = fn()
        self.timings[name] = time.perf_counter() - t
        return out


def _score_nla(nla, sc: _Scores):
    """The NLA's greedy explanations (and best-of-N); returns (explanations, predictions)."""
    cfg, v = sc.cfg, sc.rows.vectors
    if getattr(nla, "av", None) is None:
        sc.notes["nla"] = "skipped: no AV (baselines only)"
        return [], None
    exps = sc.timed("nla_generate", lambda: nla.explain(
        v, n=1, temperature=0.0, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
        hedge=cfg.hedge))
    pred = sc.timed("nla_reconstruct", lambda: nla.reconstruct(
        [e.text for e in exps], batch_size=cfg.batch_size))
    sc.record("nla", pred, note="greedy explanation read by the AR")
    if cfg.best_of > 1:
        _score_best_of(nla, sc, exps)
    return exps, pred


def _score_best_of(nla, sc: _Scores, greedy) -> None:
    """nla_best_of_N and the quotes given the same rerank (quote_rerank_N)."""
    cfg, rows, n = sc.cfg, sc.rows, sc.cfg.best_of
    best = sc.timed(f"nla_best_of_{n}", lambda: nla.best_of(
        rows.vectors, n, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
        seed=cfg.seed, greedy=greedy, rawvar=sc.den.rawvar, hedge=cfg.hedge))
    sc.best_of_texts = [e.text for e in best.explanations]  # kept: `nlakit audit` reads them
    sc.record(f"nla_best_of_{n}", best.reconstructions,
              note=f"of the greedy explanation and {n - 1} samples (temperature 1), the one the "
                   "AR reconstructs best against the true vector (which the AV is given anyway)")
    lengths = rerank_quote_lengths(n, max(cfg.quote_tokens, default=32))
    pred_quote = sc.timed(f"quote_rerank_{n}", lambda: best_quote(
        nla, rows.prefixes, rows.vectors, lengths, cfg.batch_size))
    sc.record(f"quote_rerank_{n}", pred_quote,
              note=f"of the quotes of {','.join(map(str, lengths))} tokens, the one the AR "
                   "reconstructs best: the same rerank as best-of-N, given to the quotes")


def _score_constants(store, sc: _Scores, pred_nla) -> None:
    """The mean-direction constants and the wrong-document control."""
    rows, v = sc.rows, sc.rows.vectors
    sc.record("mean_direction", mean_direction_prediction(v),
              note="constant E g_hat/||E g_hat|| of the evaluated rows themselves: "
                   "fve_meannorm is 0 by construction")
    train = training_mean_direction(store, rows.split)
    if train is not None:
        mu, names = train
        sc.record("mean_direction_train", (mu / mu.norm()).expand(len(rows), -1).clone(),
                  note=f"constant mean direction of the training splits ({'+'.join(names)}), "
                       "not fitted to the evaluated rows: the honest out-of-sample constant")
    if pred_nla is None:
        sc.notes["wrong_document"] = "skipped: needs the NLA's explanations (no AV)"
    elif rows.n_docs >= 2:
        wd = wrong_document_index(rows.doc_ids, sc.cfg.seed)
        sc.record("wrong_document", pred_nla[torch.as_tensor(wd)],
                  note="each row scored with the NLA explanation of a row of another document")
    else:
        sc.notes["wrong_document"] = "skipped: needs at least 2 documents"


def _score_texts(nla, store, sc: _Scores, labels, control_av) -> None:
    """Baselines the AR reads as text: quotes of the context, warm-start labels, the control."""
    cfg, rows = sc.cfg, sc.rows
    tok = nla.ar.tokenizer
    for n in cfg.quote_tokens:
        t = time.perf_counter()
        quoted = [quote_text(p, tok, int(n)) for p in rows.prefixes]
        pred = nla.reconstruct([q for q, _ in quoted], batch_size=cfg.batch_size)
        sc.timings[f"quote_{n}"] = time.perf_counter() - t
        short = sum(c < n for _, c in quoted)
        sc.record(f"quote_{n}", pred, note=f"AR fed the last {n} tokens of the context (AR "
                  f"tokenizer)" + (f"; {short} rows had fewer tokens" if short else ""))
    if labels is not None:
        t = time.perf_counter()
        found = _labels_for(labels, store, rows)
        if found is None:
            sc.notes["label"] = "skipped: no evaluated row has a warm-start label"
        else:
            idx, texts = found
            sc.record("label", nla.reconstruct(texts, batch_size=cfg.batch_size), idx,
                      note=f"AR fed the warm-start label written from the text alone "
                           f"({idx.size} of {len(rows)} rows have one)")
        sc.timings["label"] = time.perf_counter() - t
    else:
        sc.notes["label"] = "skipped: no label set given"
    if control_av is not None:
        cav = getattr(control_av, "av", control_av)
        t = time.perf_counter()
        cexps = cav.generate(rows.vectors, n=1, temperature=0.0,
                             max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        sc.record("control", nla.reconstruct([e.text for e in cexps],
                                             batch_size=cfg.batch_size),
                  note="greedy explanation of the shuffled-activation control AV, same AR")
        sc.timings["control"] = time.perf_counter() - t
    else:
        sc.notes["control"] = "skipped: no control AV given"


def _frozen_target(nla):
    """The target's (model, tokenizer) for the reread and quote-fit references, or None when
    the NLA names no loadable target (then those rows are skipped with a note)."""
    target = getattr(nla, "target", None)
    if target is None:
        return None
    try:
        return target()
    except NLAError as e:
        log.warning("reference points that need the target are skipped: %s", e)
        return None


def _score_references(nla, store, sc: _Scores) -> None:
    """reread_N (the frozen target) and quote_N_fit (a fairly trained quote AR)."""
    from nlakit.eval.baselines import reread_predictions

    cfg, rows = sc.cfg, sc.rows
    names = [f"reread_{n}" for n in cfg.reread_tokens] + [
        f"quote_{n}_fit" for n in cfg.quote_fit_tokens]
    if not names:
        return
    target = _frozen_target(nla)
    if target is None:
        for name in names:
            sc.notes[name] = "skipped: the NLA names no loadable target model"
        return
    model, tok = target
    for n in cfg.reread_tokens:
        pred = sc.timed(f"reread_{n}", lambda n=n: reread_predictions(
            model, tok, nla.layer, rows.prefixes, n, cfg.batch_size))
        sc.record(f"reread_{n}", pred, note=f"the frozen target re-reading the raw last {n} "
                  "tokens (BOS + tokens, identity head, no training): how local the layer is")
    for n in cfg.quote_fit_tokens:
        _score_quote_fit(nla, store, sc, (model, tok), n)


def _fit_rows(store, split: str, wanted: tuple[str, ...] = (AR_SFT,)):
    """(split names, table) of the rows a fitted baseline trains on: the splits the NLA's AR
    trained on (`wanted`: ar_sft and its extra splits) that the store holds, never the evaluated
    one; else one other training split."""
    def table_of(names):
        tables = [store.table(n, columns=["prefix", "vector"]) for n in names]
        return pa.concat_tables(tables) if tables else None

    names = [n for n in dict.fromkeys(wanted) if n != split and n in store.splits]
    table = table_of(names)
    if table is not None and table.num_rows:
        return "+".join(names), table
    for name in [s for s in TRAINING_SPLITS if s != split and s in store.splits]:
        table = table_of([name])
        if table.num_rows:
            return name, table
    return None, None


def _ar_trainings(nla) -> list[dict]:
    """The provenance of each supervised training the NLA's AR holds, first to last: an AR
    continued from another (`train_ar.init_from`) records its start's; [] when none recorded."""
    chain = []
    prov = (getattr(nla, "ar_meta", None) or {}).get("nlakit", {}).get("provenance", {})
    while prov:
        chain.insert(0, prov)
        prov = prov.get("init", {}).get("provenance", {})
    return chain


def ar_training_splits(nla) -> tuple[str, ...]:
    """The splits the NLA's AR trained on, from its provenance: ar_sft plus extra_splits (of
    every training it holds)."""
    splits = [AR_SFT]
    for prov in _ar_trainings(nla):
        extra = prov.get("config", {}).get("extra_splits") or ()
        splits += [str(x) for x in extra if str(x) not in splits]
    return tuple(splits)


def rl_ar_rows(nla) -> int:
    """How many explanations RL's online AR updates read, over every RL run the NLA's AR holds
    (each supervised training's, and the runs one RL continued):
    one update per RL step on all of that step's rollouts (steps x batch x group x processes)."""
    total = 0
    for prov in _ar_trainings(nla):
        rl = prov.get("rl") or {}
        while rl:  # an RL run continuing another keeps the earlier one as `previous`
            s = rl.get("summary") or {}
            total += (int(s.get("steps") or 0) * int(s.get("batch_size") or 0)
                      * int(s.get("group_size") or 0) * int(s.get("processes") or 1))
            rl = rl.get("previous") or {}
    return total


def ar_budget(nla, steps: int | None = None):
    """The NLA's AR's training budget from its provenance, for fair fitted baselines: the first
    training's settings and the steps of all of them, plus RL's online AR updates counted as
    steps of that batch size (the rows they read, rounded up); defaults where the AR records
    none. `steps` overrides the step count."""
    from nlakit.eval.baselines import FitBudget

    chain = _ar_trainings(nla)
    budget = FitBudget()
    conf = chain[0].get("config", {}) if chain else {}
    for key in ("batch_size", "lr", "lora_rank", "lora_alpha", "weight_decay", "max_grad_norm",
                "mixed_precision", "seed"):
        if conf.get(key) is not None:
            kind = type(getattr(budget, key)) if getattr(budget, key) is not None else int
            setattr(budget, key, kind(conf[key]))
    total = sum(int(p.get("summary", {}).get("steps") or 0) for p in chain)
    total += -(-rl_ar_rows(nla) // budget.batch_size)
    if total:
        budget.steps = total
    if steps is not None:
        budget.steps = int(steps)
    return budget


def _score_quote_fit(nla, store, sc: _Scores, target, n: int) -> None:
    from nlakit.extract.store import vectors_from_arrow
    from nlakit.nla.reconstructor import Reconstructor
    from nlakit.train.sft import fit_reconstructor

    model, tok = target
    cfg, rows, name = sc.cfg, sc.rows, f"quote_{n}_fit"
    split, table = _fit_rows(store, rows.split, ar_training_splits(nla))
    if table is None:
        sc.notes[name] = "skipped: the store has no training split apart from the evaluated one"
        return
    budget = ar_budget(nla, cfg.quote_fit_steps)
    t = time.perf_counter()
    texts = [quote_text(p, tok, n)[0] for p in table.column("prefix").to_pylist()]
    vectors = torch.from_numpy(vectors_from_arrow(table.column("vector"), store.d_model).copy())
    fresh = Reconstructor.from_target(model, tok, nla.layer, template=nla.ar.template)
    ar = fit_reconstructor(fresh, texts, vectors, budget)
    pred = ar.reconstruct([quote_text(p, tok, n)[0] for p in rows.prefixes], cfg.batch_size)
    sc.timings[name] = time.perf_counter() - t
    sc.record(name, pred, note=f"an AR trained on the last {n} tokens of the {len(texts)} "
              f"{split} rows ({budget.steps} steps x {budget.batch_size}, lr {budget.lr:g}, "
              f"LoRA {budget.lora_rank}, clip {budget.max_grad_norm:g}: the NLA's AR budget and "
              "SFT step), same template and start")


def _score_spliced(nla, store, sc: _Scores, progress: bool) -> dict:
    """kl / delta_ce / ce_recovered of every recorded method (`nlakit.eval.splice`), merged into
    each
    method's summary and the per-row values; returns the JSON's ``spliced`` section."""
    from nlakit.eval import splice

    if not sc.cfg.spliced:
        return {"skipped": "turned off (spliced: false)"}
    target = _frozen_target(nla)
    try:
        if target is None:  # e.g. --baselines-only: the store's own model
            target = load_target(store, device=str(getattr(nla.ar, "device", "cpu")))
        t = time.perf_counter()
        data, res = splice.spliced_eval(store, sc.rows, sc.preds, target=target,
                                        n_boot=sc.cfg.n_boot, seed=sc.cfg.seed,
                                        progress=progress)
        sc.timings["spliced"] = time.perf_counter() - t
    except NLAError as e:
        log.warning("spliced metrics skipped: %s", e)
        return {"skipped": str(e)}
    methods = data.pop("methods")
    for name, summary in sc.methods.items():
        for k in splice.SPLICE_METRICS:
            if k in methods.get(name, {}):
                summary[k] = methods[name][k]
        per = res.per_method[name]
        for k in ("kl", "ce_recovered"):
            sc.per_row[name][k] = per[k]
    data["reference"] = {**(data.get("reference") or {}),
                         **{m: methods[m] for m in (splice.TRUE_METHOD, splice.ABLATION_METHOD)
                            if m in methods}}
    return data


def _claims(nla, sc: _Scores, exps) -> dict:
    """Every checkable claim of the NLA's explanations against the row's context and the
    target's real next-token distribution (`nlakit.nla.claims`); per verdict a document-level CI
    over the rows that make the claim, and how many rows had the field but unreadable."""
    from nlakit.nla.claims import claim_checks, unparsed_counts

    if not exps:
        return {}
    target = _frozen_target(nla)
    model, tok = target if target is not None else (None, nla.ar.tokenizer)
    verdicts, claims, _ = claim_checks([e.text for e in exps], sc.rows.prefixes, tok, model,
                                       sc.cfg.batch_size)
    sc.claim_rows = verdicts
    unparsed = unparsed_counts(claims)
    out = {}
    for name, values in verdicts.items():
        made = np.isfinite(values)
        if not made.any():
            continue
        summary = metrics.bootstrap_ci(values[made], groups=sc.rows.doc_ids[made],
                                       n_boot=sc.cfg.n_boot, seed=sc.cfg.seed)
        out[name] = {**summary, "n_claims": int(made.sum()), "n_unparsed": unparsed[name],
                     "n_rows": len(sc.rows)}
    if model is None:
        sc.notes["claims"] = ("predictions unchecked: the NLA names no loadable target model")
    return out


def _sanity(sc: _Scores) -> dict:
    """The mean-direction baseline measured against its closed form 1 - 2/(1 + ||E g_hat||)."""
    v = sc.rows.vectors
    m = float(metrics.mean_unit_direction(v).norm())
    md_mse = float(np.mean(sc.per_row["mean_direction"]["mse_nrm"]))
    rawvar_rows = metrics.rawvar(v)
    sanity = {
        "norm_mean_unit_direction": m,
        "mean_direction_mse_nrm": md_mse,
        "meannorm_rows": sc.den.meannorm,
        "rawvar_rows": rawvar_rows,
        "expected_mean_direction_fve_nrm_rows": 1 - 2 / (1 + m),
        "measured_mean_direction_fve_nrm_rows": 1 - md_mse / rawvar_rows,
    }
    sanity["ok"] = bool(abs(sanity["expected_mean_direction_fve_nrm_rows"]
                            - sanity["measured_mean_direction_fve_nrm_rows"]) < 1e-4
                        and abs(sc.methods["mean_direction"]["fve_meannorm"]["mean"]) < 1e-5)
    return sanity


def _row_records(sc: _Scores, exps) -> list[dict]:
    rows, per_row = sc.rows, sc.per_row
    spliced = any("kl" in p for p in per_row.values())
    return [
        {"row_id": int(rows.row_ids[i]), "doc_id": str(rows.doc_ids[i]),
         "position": int(rows.positions[i]),
         "prefix_tail": rows.prefixes[i][-PREFIX_CHARS_KEPT:],
         "explanation": exps[i].text if exps else None,
         **({"best_of_explanation": sc.best_of_texts[i]} if sc.best_of_texts else {}),
         "complete": bool(exps[i].complete) if exps else None,
         "n_tokens": int(exps[i].n_tokens) if exps else None,
         "fve_nrm": {k: _num(per_row[k]["fve_nrm"][i]) for k in per_row},
         "cos": _num(per_row["nla"]["cos"][i]) if "nla" in per_row else None,
         "claims": ({k: _num(v[i]) for k, v in sc.claim_rows.items()}
                    if sc.claim_rows else None),
         **{k: {m: _num(per_row[m][k][i]) for m in per_row if k in per_row[m]}
            for k in ("kl", "ce_recovered") if spliced}}
        for i in range(len(rows))
    ]


def evaluate(nla, store, config: EvalConfig | None = None, *, labels=None,
             control_av=None, progress: bool = True) -> EvalResult:
    """Run every method on the chosen rows; return the JSON-ready result (see module doc).

    labels: a LabelSet or its directory (label baseline; skipped when None or no row has one).
    control_av: a Verbalizer (or an NLA whose AV is used) trained on shuffled activations."""
    cfg = config or EvalConfig()
    if store.d_model != nla.d_model:
        raise NLAError(f"the store holds d_model {store.d_model} vectors, the NLA {nla.d_model}")
    if store.layer != nla.layer:
        raise NLAError(f"the store holds layer {store.layer} activations but the NLA rebuilds "
                       f"layer {nla.layer}; evaluate on a store of the same layer")
    t0 = time.perf_counter()
    rows = select_rows(store, cfg.split, cfg.max_rows, cfg.seed)
    den = denominators(store, rows)
    sc = _Scores(rows, den, cfg)
    exps, pred_nla = _score_nla(nla, sc)
    _score_constants(store, sc, pred_nla)
    _score_texts(nla, store, sc, labels, control_av)
    _score_references(nla, store, sc)
    spliced = _score_spliced(nla, store, sc, progress)
    claims = _claims(nla, sc, exps)
    sanity = _sanity(sc)
    sc.timings["total"] = time.perf_counter() - t0
    data = {
        "kind": "nlakit_eval",
        "split": rows.split, "n_rows": len(rows), "n_docs": rows.n_docs,
        "layer": int(nla.layer), "d_model": int(nla.d_model),
        "store": str(store.path), "model": store.meta.get("model", {}).get("spec"),
        "rawvar": den.rawvar, "meannorm": den.meannorm,
        "denominator": {"fve_nrm": f"rawvar = {den.rawvar:.6f} from {den.rawvar_source}",
                        "fve_meannorm": f"meannorm = {den.meannorm:.6f} from "
                                        f"{den.meannorm_source}"},
        "ci": f"95% percentile bootstrap over documents ({cfg.n_boot} resamples)",
        "config": {"max_rows": cfg.max_rows, "max_new_tokens": cfg.max_new_tokens,
                   "quote_tokens": list(cfg.quote_tokens), "best_of": cfg.best_of,
                   "reread_tokens": list(cfg.reread_tokens),
                   "quote_fit_tokens": list(cfg.quote_fit_tokens),
                   "seed": cfg.seed, "batch_size": cfg.batch_size, "spliced": cfg.spliced,
                   "decoding": {**dict(getattr(nla.av, "decoding", {})),
                                "hedge": cfg.hedge if cfg.hedge is not None
                                else getattr(nla.av, "hedge", 0.0)}},
        "methods": sc.methods,
        "spliced": spliced,
        "skipped": sc.notes,
        "claims": claims,
        "sanity": sanity,
        "explanations": ({"complete": sum(e.complete for e in exps),
                          "hit_cap": sum(e.hit_cap for e in exps),
                          "mean_tokens": float(np.mean([e.n_tokens for e in exps]))}
                         if exps else None),
        "timings_s": {k: round(x, 3) for k, x in sc.timings.items()},
        "rows": _row_records(sc, exps),
    }
    return EvalResult(data)


def _num(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def write_eval_json(result: EvalResult | dict, path: str | Path) -> Path:
    data = result.data if isinstance(result, EvalResult) else result
    write_json(path, data)
    return Path(path)




