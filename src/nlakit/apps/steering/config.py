"""`nlakit steer`'s settings: prompts, scales, modes, concept words, and its inputs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from nlakit.apps.steering.vectors import checked_text
from nlakit.config import hint, required
from nlakit.errors import NLAError

MODES = ("prompt_end", "all")

# Neutral prompts: everyday openings that favour no particular topic.
DEFAULT_PROMPTS = (
    "I went to the store and",
    "The meeting was moved to",
    "She opened the letter and",
    "My favorite thing about weekends is",
    "The report says that",
    "Yesterday afternoon, we",
    "The best way to learn a new skill is",
    "He looked at the clock and",
    "In my opinion, the most important thing is",
    "The teacher asked the class to",
    "Here is a short story:",
    "The new software update",
    "Our neighbors have a",
    "After dinner, the family",
    "I think the main problem is",
    "On the first day of the job,",
    "The recipe calls for",
    "When I woke up this morning,",
    "The city council decided to",
    "Let me tell you about",
)

# Held-out text for the perplexity cost: plain prose on an unrelated, ordinary topic.
DEFAULT_PPL_TEXT = (
    "The town library reopened on Monday after three months of repairs. Volunteers moved "
    "thousands of books back onto the shelves, and the children's room now has new chairs and "
    "brighter lights. The head librarian said that the number of visitors in the first week "
    "was higher than in any week last year. Many people came to return books they had kept "
    "during the closure, and the late fees were forgiven. Next month the library will start a "
    "reading group for adults and a homework club for students, both free of charge. The "
    "opening hours stay the same: from nine in the morning until seven in the evening, "
    "Monday to Saturday."
)


def _numbers(name: str, value) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        value = (value,)
    if isinstance(value, str):
        value = [x for x in value.split(",") if x.strip()]
    try:
        out = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        raise NLAError(f"{name} must be comma-separated numbers, got {value!r}") from None
    if not out:
        raise NLAError(f"{name} is empty: give at least one value, e.g. --{name} 0.5,1,2")
    if not all(math.isfinite(x) for x in out):
        raise NLAError(f"{name} must be finite numbers, got {out}")
    return out


def _word_list(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    words = tuple(w.strip() for w in value if str(w).strip())
    if not words:
        raise NLAError("concept_words is empty: give words like ocean,sea or leave it unset")
    return words


def _read_file(path: str, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise NLAError(f"{what} file {path} does not exist")
    return p.read_text(encoding="utf-8")


@dataclass
class SteerConfig:
    """``nlakit steer``: the vector (text, contrast), how it is added, how it is measured."""

    text: str = required("the explanation to steer towards, e.g. 'The text is about the "
                         "ocean.'")
    contrast: str | None = field(default=None, metadata=hint(
        "steer along AR(text) - AR(contrast) instead of AR(text), e.g. 'The text is about "
        "nothing in particular.'"))
    scale: tuple[float, ...] = field(default=(0.5, 1.0, 2.0), metadata=hint(
        "norms of the added vector as multiples of the mean activation norm "
        "(comma-separated; one table row per value)"))
    mode: str = field(default="prompt_end", metadata=hint(
        "prompt_end (the prompt's last token and every generated token) or all (every "
        "position)"))
    layer: int | None = field(default=None, metadata=hint(
        "block K; must be the NLA's own layer (None: the NLA's)"))
    norm: float | None = field(default=None, metadata=hint(
        "the mean activation norm scale multiplies (None: from --acts, else the NLA's "
        "dataset_stats)"))
    concept_words: tuple[str, ...] | None = field(default=None, metadata=hint(
        "words whose probability and frequency are measured (comma-separated; None: the "
        "content words of text minus stopwords and the contrast's words)"))
    prompts: str | None = field(default=None, metadata=hint(
        "file of neutral prompts, one per line (None: 20 built-in ones)"))
    ppl_text: str | None = field(default=None, metadata=hint(
        "file of held-out text for the perplexity cost (None: a built-in paragraph)"))
    random_controls: int = field(default=3, metadata=hint(
        "random-direction controls (seeds 0..N-1)"))
    samples: int = field(default=4, metadata=hint("sampled continuations per prompt"))
    max_new_tokens: int = field(default=30, metadata=hint("tokens per sampled continuation"))
    logprob_positions: int = field(default=8, metadata=hint(
        "T: positions of the unsteered greedy continuation delta_logp averages over"))
    temperature: float = field(default=1.0, metadata=hint("sampling temperature"))
    top_p: float = field(default=1.0, metadata=hint("nucleus sampling mass"))
    batch_size: int = field(default=32, metadata=hint("prompts per forward / generate call"))
    n_boot: int = field(default=1000, metadata=hint("bootstrap resamples"))
    seed: int = field(default=0, metadata=hint("seed of sampling, random controls, bootstrap"))

    def __post_init__(self):
        checked_text(self.text, "text")
        if self.contrast is not None:
            checked_text(self.contrast, "contrast")
        self.scale = tuple(dict.fromkeys(_numbers("scale", self.scale)))  # one row per value
        if self.mode not in MODES:
            raise NLAError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.norm is not None and not (math.isfinite(self.norm) and self.norm > 0):
            raise NLAError(f"norm must be a positive finite number, got {self.norm}")
        self.concept_words = _word_list(self.concept_words)
        for name in ("samples", "max_new_tokens", "logprob_positions", "batch_size", "n_boot"):
            if getattr(self, name) < 1:
                raise NLAError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.random_controls < 0:
            raise NLAError(f"random_controls must be >= 0, got {self.random_controls}")
        if not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise NLAError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, "
                           f"{self.top_p}")

    def prompt_list(self) -> list[str]:
        if self.prompts is None:
            return list(DEFAULT_PROMPTS)
        lines = [ln.strip() for ln in _read_file(self.prompts, "--prompts").splitlines()]
        lines = [ln for ln in lines if ln]
        if len(lines) < 2:
            raise NLAError(f"--prompts {self.prompts} holds {len(lines)} prompts; the CIs "
                           "resample prompts, so give at least 2 (one per line)")
        return lines

    def held_out_text(self) -> str:
        text = DEFAULT_PPL_TEXT if self.ppl_text is None else _read_file(self.ppl_text,
                                                                         "--ppl-text")
        return checked_text(text, "--ppl-text")


@dataclass
class SteerInputs:
    nla: str = required("NLA directory or shipped name (e.g. smollm2-135m)")
    acts: str | None = field(default=None, metadata=hint(
        "activation store of the NLA's layer: its mean norm and mean direction (None: the "
        "NLA's norm, the prompts' mean direction)"))
    out: str | None = field(default=None, metadata=hint(
        "write steer.json and steer.md here"))
    device: str | None = field(default=None, metadata=hint("cpu, cuda, cuda:N or auto"))
    progress: bool = field(default=True, metadata=hint("show a progress bar"))
