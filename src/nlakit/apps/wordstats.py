"""Which words one set of texts uses more than another: log-odds with an informative prior.

`log_odds_ranking(texts_a, texts_b)` ranks unigrams and bigrams by the z-score of their
log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin'
Words", Political Analysis 16(4), eq. 16 and 22). For a term w of one n-gram order, with y_w^a
its count in texts_a, n_a the total count of that order in texts_a (likewise b), and prior
pseudo-counts α_w summing to α_0:

    δ_w = log((y_w^a + α_w) / (n_a + α_0 − y_w^a − α_w))
          − log((y_w^b + α_w) / (n_b + α_0 − y_w^b − α_w))
    σ²(δ_w) ≈ 1 / (y_w^a + α_w) + 1 / (y_w^b + α_w),      z_w = δ_w / σ(δ_w)

Positive z: w is relatively more frequent in texts_a. The prior shrinks rare terms towards no
difference (a term seen twice in a and never in b is weak evidence), which raw frequency ratios
do not. α_w = α_0 · (c_w + 1) / (1 + Σ_v (c_v + 1)), with c the term counts of `prior_texts`
(default: texts_a and texts_b pooled, Monroe et al.'s choice) plus one, over every term v seen in
a, b or the prior, and one more slot for unseen terms (so the odds stay finite when a side uses
a single term); α_0 = the prior's total count unless `prior_strength` says otherwise. Unigrams
and bigrams are separate multinomials (each has its own n_a, n_b, α_0); their z-scores share
one ranking.

A z-score is per term: with thousands of terms some pass |z| > 1.96 by chance. Treat the top of
the ranking as leads to read in context, not as findings.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from nlakit.errors import NLAError

# lower-cased words: letters/digits, with an inner apostrophe kept ("don't", "model's")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def words(text: str) -> list[str]:
    """The lower-cased words of `text` (punctuation and markup dropped)."""
    return _WORD.findall(text.lower())


def ngram_terms(text: str, ngrams: Sequence[int] = (1, 2)) -> list[tuple[int, str]]:
    """(order, term) of every n-gram of `text`'s words; n-grams never cross texts."""
    toks = words(text)
    return [(n, " ".join(toks[i:i + n])) for n in ngrams for i in range(len(toks) - n + 1)]


def word_distance(a: str, b: str) -> float:
    """1 − Jaccard similarity of the two texts' word sets: 0 same words, 1 none shared (two
    empty texts are at distance 0)."""
    sa, sb = set(words(a)), set(words(b))
    union = sa | sb
    return 1.0 - len(sa & sb) / len(union) if union else 0.0


def term_counts(texts: Iterable[str], ngrams: Sequence[int] = (1, 2),
                binary: bool = False) -> Counter:
    """Counts of (order, term) over `texts`; binary counts a term once per text (robust to a
    text that repeats itself, e.g. a verbalizer stuck in a loop)."""
    counts: Counter = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise NLAError(f"expected texts (str), got {type(text).__name__}")
        terms = ngram_terms(text, ngrams)
        counts.update(set(terms) if binary else terms)
    return counts


def _check_ngrams(ngrams) -> tuple[int, ...]:
    orders = tuple(sorted({int(n) for n in ngrams}))
    if not orders or orders[0] < 1:
        raise NLAError(f"ngrams must be positive n-gram orders such as (1, 2), got {ngrams!r}")
    return orders


def _totals(counts: Counter, orders) -> dict[int, int]:
    totals = dict.fromkeys(orders, 0)
    for (n, _), c in counts.items():
        totals[n] += c
    return totals


def _prior(prior_counts: Counter, vocab: set, orders, strength: float | None):
    """(α_w for every term of `vocab`, α_0 per order): the prior's add-one smoothed
    proportions over the vocabulary, times α_0."""
    alpha: dict = {}
    alpha0: dict[int, float] = {}
    for n in orders:
        terms = [t for t in vocab if t[0] == n]
        # +1 for an unseen-term slot: every odds keeps a positive "rest", even with one term
        mass = sum(prior_counts.get(t, 0) + 1 for t in terms) + 1
        total = strength if strength is not None else sum(
            c for (m, _), c in prior_counts.items() if m == n)
        alpha0[n] = max(float(total), 1.0)  # an empty prior still needs a proper Dirichlet
        for t in terms:
            alpha[t] = alpha0[n] * (prior_counts.get(t, 0) + 1) / mass
    return alpha, alpha0


def log_odds_ranking(texts_a: Sequence[str], texts_b: Sequence[str],
                     prior_texts: Sequence[str] | None = None, ngrams: Sequence[int] = (1, 2),
                     min_count: int = 3, prior_strength: float | None = None,
                     binary: bool = False) -> list[dict]:
    """Terms ranked by how much more often texts_a use them than texts_b (module doc).

    Returns one dict per term seen at least `min_count` times in a and b together:
    {"term", "z", "delta", "count_a", "count_b"}, highest z (most over-used in texts_a) first,
    most over-used in texts_b last. `prior_strength`: α_0 (default: the prior texts' total
    count per n-gram order). `binary`: count each term once per text.
    """
    orders = _check_ngrams(ngrams)
    if min_count < 1:
        raise NLAError(f"min_count must be >= 1, got {min_count}")
    if prior_strength is not None and not prior_strength > 0:
        raise NLAError(f"prior_strength must be positive, got {prior_strength}")
    if not texts_a or not texts_b:
        raise NLAError(f"need texts on both sides, got {len(texts_a)} and {len(texts_b)}")
    ca, cb = term_counts(texts_a, orders, binary), term_counts(texts_b, orders, binary)
    prior = ca + cb if prior_texts is None else term_counts(prior_texts, orders, binary)
    # the Dirichlet spans every term seen anywhere, so α_0 is the prior's whole mass
    alpha, a0 = _prior(prior, ca.keys() | cb.keys() | prior.keys(), orders, prior_strength)
    na, nb = _totals(ca, orders), _totals(cb, orders)
    ranked = []
    for t in (t for t in ca.keys() | cb.keys() if ca[t] + cb[t] >= min_count):
        n, aw, ya, yb = t[0], alpha[t], ca[t], cb[t]
        delta = (math.log((ya + aw) / (na[n] + a0[n] - ya - aw))
                 - math.log((yb + aw) / (nb[n] + a0[n] - yb - aw)))
        z = delta / math.sqrt(1.0 / (ya + aw) + 1.0 / (yb + aw))
        ranked.append({"term": t[1], "z": z, "delta": delta, "count_a": ya, "count_b": yb})
    ranked.sort(key=lambda r: (-r["z"], r["term"]))
    return ranked


__all__ = ["log_odds_ranking", "ngram_terms", "term_counts", "word_distance", "words"]
