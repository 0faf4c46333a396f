"""Spliced-in metrics: does the target *behave* the same with a reconstruction in place of h?

fve_nrm says how close a prediction is to the true block-K output g in direction; it does not say
whether the model downstream of block K still predicts the same next token. For an evaluated row
(document x, position p, true vector g) and a prediction v:

  splice        replace the output of decoder block K at position p, and only there, by
                v · ||g|| / ||v|| (NLA predictions are directions, so every method gets the true
                norm; `rescale=False` splices the vectors as given), run blocks K+1..L-1, the final
                norm and the LM head, and read the next-token distribution Q at position p;
  kl            KL(P || Q) = sum_x P(x) (log P(x) - log Q(x)) in nats, P the unmodified
                distribution;
  ce            -log Q(x[p+1]) on the document's true next token (nats);
  delta_ce      ce_spliced - ce_original: the loss increase the splice causes (nats);
  ce_recovered  (CE_ablated - CE_spliced) / (CE_ablated - CE_original), CE_ablated from splicing
                the *mean activation* E[g] over the store's training splits, unscaled (an
                activation, not a direction). 1 = as good as the true activation, 0 = no better
                than the mean ablation, < 0 worse. The summary is the ratio of the mean CEs over
                the rows (SAELens' definition: a per-row ratio explodes where the ablation barely
                hurts); its CI resamples documents. Per-row ratios are kept (NaN where
                |CE_ablated - CE_original| < 1e-6).

Means come with 95% percentile bootstrap CIs over *documents*, like every eval metric.

How it runs (cost). Rows of a document share one forward: the document's tokens x[0..T-1]
(T = its last evaluated position + 1) are followed by one appended "query" token per
(row, spliced vector) pair: the token x[p] again, with position id p and a 4D attention mask that
lets it see x[0..p-1] and itself only. By causality the keys and values of x[0..p-1] are those of
the unmodified run, so each query's output equals a separate forward over the prefix x[0..p] with
the splice at p (`splice_logits` is that direct version; the tests compare the two). A forward
hook on block K overwrites the queries' block-K outputs with the spliced vectors; the document's
own tokens give the unmodified distributions in the same pass. Per document the work is
(T + Q) tokens through all L blocks for Q = rows x (methods + 2) queries, versus T tokens for the
plain forward: the queries also run blocks 0..K, whose output is then thrown away (Q·(K+1)
token-blocks of waste, traded for not depending on each architecture's block signature), and
attention grows to (T + Q)^2. Only the LM-head rows that are read are computed. See
docs/benchmarks.md for measured costs.

The token ids come from the corpus itself: the store records the corpus spec, the documents are
re-read and re-tokenised exactly as extraction did (`row_tokens`), and every row is checked
against the stored token id and prefix text; mismatching rows are left out (NaN) and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from nlakit import metrics
from nlakit.errors import NLAError
from nlakit.extract.store import TRAINING_SPLITS, load_target
from nlakit.model.arch import decoder_stack
from nlakit.model.hooks import on_block_output
from nlakit.model.lm_head import lm_logits

log = logging.getLogger(__name__)

SPLICE_METRICS = ("kl", "delta_ce", "ce_recovered")
TRUE_METHOD = "true_vector"  # the stored activation itself: kl measures the float noise floor
ABLATION_METHOD = "mean_ablation"
_EPS_DEN = 1e-6


# ---- token ids of the evaluated rows --------------------------------------------------------


@dataclass
class RowTokens:
    """The token ids extraction fed the target for each evaluated row's document.

    doc_tokens: doc_id -> ids x[0..] (what extraction saw, plus the token after its truncation);
    next_token: [n] x[position + 1], -1 where the document ends at the row (no CE there);
    ok: [n] the re-tokenised document agrees with the store at the row (token id and prefix);
    rows without a document or that disagree are excluded from every spliced metric."""

    doc_tokens: dict[str, list[int]]
    next_token: np.ndarray
    ok: np.ndarray
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def n_mismatch(self) -> int:
        return int((~self.ok).sum())

    def describe(self) -> dict:
        return {"source": self.source, "rows": int(self.ok.size),
                "rows_mismatched": self.n_mismatch,
                "rows_without_next_token": int(((self.next_token < 0) & self.ok).sum()),
                "notes": list(self.notes)}


def reopen_corpus(store, tokenizer, chat_model=None):
    from nlakit.corpus.load import load_corpus

    desc = (store.meta.get("config", {}) or {}).get("corpus") or store.meta.get("corpus") or {}
    spec = desc.get("source")
    if not spec:
        raise NLAError(f"{store.path} does not record its corpus; pass corpus= explicitly")
    return load_corpus(str(spec), tokenizer=tokenizer, text_field=desc.get("text_field", "text"),
                       blocks=bool(desc.get("blocks", False)), max_docs=desc.get("max_docs"),
                       chat_model=chat_model)


def row_tokens(store, rows, tokenizer, *, corpus=None, chat_model=None) -> RowTokens:
    """Re-read the rows' documents from the store's corpus and re-tokenise them the way
    extraction did (same `tokenize_document`, truncation at max_tokens_per_doc; one more token
    is kept so the last position has its next token). Each row is checked: ids[position] must
    equal the stored token id and the decoded prefix the stored prefix.

    rows: an EvalRows (row_ids, doc_ids, positions, prefixes). corpus: a Corpus or spec that
    overrides the one the store records (e.g. a moved file)."""
    from nlakit.corpus.documents import Corpus
    from nlakit.corpus.load import load_corpus
    from nlakit.extract.extraction import prefix_text, tokenize_document

    n = len(rows.row_ids)
    stored = store.table(rows.split, columns=["row_id", "token_id"])
    tok_of = dict(zip(stored.column("row_id").to_pylist(), stored.column("token_id").to_pylist()))
    cfg = store.meta.get("config", {}) or {}
    max_tokens = int(cfg.get("max_tokens_per_doc") or 1 << 30)
    if corpus is None:
        corpus = reopen_corpus(store, tokenizer, chat_model)
        source = f"corpus {corpus.description.get('source')!r} re-read and re-tokenised"
    elif not isinstance(corpus, Corpus):
        corpus = load_corpus(str(corpus), tokenizer=tokenizer, chat_model=chat_model)
        source = f"corpus {corpus.description.get('source')!r} (given) re-tokenised"
    else:
        source = f"corpus {corpus.description.get('source')!r} (given) re-tokenised"
    wanted = set(map(str, rows.doc_ids.tolist()))
    docs = {}
    for doc in corpus:
        if doc.doc_id in wanted:
            docs[doc.doc_id] = doc
            if len(docs) == len(wanted):
                break
    doc_tokens: dict[str, list[int]] = {}
    next_token = np.full(n, -1, dtype=np.int64)
    ok = np.zeros(n, dtype=bool)
    notes = []
    missing = sorted(wanted - set(docs))
    if missing:
        notes.append(f"{len(missing)} documents not found in the corpus (e.g. {missing[0]!r})")
    seen_ctx: dict[str, list[int]] = {}
    for d, doc in docs.items():
        seen_ctx[d] = tokenize_document(tokenizer, doc, max_tokens)  # what extraction saw
        more = tokenize_document(tokenizer, doc, max_tokens + 1)
        doc_tokens[d] = more if more[: len(seen_ctx[d])] == seen_ctx[d] else seen_ctx[d]
    bad_token = bad_prefix = 0
    for i in range(n):
        d, p = str(rows.doc_ids[i]), int(rows.positions[i])
        ids = seen_ctx.get(d)
        if ids is None:
            continue
        if p >= len(ids) or ids[p] != tok_of.get(int(rows.row_ids[i])):
            bad_token += 1
            continue
        if prefix_text(tokenizer, ids[: p + 1], docs[d].text) != rows.prefixes[i]:
            bad_prefix += 1
            continue
        ok[i] = True
        full = doc_tokens[d]
        if p + 1 < len(full):
            next_token[i] = full[p + 1]
    if bad_token:
        notes.append(f"{bad_token} rows: re-tokenised token id differs from the store")
    if bad_prefix:
        notes.append(f"{bad_prefix} rows: re-decoded prefix differs from the store")
    if (~ok).any():
        log.warning("spliced metrics: %d of %d rows do not match the re-tokenised corpus and "
                    "are left out (%s)", int((~ok).sum()), n, "; ".join(notes))
    return RowTokens(doc_tokens, next_token, ok, source, notes)


def mean_activation(store, exclude: str | None = None,
                    splits: Iterable[str] = TRAINING_SPLITS) -> tuple[torch.Tensor, list[str]]:
    """E[g] (raw, un-normalised) over the store's training splits other than `exclude`,
    streamed from disk. Returns (mean [d] float32, the split names used)."""
    from nlakit.extract.store import vectors_from_arrow

    total = np.zeros(store.d_model, dtype=np.float64)
    count, names = 0, []
    have = set(store.meta.get("counts", {}).get("rows_per_split", {})) | set(store.splits)
    for s in splits:
        if s == exclude or s not in have:
            continue
        used = 0
        for batch in store.iter_batches(s, columns=["vector"]):
            v = vectors_from_arrow(batch.column("vector"), store.d_model)
            total += v.astype(np.float64).sum(0)
            used += v.shape[0]
        if used:
            names.append(s)
            count += used
    if count == 0:
        raise NLAError(f"{store.path} has no training rows outside {exclude!r} to take the mean "
                       "activation from")
    return torch.from_numpy(total / count).float(), names


# ---- the splice ------------------------------------------------------------------------------


def _lm_logits(model, h: torch.Tensor) -> torch.Tensor:
    return lm_logits(model, h, torch.float64)  # float64: kl of near-identical distributions


class _BlockOverwrite:
    """A forward hook on decoder block K that writes vectors into its output at (batch, token)
    index pairs and leaves every other entry untouched."""

    def __init__(self, b_idx: torch.Tensor, t_idx: torch.Tensor, vectors: torch.Tensor):
        self.b, self.t, self.v = b_idx, t_idx, vectors

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        h = h.clone()
        h[self.b, self.t] = self.v.to(device=h.device, dtype=h.dtype)
        return h


@torch.no_grad()
def splice_logits(model, input_ids: Sequence[int] | torch.Tensor, layer: int,
                  positions: Sequence[int], vectors: torch.Tensor) -> torch.Tensor:
    """The direct splice: one plain forward over `input_ids` [t] with the output of block `layer`
    replaced by `vectors` [m, d] at `positions` (m of them); float64 next-token logits [t, V] at
    every position. The reference `spliced_metrics` is tested against."""
    ids = torch.as_tensor(list(input_ids) if not torch.is_tensor(input_ids) else input_ids)
    device = next(model.parameters()).device
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    vec = torch.as_tensor(vectors).float()
    vec = vec.reshape(len(pos), vec.shape[-1])
    hook = _BlockOverwrite(torch.zeros_like(pos).to(device), pos.to(device), vec)
    with on_block_output(model, layer, hook):
        h = decoder_stack(model)(input_ids=ids.reshape(1, -1).to(device),
                                 use_cache=False).last_hidden_state[0]
    return _lm_logits(model, h)


@dataclass
class _Item:
    """One document's forward: its tokens, and the (row-local) queries spliced into it."""

    ids: list[int]
    q_pos: list[int]  # position p of each query
    q_vec: torch.Tensor  # [Q, d] the block-K output spliced in
    read: list[int]  # unique positions whose unmodified distribution is read


@torch.no_grad()
def _run_items(model, layer: int, items: list[_Item]):
    """One batched forward of several documents with their appended splice queries.
    Returns, per item, (unmodified logits at item.read [R, V], spliced logits [Q, V])."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lengths = [len(it.ids) + len(it.q_pos) for it in items]
    width = max(lengths)
    b = len(items)
    ids = torch.zeros((b, width), dtype=torch.long)
    pos_ids = torch.zeros((b, width), dtype=torch.long)
    allowed = torch.zeros((b, width, width), dtype=torch.bool)
    hb, ht, hv = [], [], []
    for i, it in enumerate(items):
        t, q = len(it.ids), len(it.q_pos)
        x = torch.as_tensor(it.ids, dtype=torch.long)
        qp = torch.as_tensor(it.q_pos, dtype=torch.long)
        ids[i, :t] = x
        ids[i, t:t + q] = x[qp]
        pos_ids[i, :t] = torch.arange(t)
        pos_ids[i, t:t + q] = qp
        allowed[i, :t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
        allowed[i, t:t + q, :t] = torch.arange(t)[None, :] < qp[:, None]
        allowed[i, torch.arange(t, width), torch.arange(t, width)] = True  # self (and padding)
        hb.append(torch.full((q,), i, dtype=torch.long))
        ht.append(torch.arange(t, t + q))
        hv.append(it.q_vec)
    mask = torch.zeros((b, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    hook = _BlockOverwrite(torch.cat(hb).to(device), torch.cat(ht).to(device), torch.cat(hv))
    with on_block_output(model, layer, hook):
        h = decoder_stack(model)(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 position_ids=pos_ids.to(device),
                                 use_cache=False).last_hidden_state
    out = []
    for i, it in enumerate(items):
        t, q = len(it.ids), len(it.q_pos)
        orig = _lm_logits(model, h[i, torch.as_tensor(it.read, device=device)])
        spl = _lm_logits(model, h[i, t:t + q])
        out.append((orig.cpu(), spl.cpu()))
    return out


@dataclass
class SpliceResult:
    """Per-row spliced metrics (float64 [n], NaN where a row has no value).

    per_method[name] holds kl, ce, delta_ce, ce_recovered; ce_original / ce_ablated are shared.
    The method TRUE_METHOD splices the stored true vector (kl = the float noise floor) and
    ABLATION_METHOD the ablation itself (ce_recovered = 0 by construction)."""

    per_method: dict[str, dict[str, np.ndarray]]
    ce_original: np.ndarray
    ce_ablated: np.ndarray
    ablation: str
    rescaled: bool
    n_queries: int
    seconds: float

    def summary(self, groups, *, n_boot: int = 1000, seed: int = 0) -> dict:
        """{method: {kl, delta_ce, ce: bootstrap dicts; ce_recovered: ratio of means with a
        document-bootstrap CI}, "_reference": {ce_original, ce_ablated}}."""
        groups = np.asarray(groups, dtype=object)
        out = {}
        for name, per in self.per_method.items():
            m = {}
            for k in ("kl", "delta_ce", "ce"):
                keep = np.isfinite(per[k])
                if keep.any():
                    m[k] = metrics.bootstrap_ci(per[k][keep], groups=groups[keep],
                                                n_boot=n_boot, seed=seed)
            keep = np.isfinite(per["ce"]) & np.isfinite(self.ce_original) & \
                np.isfinite(self.ce_ablated)
            if keep.any():
                m["ce_recovered"] = ratio_bootstrap_ci(
                    self.ce_ablated[keep] - per["ce"][keep],
                    self.ce_ablated[keep] - self.ce_original[keep], groups[keep],
                    n_boot=n_boot, seed=seed)
            m["n_rows"] = int(np.isfinite(per["kl"]).sum())
            out[name] = m
        keep = np.isfinite(self.ce_original)
        if keep.any():
            out["_reference"] = {
                "ce_original": metrics.bootstrap_ci(self.ce_original[keep], groups=groups[keep],
                                                    n_boot=n_boot, seed=seed),
                "ce_ablated": metrics.bootstrap_ci(self.ce_ablated[keep], groups=groups[keep],
                                                   n_boot=n_boot, seed=seed)}
        return out


def ratio_bootstrap_ci(num, den, groups, *, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> dict:
    """sum(num) / sum(den) with a percentile CI from resampling whole groups (documents); the
    same draws as `metrics.bootstrap_ci` for the same groups and seed."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    labels, inverse = np.unique(np.asarray(groups), return_inverse=True)
    g = labels.size
    sn = np.bincount(inverse, weights=num, minlength=g)
    sd = np.bincount(inverse, weights=den, minlength=g)
    total = float(sd.sum())
    mean = float(sn.sum() / total) if abs(total) > 0 else float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, g, size=(n_boot, g))
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = sn[draws].sum(1) / sd[draws].sum(1)
    boot = boot[np.isfinite(boot)]
    alpha = (1 - level) / 2
    lo, hi = (np.quantile(boot, [alpha, 1 - alpha]) if boot.size else (np.nan, np.nan))
    return {"mean": mean, "ci": [float(lo), float(hi)], "n": int(num.size), "n_groups": int(g),
            "definition": "(mean CE_ablated - mean CE_spliced) / (mean CE_ablated - mean "
                          "CE_original) over the rows"}


def _checked_inputs(rows, predictions, ablation):
    """(true [n, d], predictions {name: [n, d]}, ablation [d]) as float tensors, checked."""
    n = len(rows.positions)
    true = torch.as_tensor(rows.vectors).float()
    d = true.shape[1]
    names = [TRUE_METHOD, ABLATION_METHOD, *predictions]
    if len(set(names)) != len(names):
        raise NLAError(f"method names must be unique and not {TRUE_METHOD!r}/{ABLATION_METHOD!r}")
    preds = {}
    for name, p in predictions.items():
        p = torch.as_tensor(p).float()
        if p.shape != (n, d):
            raise NLAError(f"predictions of {name!r} are {tuple(p.shape)}, expected {(n, d)}")
        preds[name] = p
    abl = torch.as_tensor(ablation).float().reshape(-1)
    if abl.numel() != d or not torch.isfinite(abl).all():
        raise NLAError(f"the ablation must be a finite [{d}] vector")
    return true, preds, abl


def _spliced_vectors(true, preds, abl, rescale: bool) -> dict[str, torch.Tensor]:
    """What each method splices at each row: the true vector, the unscaled ablation, and each
    prediction (rescaled to the true vector's norm unless `rescale` is off)."""
    n, true_norm = true.shape[0], true.norm(dim=1, keepdim=True)
    out = {TRUE_METHOD: true, ABLATION_METHOD: abl.expand(n, -1)}
    for name, p in preds.items():
        norm = p.norm(dim=1, keepdim=True)
        out[name] = p if not rescale else torch.where(
            norm > 0, p * (true_norm / norm.clamp_min(1e-30)), p * np.nan)
    return out


def _query_chunks(rows, tokens: RowTokens, valid: dict, max_queries: int) -> list:
    """[(doc, [(row, method)])]: a document's queries in chunks of at most max_queries, the
    longest first (one forward runs the chunk's prefix plus one token per query)."""
    doc_rows: dict[str, list[int]] = {}
    for i in range(len(rows.positions)):
        if tokens.ok[i]:
            doc_rows.setdefault(str(rows.doc_ids[i]), []).append(i)
    chunks = []
    for doc, rs in doc_rows.items():
        qs = [(i, m) for i in rs for m in valid if valid[m][i]]
        for s in range(0, len(qs), max_queries):
            chunks.append((doc, qs[s:s + max_queries]))
    chunks.sort(key=lambda c: -(max(rows.positions[i] for i, _ in c[1]) + 1 + len(c[1])))
    return chunks


def _run_chunks(model, layer, rows, tokens, vecs, chunks, batch_docs, progress):
    """Log-probs of the next token: unmodified per row, and spliced per (row, method)."""
    from tqdm.auto import tqdm

    logp_true: dict[int, torch.Tensor] = {}
    spl_lp: dict[tuple[int, str], torch.Tensor] = {}
    bar = tqdm(total=len(chunks), desc="splicing", unit="doc", disable=not progress)
    for s in range(0, len(chunks), batch_docs):
        batch = chunks[s:s + batch_docs]
        items = []
        for doc, qs in batch:
            t = max(int(rows.positions[i]) for i, _ in qs) + 1
            read = sorted({int(rows.positions[i]) for i, _ in qs})
            items.append(_Item(ids=tokens.doc_tokens[doc][:t],
                               q_pos=[int(rows.positions[i]) for i, _ in qs],
                               q_vec=torch.stack([vecs[m][i] for i, m in qs]), read=read))
        for (_doc, qs), it, (orig, spl) in zip(batch, items, _run_items(model, layer, items)):
            lp_orig = torch.log_softmax(orig, -1)
            at = {p: j for j, p in enumerate(it.read)}
            for j, (i, m) in enumerate(qs):
                logp_true.setdefault(i, lp_orig[at[int(rows.positions[i])]])
                spl_lp[(i, m)] = torch.log_softmax(spl[j], -1)
        bar.update(len(batch))
    bar.close()
    return logp_true, spl_lp


def _row_values(n, names, tokens, logp_true, spl_lp):
    """Per-row CE of the original and the ablation, and per method kl, ce, delta_ce and
    ce_recovered (NaN where a row has no value)."""
    nan = np.full(n, np.nan)
    ce_orig, ce_abl = nan.copy(), nan.copy()
    per_method = {m: {k: nan.copy() for k in ("kl", "ce", "delta_ce", "ce_recovered")}
                  for m in names}
    for i, lp in logp_true.items():
        y = int(tokens.next_token[i])
        if y >= 0:
            ce_orig[i] = float(-lp[y])
            if (i, ABLATION_METHOD) in spl_lp:
                ce_abl[i] = float(-spl_lp[(i, ABLATION_METHOD)][y])
        p = lp.exp()
        for m in names:
            q = spl_lp.get((i, m))
            if q is None:
                continue
            r = per_method[m]
            r["kl"][i] = float((p * (lp - q)).sum().clamp_min(0.0))
            if y >= 0:
                r["ce"][i] = float(-q[y])
                r["delta_ce"][i] = r["ce"][i] - ce_orig[i]
                den = ce_abl[i] - ce_orig[i]
                if np.isfinite(den) and abs(den) >= _EPS_DEN:
                    r["ce_recovered"][i] = (ce_abl[i] - r["ce"][i]) / den
    return per_method, ce_orig, ce_abl


def spliced_metrics(model, rows, tokens: RowTokens, predictions: Mapping[str, torch.Tensor], *,
                    layer: int, ablation: torch.Tensor, ablation_name: str = "mean activation",
                    rescale: bool = True, batch_docs: int = 4, max_queries: int = 512,
                    progress: bool = False) -> SpliceResult:
    """Splice every method's prediction at every evaluated row (see the module doc).

    rows: doc_ids [n], positions [n], vectors [n, d] (the true block-K outputs; an EvalRows).
    predictions: {method: [n, d]}; a row of NaNs means "no prediction for this row" (e.g. a
    method that covers only some rows). ablation: [d], spliced unscaled.
    Documents run `batch_docs` at a time; a document with more than `max_queries` queries is
    split into several forwards (each recomputing the document's tokens)."""
    t0 = time.perf_counter()
    true, preds, abl = _checked_inputs(rows, predictions, ablation)
    vecs = _spliced_vectors(true, preds, abl, rescale)
    valid = {name: (torch.isfinite(v).all(1).numpy() & tokens.ok) for name, v in vecs.items()}
    chunks = _query_chunks(rows, tokens, valid, max_queries)
    logp_true, spl_lp = _run_chunks(model, layer, rows, tokens, vecs, chunks, batch_docs,
                                    progress)
    per_method, ce_orig, ce_abl = _row_values(len(rows.positions), list(vecs), tokens,
                                              logp_true, spl_lp)
    n_queries = sum(len(q) for _, q in chunks)
    return SpliceResult(per_method, ce_orig, ce_abl, ablation_name, rescale, n_queries,
                        time.perf_counter() - t0)


# ---- the one call eval needs -----------------------------------------------------------------


def spliced_eval(store, rows, predictions: Mapping[str, torch.Tensor], *, target=None,
                 corpus=None, batch_docs: int = 4, n_boot: int = 1000, seed: int = 0,
                 progress: bool = False) -> tuple[dict, SpliceResult]:
    """Spliced metrics of every method on the evaluated rows, JSON-ready.

    target: (model, tokenizer) of the store's model (loaded from the store when None).
    Returns ({"ablation", "tokens", "methods": {name: summary}, "reference", "timings_s",
    "note"}, the SpliceResult with per-row arrays)."""
    t0 = time.perf_counter()
    model, tok = target if target is not None else load_target(store)
    t_load = time.perf_counter() - t0
    toks = row_tokens(store, rows, tok, corpus=corpus, chat_model=(model, tok))
    t_tok = time.perf_counter() - t0 - t_load
    abl, names = mean_activation(store, exclude=rows.split)
    res = spliced_metrics(model, rows, toks, predictions, layer=store.layer, ablation=abl,
                          ablation_name=f"mean activation E[g] of {'+'.join(names)} "
                                        "(unscaled)",
                          batch_docs=batch_docs, progress=progress)
    summ = res.summary(rows.doc_ids, n_boot=n_boot, seed=seed)
    reference = summ.pop("_reference", None)
    data = {
        "ablation": res.ablation,
        "rescale": "each prediction spliced as v * ||g|| / ||v|| (directions get the true norm)",
        "tokens": toks.describe(),
        "methods": summ,
        "reference": reference,
        "n_queries": res.n_queries,
        "timings_s": {"load_target": round(t_load, 3), "tokens": round(t_tok, 3),
                      "splice": round(res.seconds, 3)},
        "note": "kl = KL(original || spliced) of the next-token distribution at the row's "
                "position (nats); ce_recovered = (CE_abl - CE_spl) / (CE_abl - CE_orig) as a "
                f"ratio of means; {TRUE_METHOD} splices the stored activation (noise floor), "
                f"{ABLATION_METHOD} the ablation (ce_recovered 0 by construction)",
    }
    return data, res


__all__ = ["ABLATION_METHOD", "SPLICE_METRICS", "TRUE_METHOD", "RowTokens", "SpliceResult",
           "mean_activation", "ratio_bootstrap_ci", "row_tokens",
           "splice_logits", "spliced_eval", "spliced_metrics"]
