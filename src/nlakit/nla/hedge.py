"""Saying less when unsure: leave out the claims the AV itself was unsure of while writing them.

The AV's probability of each token it wrote (teacher-forced, the vector injected, temperature
1) is its confidence. A claim's confidence is the lowest probability among the tokens that
spell its value: the quoted current token and each quoted next-token prediction (and, for
measuring only, the geometric mean over the ending's tokens). `hedge` removes every current
token or prediction claim below a threshold — a prediction item on its own, the whole
prediction sentence when none is left — and keeps the rest of the text as written.

How far confidence tracks truth is measured, not assumed: experiments/hedge_probe.py, and
docs/research/2026-12-06-truth-reward.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from nlakit.errors import NLAError
from nlakit.model.batching import right_pad
from nlakit.nla.claims import CURRENT_RE, ENDING_RE, ITEM_RE, PREDICTIONS_RE
from nlakit.nla.prompt import CLOSE_TAG, OPEN_TAG, Explanation

# the fields hedging may leave out: those whose confidence tracks their truth on the man-page
# validation set (ranking AUC 0.85 current token, 0.62 predictions; the ending's 0.47 is no
# signal, and it carries most of what the AR reads)
HEDGED_FIELDS = ("current_token", "prediction")


@dataclass(frozen=True)
class ClaimSpan:
    """One claim of an explanation body: its field, its value's [start, end) characters in
    the body, the span removed when it is dropped, and the AV's confidence in it."""

    field: str
    start: int
    end: int
    drop: tuple[int, int]
    confidence: float


@torch.no_grad()
def token_probs(av, vectors: torch.Tensor, exps: list[Explanation],
                batch_size: int = 32) -> list[list[float]]:
    """The AV's probability of each token it wrote, per explanation (vectors: [n, d], one per
    explanation)."""
    from nlakit.nla.sampling import response_logprobs

    if any(e.token_ids is None for e in exps):
        raise NLAError("hedging needs the generated token ids (Explanation.token_ids)")
    out: list[list[float]] = []
    for start in range(0, len(exps), batch_size):
        chunk = exps[start : start + batch_size]
        resp, mask = right_pad([e.token_ids for e in chunk], av.pad_id)
        logp = response_logprobs(av.model, av, vectors[start : start + batch_size], resp, mask)
        for row, e in zip(logp.exp().cpu().tolist(), chunk):
            out.append(row[: len(e.token_ids)])
    return out


def _body_offset(raw: str, body: str) -> int:
    """Where the explanation body (`parse_explanation`'s text) starts in the raw output."""
    opened = raw.find(OPEN_TAG)
    start = opened + len(OPEN_TAG) if opened >= 0 else 0
    end = raw.find(CLOSE_TAG, start)
    segment = raw[start : end if end >= 0 else len(raw)]
    return start + len(segment) - len(segment.lstrip())


def _token_starts(tokenizer, ids: list[int]) -> list[int]:
    """Character offset in the decoded output where each token's text starts (plus the end)."""
    return [len(tokenizer.decode(ids[:i], skip_special_tokens=True))
            for i in range(len(ids) + 1)]


def claim_spans(tokenizer, exp: Explanation, probs: list[float]) -> list[ClaimSpan]:
    """The hedgeable claims of one explanation with the AV's confidence in each."""
    body, raw = exp.text, exp.raw
    base, starts = _body_offset(raw, body), _token_starts(tokenizer, exp.token_ids)

    def confidence(a: int, b: int, mean: bool = False) -> float:
        a, b = a + base, b + base
        ps = [p for i, p in enumerate(probs) if starts[i] < b and starts[i + 1] > a]
        if not ps:
            return math.nan
        if mean:
            return math.exp(sum(math.log(max(p, 1e-12)) for p in ps) / len(ps))
        return min(ps)

    spans = []
    if m := CURRENT_RE.search(body):
        end = m.end() + (body[m.end()] == "." if m.end() < len(body) else 0)
        spans.append(ClaimSpan("current_token", m.start(1), m.end(1), (m.start(), end),
                               confidence(m.start(1), m.end(1))))
    if m := PREDICTIONS_RE.search(body):
        line_begin = body.rfind("\n", 0, m.start()) + 1
        sentence = body.find("The model", line_begin, m.start())
        sentence = sentence if sentence >= 0 else m.start()
        for item in ITEM_RE.finditer(body, m.start(1), m.end(1)):
            conf = confidence(item.start(1), item.end(1))
            if math.isnan(conf):  # an empty quoted token: its quotes are all it has
                conf = confidence(item.start(), item.end())
            spans.append(ClaimSpan("prediction", item.start(1), item.end(1),
                                   (sentence, m.end()), conf))
    if m := ENDING_RE.search(body):
        spans.append(ClaimSpan("ending", m.start(1), m.end(1), (m.start(), m.end()),
                               confidence(m.start(1), m.end(1), mean=True)))
    return spans


def hedge_text(body: str, spans: list[ClaimSpan], threshold: float) -> str:
    """The body without the claims of `HEDGED_FIELDS` whose confidence is below `threshold`:
    each dropped prediction item goes alone; the prediction sentence goes when no item is
    left. Everything else stays byte for byte (the ending is a verbatim quote)."""
    cuts: list[tuple[int, int]] = []
    items = [s for s in spans if s.field == "prediction"]
    unsure = [s for s in items if s.confidence < threshold]
    if items and len(unsure) == len(items):
        cuts.append(items[0].drop)
    else:
        cuts += [_item_extent(body, s) for s in unsure]
    cuts += [s.drop for s in spans
             if s.field in HEDGED_FIELDS and s.field != "prediction" and s.confidence < threshold]
    if not cuts:
        return body
    text = body
    for a, b in sorted(cuts, reverse=True):
        if b >= len(text) or text[b] == "\n":  # the cut ends its line: so does what it left
            a = len(text[:a].rstrip(" "))
        b = _junction(text, a, b)
        if (a == 0 or text[a - 1] == "\n") and (b >= len(text) or text[b] == "\n"):
            a, b = (a, b + 1) if b < len(text) else (max(a - 1, 0), b)  # a whole line went
        text = text[:a] + text[b:]
    # the last item went: "' the' (31%), ." -> "' the' (31%)." (on the prediction line only)
    return "\n".join(re.sub(r",\s*\.(\s*)$", r".\1", line) if "expects next:" in line else line
                     for line in text.split("\n"))


def _junction(text: str, a: int, b: int) -> int:
    """Where the text resumes after cutting [a, b): one space is kept between the two sides,
    none at the start of a line."""
    at_line_start = a == 0 or text[a - 1] == "\n"
    while b < len(text) and text[b] == " " and (at_line_start or text[a - 1] == " "):
        b += 1
    return b


def _item_extent(body: str, span: ClaimSpan) -> tuple[int, int]:
    """One prediction item with its quotes, its "(31%)" and the comma that joins it."""
    m = re.compile(r"'[ \t]*(?:\([^()\n]*\))?[ \t]*,?").match(body, span.end)
    return span.start - 1, m.end() if m else span.end + 1


def check_hedge(value, where: str) -> float:
    """A hedge threshold: a probability in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise NLAError(f"{where}: the hedge threshold is a probability in [0, 1], got "
                       f"{value!r}")
    return float(value)


def hedge(av, vectors: torch.Tensor, exps: list[Explanation], threshold: float,
          batch_size: int = 32) -> list[Explanation]:
    """Each explanation with its claims below `threshold` left out (text only; raw, token ids
    and counts stay what the AV wrote). threshold 0 changes nothing."""
    if check_hedge(threshold, "hedge") == 0:
        return list(exps)
    probs = token_probs(av, vectors, exps, batch_size)
    return [replace(e, text=hedge_text(e.text, claim_spans(av.tokenizer, e, p), threshold))
            for e, p in zip(exps, probs)]
