"""The claims an explanation makes, and whether each is true of the text and of the target.

The explanation format (the labels of `nlakit.labels.context`) has checkable fields, each
optional, one per line or sentence:

    Current token: ' and'.
    Before it: ' list', ' expression', ' the'.          (newest first)
    Kind of text: prose. The model expects next: ' the' (31%), ' returns' (12%).
    Ending: the expression list and                      (or: The text ends with "...".)

`parse_claims` reads them; `verify` checks each against the truth at the row (`Truth`): the
context's own tokens and words, the rule the labels name the kind of text by, and the target's
real next-token distribution there. Deterministic: no model judges a claim.

Verdicts (1.0 true, 0.0 false, a fraction for multi-part claims, NaN: no such claim):
  current_token_right      the stated current token is the real one
  previous_tokens_right    the fraction of "Before it" tokens that are the real ones, in place
  kind_right               the stated kind is `text_kind` of the context
  top_prediction_in_top5   the first stated next token is in the target's real top 5
  top_prediction_is_top1   ... is the target's real most likely token
  predictions_in_top5      the fraction of distinct stated next tokens in the real top 5
  prediction_prob_error    mean |stated - real probability| of the stated tokens (lower is better)
  ending_words_found       the fraction of the quoted ending's words among the last 12 words
  quote_true               the quoted ending is the context's exact (whitespace-normalised) end

A field whose header is there but whose content cannot be read ("Kind of text: ???", a
prediction list with no quoted token) is no claim, and is counted in ``unparsed``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from nlakit.errors import NLAError
from nlakit.extract.extraction import tokenize_text
from nlakit.labels.context import text_kind
from nlakit.model.lm_head import next_token_probs

KINDS = ("dialogue", "code", "list", "table", "markup", "prose")
TOP_K = 5
VERDICTS = ("current_token_right", "previous_tokens_right", "kind_right",
            "top_prediction_in_top5", "top_prediction_is_top1", "predictions_in_top5",
            "prediction_prob_error", "ending_words_found", "quote_true")
LOWER_IS_BETTER = frozenset({"prediction_prob_error"})
# the field each verdict reads, for counting unparsed fields per verdict
FIELD_OF = {"current_token_right": "current_token", "previous_tokens_right": "previous_tokens",
            "kind_right": "kind", "top_prediction_in_top5": "predictions",
            "top_prediction_is_top1": "predictions", "predictions_in_top5": "predictions",
            "prediction_prob_error": "predictions", "ending_words_found": "ending",
            "quote_true": "ending"}

# fields may share a line ("Current token: ' a'. Kind of text: prose."): a quoted value ends
# at the quote that is followed by an optional period and then a space or the end
CURRENT_RE = re.compile(r"Current token: '(.*?)'(?=\.?(?:\s|$))")
_CURRENT_HEAD = re.compile(r"Current token:")
_BEFORE = re.compile(r"Before it:(.*)$", re.MULTILINE)
_KIND = re.compile(r"Kind of text:\s*([^.\n]*)")
PREDICTIONS_RE = re.compile(r"expects next:(.*)$", re.MULTILINE)
ENDING_RE = re.compile(r"(?:^|\s)Ending: (.*)$", re.MULTILINE)
_ENDS_WITH = re.compile(r"The text ends with \"(.*)\"\.?\s*$", re.MULTILINE)
_ENDING_HEAD = re.compile(r"(?:^|\s)Ending:|The text ends with", re.MULTILINE)
# a quoted token: an apostrophe inside it only before a letter (' 's', "n't"), then an optional
# parenthesis that is a probability only when it reads like "31%"
ITEM_RE = re.compile(r"'((?:[^'\n]|'(?=[A-Za-z]))*)'[ \t]*(?:\(([^()\n]*)\))?")
_PERCENT = re.compile(r"^\s*(\d{1,3}(?:\.\d+)?)\s*%\s*$")


def unescape(text: str) -> str:
    """Undo the labels' one-line escapes (\\n, \\t, \\\\)."""
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), text)


@dataclass
class Claims:
    """What one explanation states; None where it states nothing of a field."""

    current_token: str | None = None
    previous_tokens: list[str] | None = None
    kind: str | None = None
    predictions: list[tuple[str, float | None]] | None = None  # (token, stated prob or None)
    ending: str | None = None
    unparsed: list[str] = field(default_factory=list)  # fields present but unreadable

    @property
    def prediction_tokens(self) -> list[str]:
        return [t for t, _ in self.predictions or []]


def _items(segment: str) -> list[tuple[str, float | None]]:
    out = []
    for m in ITEM_RE.finditer(segment):
        p = _PERCENT.match(m.group(2) or "")
        out.append((unescape(m.group(1)), float(p.group(1)) / 100 if p else None))
    return out


def parse_claims(explanation: str) -> Claims:
    """Read the checkable fields of one explanation (see module doc)."""
    c = Claims()
    if not isinstance(explanation, str):
        return c
    m = CURRENT_RE.search(explanation)
    if m:
        c.current_token = unescape(m.group(1))
    elif _CURRENT_HEAD.search(explanation):
        c.unparsed.append("current_token")
    if m := _BEFORE.search(explanation):
        tokens = [t for t, _ in _items(m.group(1))]
        if tokens:
            c.previous_tokens = tokens
        else:
            c.unparsed.append("previous_tokens")
    if m := _KIND.search(explanation):
        kind = m.group(1).strip().lower()
        if kind in KINDS:
            c.kind = kind
        else:
            c.unparsed.append("kind")
    if m := PREDICTIONS_RE.search(explanation):
        items = _items(m.group(1).split("Ending:")[0])
        if items:
            c.predictions = items
        else:
            c.unparsed.append("predictions")
    m = ENDING_RE.search(explanation) or _ENDS_WITH.search(explanation)
    if m:
        c.ending = unescape(m.group(1)).lstrip("…")
    elif _ENDING_HEAD.search(explanation):
        c.unparsed.append("ending")
    return c


@dataclass
class Truth:
    """What is true at one row: the context's tokens (decoded one by one, BOS dropped, the
    current token last), its text, and the target's real next-token distribution there
    (top 5 as (token, prob), and the real probability of each stated token)."""

    tokens: list[str]
    prefix: str
    top: list[tuple[str, float]] | None = None
    prob_of: dict[str, float] = field(default_factory=dict)


def quote_is_true(quote: str, prefix: str, window_chars: int = 300) -> bool:
    """The quoted words occur, in order and contiguously, at the end of the context: the
    quote's whitespace-normalised text is a suffix of the context's last ``window_chars``."""
    q = " ".join(quote.split())
    tail = " ".join(prefix[-window_chars:].split())
    return bool(q) and tail.endswith(q)


def ending_words_found(quote: str, prefix: str, window_words: int = 12) -> float:
    """The fraction of the quoted ending's words that occur among the context's last
    ``window_words`` words: partial credit where `quote_is_true` asks for the exact suffix,
    which a small AV almost never writes. A quote of the last N tokens starts where a token
    starts, often inside a word, so its first word also counts when it ends a context word.
    NaN for an empty quote."""
    words, tail = quote.split(), prefix.split()[-window_words:]
    if not words:
        return np.nan
    found = [w in tail or (i == 0 and any(t.endswith(w) for t in tail))
             for i, w in enumerate(words)]
    return float(np.mean(found))


def _prediction_verdicts(claims: Claims, truth: Truth) -> dict[str, float]:
    nan = {k: np.nan for k in ("top_prediction_in_top5", "top_prediction_is_top1",
                               "predictions_in_top5", "prediction_prob_error")}
    if claims.predictions is None or truth.top is None:
        return nan
    real = [t for t, _ in truth.top[:TOP_K]]
    stated = list(dict.fromkeys(claims.prediction_tokens))  # distinct, in stated order
    errors = [abs(p - truth.prob_of[t]) for t, p in claims.predictions
              if p is not None and t in truth.prob_of]
    return {"top_prediction_in_top5": float(stated[0] in real),
            "top_prediction_is_top1": float(stated[0] == real[0]),
            "predictions_in_top5": float(np.mean([t in real for t in stated])),
            "prediction_prob_error": float(np.mean(errors)) if errors else np.nan}


def verify(claims: Claims, truth: Truth) -> dict[str, float]:
    """Every verdict of `VERDICTS` for one row (NaN where the explanation makes no claim)."""
    out = dict.fromkeys(VERDICTS, np.nan)
    if claims.current_token is not None and truth.tokens:
        out["current_token_right"] = float(claims.current_token == truth.tokens[-1])
    if claims.previous_tokens is not None:
        before = truth.tokens[-2::-1]  # newest first, like the label
        out["previous_tokens_right"] = float(np.mean(
            [i < len(before) and t == before[i] for i, t in enumerate(claims.previous_tokens)]))
    if claims.kind is not None:
        out["kind_right"] = float(claims.kind == text_kind(truth.prefix))
    out.update(_prediction_verdicts(claims, truth))
    if claims.ending is not None:
        out["quote_true"] = float(quote_is_true(claims.ending, truth.prefix))
        out["ending_words_found"] = ending_words_found(claims.ending, truth.prefix)
    return out


# the verdicts `truth_score` pays for: every field a label states that is true or false of
# the row (prediction_prob_error and quote_true are left out: the first is a distance, the
# second an exact-suffix test a small AV almost never passes)
TRUTH_FIELDS = ("current_token_right", "previous_tokens_right", "kind_right",
                "top_prediction_in_top5", "top_prediction_is_top1", "ending_words_found")


def truth_score(verdicts: dict[str, float]) -> float:
    """One explanation's claims as a number in [-1, 1]: each field of `TRUTH_FIELDS` scores
    2v - 1 for its verdict v (+1 true, -1 false, 0 for half the ending's words), 0 when the
    explanation states nothing of it, averaged over all six fields. Leaving a field out is
    worth more than a false claim and less than a true one: the RL truth reward's incentive to
    say less when unsure."""
    values = [verdicts.get(k, np.nan) for k in TRUTH_FIELDS]
    return float(sum(0.0 if np.isnan(v) else 2.0 * v - 1.0 for v in values) / len(TRUTH_FIELDS))


def _without_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and ids[:1] == [bos] else ids


def single_token_id(tokenizer, token: str) -> int | None:
    """The id of a stated token when it is exactly one token of the vocabulary, else None."""
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 and tokenizer.decode(ids) == token else None


def truth_from_probs(tokenizer, ids: list[int], probs: torch.Tensor | None,
                     stated: list[str], prefix: str | None = None) -> Truth:
    """The `Truth` of the row whose context is `ids` (current token last), with `probs` [vocab]
    the target's next-token distribution there (None: predictions go unchecked)."""
    ids = _without_bos(tokenizer, list(ids))
    truth = Truth([tokenizer.decode([i]) for i in ids],
                  prefix if prefix is not None else tokenizer.decode(ids))
    if probs is not None:
        top = probs.topk(TOP_K)
        truth.top = [(tokenizer.decode([int(i)]), float(p))
                     for p, i in zip(top.values.tolist(), top.indices.tolist())]
        for token in stated:
            tid = single_token_id(tokenizer, token)
            if tid is not None:
                truth.prob_of[token] = float(probs[tid])
    return truth


def truths_for_prefixes(model, tokenizer, prefixes: list[str], claims: list[Claims],
                        batch_size: int = 8) -> list[Truth]:
    """The truth at each stored row: its prefix re-tokenised as extraction does, the target run
    once per group of rows whose token ids all begin one longest row's ids (the rows of one
    document, usually), read at each row's last token (`model` None: no predictions are
    checked). The target is causal, so a row read inside a longer sequence sees what it sees
    alone."""
    if len(prefixes) != len(claims):
        raise NLAError(f"{len(claims)} explanations for {len(prefixes)} rows")
    ids = [tokenize_text(tokenizer, p) for p in prefixes]
    probs: list[torch.Tensor | None] = [None] * len(ids)
    if model is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        groups = _prefix_groups(ids)
        for start in range(0, len(groups), batch_size):
            chunk = groups[start : start + batch_size]
            read = next_token_probs(model, [ids[g[0]] for g in chunk], pad,
                                    read_at=[[len(ids[r]) - 1 for r in g] for g in chunk])
            for row, p in zip((r for g in chunk for r in g), read):
                probs[row] = p
    return [truth_from_probs(tokenizer, row_ids, p, c.prediction_tokens, prefix)
            for row_ids, p, prefix, c in zip(ids, probs, prefixes, claims)]


def _prefix_groups(ids: list[list[int]]) -> list[list[int]]:
    """Row indices grouped so that every row's ids begin its group's first (longest) row's."""
    groups: list[list[int]] = []
    for i in sorted(range(len(ids)), key=lambda i: -len(ids[i])):
        home = next((g for g in groups if ids[g[0]][:len(ids[i])] == ids[i]), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return groups


def claim_checks(explanations: list[str], prefixes: list[str], tokenizer, model=None,
                 batch_size: int = 8) -> tuple[dict, list[Claims], list[Truth]]:
    """Verdicts of stored rows' explanations: (verdict arrays, claims, truths). With the
    target `model`, predictions are checked against its real distribution; without, not."""
    claims = [parse_claims(e) for e in explanations]
    truths = truths_for_prefixes(model, tokenizer, prefixes, claims, batch_size)
    rows = [verify(c, t) for c, t in zip(claims, truths)]
    verdicts = {k: np.asarray([r[k] for r in rows], dtype=float) for k in VERDICTS}
    return verdicts, claims, truths


def unparsed_counts(claims: list[Claims]) -> dict[str, int]:
    """Per verdict, how many explanations had its field but in a form no check can read."""
    return {k: sum(FIELD_OF[k] in c.unparsed for c in claims) for k in VERDICTS}


def mark(value: float, name: str) -> str:
    """A short mark for one verdict: ✓ / ✗ for true/false claims, a percentage for fractions."""
    if value is None or np.isnan(value):
        return "–"
    if name == "prediction_prob_error":
        return f"±{value:.0%}"
    if value in (0.0, 1.0):
        return "✓" if value == 1.0 else "✗"
    return f"{value:.0%}"


def describe(claims: Claims, verdicts: dict[str, float], truth: Truth) -> str:
    """One line per stated field with its mark and, where false, what is true instead."""
    lines = []
    if claims.current_token is not None:
        lines.append(f"{mark(verdicts['current_token_right'], 'current_token_right')} "
                     f"current token {claims.current_token!r}"
                     + ("" if verdicts["current_token_right"] == 1.0
                        else f" (real: {truth.tokens[-1]!r})" if truth.tokens else ""))
    if claims.previous_tokens is not None:
        lines.append(f"{mark(verdicts['previous_tokens_right'], 'previous_tokens_right')} "
                     f"tokens before it {claims.previous_tokens} (real: "
                     f"{truth.tokens[-2::-1][:len(claims.previous_tokens)]})")
    if claims.kind is not None:
        lines.append(f"{mark(verdicts['kind_right'], 'kind_right')} kind of text {claims.kind}")
    if claims.predictions is not None:
        stated = ", ".join(f"{t!r}" + (f" {p:.0%}" if p is not None else "")
                           for t, p in claims.predictions)
        real = ("unchecked" if truth.top is None else
                ", ".join(f"{t!r} {p:.0%}" for t, p in truth.top))
        lines.append(f"{mark(verdicts['top_prediction_in_top5'], 'top_prediction_in_top5')} "
                     f"predicts {stated} (top-1 "
                     f"{mark(verdicts['top_prediction_is_top1'], 'top_prediction_is_top1')}, "
                     f"probabilities "
                     f"{mark(verdicts['prediction_prob_error'], 'prediction_prob_error')}; "
                     f"real top 5: {real})")
    if claims.ending is not None:
        found = verdicts["ending_words_found"]
        lines.append(f"{'–' if np.isnan(found) else f'{found:.0%}'} of the ending's words found"
                     f" ({claims.ending!r})")
    for name in claims.unparsed:
        lines.append(f"? {name}: present but unreadable (no claim)")
    return "\n".join(lines)
