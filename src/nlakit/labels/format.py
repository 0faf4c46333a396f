"""The label format: the prompt a labeller is given and the parser of what it writes.

A label is 2-3 short features, most important first, the last one about the final token,
inside ``<explanation>...</explanation>``; the text between the tags, one feature per line, is
what the AV is later trained to write.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PROMPT_VERSION = "features-v1"  # bump when the LLM prompt or the parser changes meaning

# ---- the explanation format -----------------------------------------------------------------

_EXPLANATION = re.compile(r"<explanation>((?:(?!<explanation>).)*?)</explanation>", re.DOTALL)
_BULLET = re.compile(r"^\s*(?:[-*\u2022+]|\d+[.)]|#+|(?:feature|clue)\s*\d+\s*:)\s*", re.IGNORECASE)
_BOLD = re.compile(r"(\*\*|__)(.+?)\1")
_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i can not|i'?m unable|i am unable|"
    r"i won'?t|as an ai|unfortunately,? i)", re.IGNORECASE)


@dataclass
class ParsedLabel:
    """A parsed labeller output: ``features`` when kept, else the drop ``reason``."""

    features: list[str] | None
    reason: str | None = None

    @property
    def kept(self) -> bool:
        return self.features is not None

    @property
    def text(self) -> str:
        return "\n".join(self.features or [])


def parse_label(raw: str, *, min_features: int = 2, max_features: int = 3,
                      max_words: int = 150) -> ParsedLabel:
    """Strictly parse ``<explanation>`` features from a labeller's raw output.

    Drop reasons: ``empty``, ``refusal``, ``no_closed_tag``, ``too_few_features`` (after removing
    bullets, bold and duplicate lines), ``too_many_features``, ``too_long`` (> max_words words).
    """
    if raw is None or not raw.strip():
        return ParsedLabel(None, "empty")
    stripped = raw.strip()
    stripped = stripped.removeprefix("<explanation>")
    if _REFUSAL.match(stripped):
        return ParsedLabel(None, "refusal")
    match = _EXPLANATION.search(raw)
    if match is None:
        return ParsedLabel(None, "no_closed_tag")
    features: list[str] = []
    seen: set[str] = set()
    for line in match.group(1).splitlines():
        line = _BOLD.sub(r"\2", _BULLET.sub("", line)).strip()
        if not line or line.lower() in seen:
            continue
        seen.add(line.lower())
        features.append(line)
    if features and _REFUSAL.match(features[0]):
        return ParsedLabel(None, "refusal")
    if len(features) < min_features:
        return ParsedLabel(None, "too_few_features")
    if len(features) > max_features:
        return ParsedLabel(None, "too_many_features")
    if sum(len(f.split()) for f in features) > max_words:
        return ParsedLabel(None, "too_long")
    return ParsedLabel(features)


INSTRUCTION = (
    "The text below stops in the middle. Name the 2 or 3 clues a language model relies on most "
    "to predict the next word (kind of text, grammar, topic, repetition), most important first; "
    "the last clue is about the final word and what it makes likely next. One short line per "
    "clue, inside <explanation> tags, nothing else.\n\n<text>{text}</text>"
)
ONE_SHOT = [
    ("Preheat the oven to 180C. In a large bowl, mix 2 cups of",
     ("<explanation>\nA recipe giving step-by-step cooking instructions.\nAn ingredient list "
      "with quantities.\nEnds with \"2 cups of\": an ingredient name comes next.\n</explanation>")),
    ("def area(radius):\n    return 3.14 * radius *",
     ("<explanation>\nPython code defining a function.\nA formula for the area of a circle.\n"
      "Ends with \"*\": the variable radius comes next.\n</explanation>")),
]


def prefix_tail(prefix: str, max_chars: int | None) -> str:
    """The last ``max_chars`` characters of a prefix, cut at a word boundary, marked with '...'."""
    if not max_chars or len(prefix) <= max_chars:
        return prefix
    tail = prefix[-max_chars:]
    cut = re.search(r"\s", tail)
    if cut and cut.start() < max_chars // 4:
        tail = tail[cut.start() + 1:]
    return "..." + tail


def label_messages(prefix: str, max_chars: int | None = None,
                   one_shot: bool = True) -> list[dict]:
    """Chat messages asking an LLM labeller for the features of one prefix."""
    messages: list[dict] = []
    if one_shot:
        for text, answer in ONE_SHOT:
            messages.append({"role": "user", "content": INSTRUCTION.format(text=text)})
            messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user",
                     "content": INSTRUCTION.format(text=prefix_tail(prefix, max_chars))})
    return messages


__all__ = ["INSTRUCTION", "ONE_SHOT", "PROMPT_VERSION", "ParsedLabel", "label_messages",
           "parse_label", "prefix_tail"]
