"""Concept words: which words of an explanation name its concept, and their token ids."""

from __future__ import annotations

import re

from nlakit.errors import NLAError

# A short English stopword list plus words that frame explanations ("the text is about"):
# neither names a concept. (nltk's list needs a corpus download; scikit-learn is not a
# dependency of nlakit and would be installed for one constant.)
STOPWORDS = frozenset("""
a about above after again against all also am an and any are as at be because been before
being below between both but by can could did do does doing down during each either few for
from further had has have having he her here hers herself him himself his how i if in into is
it its itself just me more most my myself no nor not now of off on once only or other our ours
ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves
text texts talk talks talking mention mentions mentioning discuss discusses topic topics
model thinking thing things something kind particular nothing anything
""".split())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def default_concept_words(text: str, contrast: str | None = None) -> tuple[str, ...]:
    """Content words of `text`: not stopwords, not words of `contrast`, in order, unique."""
    drop = STOPWORDS | set(_words(contrast or ""))
    words = tuple(dict.fromkeys(w for w in _words(text) if w not in drop and len(w) > 1))
    if not words:
        raise NLAError(f"no content words in {text!r} (after removing stopwords and the "
                       "contrast's words); pass --concept-words")
    return words


def _stem(word: str) -> str:
    """'waves' -> 'wave', 'ships' -> 'ship' (so singular and plural both count)."""
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def concept_pattern(words) -> re.Pattern:
    """Whole words, case-insensitive, each stem with an optional -s/-es plural."""
    stems = sorted({_stem(w.lower()) for w in words}, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(map(re.escape, stems)) + r")(?:s|es)?\b", re.I)


def concept_token_ids(tokenizer, words) -> dict[int, str]:
    """{token id: token text} of the first tokens of " word"/" Word" (word and stem).

    A first token shorter than 3 characters that is not the whole word (" s" of " ships")
    would count every word it starts, so it is left out."""
    ids = {}
    for w in words:
        for form in dict.fromkeys((w.lower(), _stem(w.lower()))):
            for variant in (" " + form, " " + form.capitalize()):
                toks = tokenizer(variant, add_special_tokens=False)["input_ids"]
                if not toks:
                    continue
                piece = tokenizer.decode(toks[:1]).strip()
                if len(piece) >= 3 or piece.lower() == form:
                    ids[int(toks[0])] = piece
    if not ids:
        raise NLAError(f"no concept word {list(words)} starts with a specific token; pass "
                       "longer --concept-words")
    return ids
