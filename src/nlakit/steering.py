"""Steering from text: an explanation -> a vector (the AR) -> added to the target's block K.

The vector. ``AR(text)`` is the AR's reconstruction of an explanation a user writes;
``AR(text) - AR(contrast)`` the contrastive one (the part the two explanations do not share,
e.g. "about the ocean" minus "about nothing in particular"). Only its direction is used: it is
rescaled to ``scale x mean_norm``, mean_norm the mean block-K activation norm of the NLA's
training store (its dataset_stats, or `--acts`, or `--norm`), so scale 1 adds a vector as long
as a typical activation.

The hook. `steer` adds ``scale * vector`` to the output of decoder block K: at every position
(mode "all") or from the prompt's last token on, generated tokens included (mode
"prompt_end"), and removes itself on exit, also when the with-block raises.

The measurement (`measure_steering`, ``nlakit steer``), over neutral prompts, for the steered
vector and every control at every scale, always next to the unsteered model:

  delta_logp  per prompt, mean over the first T positions of the *unsteered* greedy
              continuation (teacher-forced, so steered and unsteered read the same context) of
              log sum_{w in W} P(w | context), W the first tokens of the concept words (with a
              leading space, lower-case and capitalised, word and its stem); steered minus
              unsteered, in nats. > 0: the concept became more likely.
  hit_rate    per prompt, the fraction of N seeded samples (max_new_tokens each) that contain
              a concept word (whole word, case-insensitive, an -s/-es plural allowed). Every
              condition draws with the same seed, so differences are not sampling luck.
  ppl_ratio   perplexity of a held-out paragraph with the vector added at every position
              (but the first in mode "prompt_end", which never steers a prompt's first token),
              divided by the unsteered perplexity: 1 = no cost, >> 1 = steering breaks the model.

CIs are 95% percentile bootstraps over prompts (`metrics.bootstrap_ci`). A verdict per scale
says whether the steered vector beats each control (paired bootstrap of the per-prompt
differences, lower bound > 0).

Controls, always on, each rescaled to the same norm: random directions (seeded Gaussian),
the mean activation direction (the store's mean unit direction with `--acts`, else the mean
block-K activation over the prompts' and paragraph's tokens), and ``AR("")`` (the AR's output
for an empty explanation: what any text gives before it says anything).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import NLAError
from .models import check_layer, d_model, decoder_layers, decoder_stack
from .stages import hint, required

log = logging.getLogger(__name__)

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


# ---- the hook ----------------------------------------------------------------------------------


class _AddVector:
    """Forward hooks that add `delta` [d] to block K's output at positions >= `start`.

    Positions are indices of the whole sequence: a pre-hook on the decoder stack reads how
    many tokens its KV cache already holds, so a generate call's one-token steps continue the
    prompt's numbering instead of restarting at 0."""

    def __init__(self, delta: torch.Tensor, start: int):
        self.delta, self.start, self.offset = delta, start, 0

    def see_cache(self, _module, _args, kwargs):
        cache = kwargs.get("past_key_values")
        seen = getattr(cache, "get_seq_length", None)
        self.offset = int(seen()) if callable(seen) else 0

    def add(self, _module, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        pos = torch.arange(self.offset, self.offset + h.shape[1], device=h.device)
        on = pos >= self.start
        if not bool(on.any()):
            return None
        h = h.clone()
        h[:, on] += self.delta.to(device=h.device, dtype=h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h


def _checked_delta(model, vector, layer, scale) -> torch.Tensor:
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise NLAError(f"steer: layer must be a block index (int), got {layer!r}")
    check_layer(model, layer)
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise NLAError(f"steer: scale must be a number, got {scale!r}") from None
    if not math.isfinite(scale):
        raise NLAError(f"steer: scale must be a finite number, got {scale!r}")
    v = torch.as_tensor(vector).detach().float().cpu()
    d = d_model(model)
    if v.shape != (d,):
        raise NLAError(f"steer: the vector has shape {tuple(v.shape)}, but block {layer}'s "
                       f"output has d_model {d}; pass one vector of {d} numbers")
    if not torch.isfinite(v).all():
        raise NLAError("steer: the vector holds NaN or inf")
    return scale * v


@contextlib.contextmanager
def steer(model, vector, layer: int, scale: float = 1.0, *, start: int = 0):
    """Inside the with-block, the output of decoder block `layer` of `model` is
    ``h + scale * vector`` at every position >= `start` (an index of the whole sequence,
    counted on across a generate call's cached steps; 0: every position) and untouched before.

    For "from the prompt's last token on" in a left-padded batch, start = padded prompt length
    - 1. vector: [d_model]. The hooks are removed on exit, also when the block raises."""
    delta = _checked_delta(model, vector, layer, scale)
    hook = _AddVector(delta, int(start))
    handles = [decoder_stack(model).register_forward_pre_hook(hook.see_cache,
                                                              with_kwargs=True)]
    try:
        handles.append(decoder_layers(model)[layer].register_forward_hook(hook.add))
        yield hook
    finally:
        for handle in handles:
            handle.remove()


# ---- vectors from text ---------------------------------------------------------------------------


def _text(text, what: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise NLAError(f"{what} is empty: write the explanation to steer towards, e.g. "
                       "\"The text is about the ocean.\"")
    return text


def text_vector(nla, text: str, contrast: str | None = None) -> torch.Tensor:
    """[d] ``AR(text)``, or ``AR(text) - AR(contrast)`` when a contrast is given (not rescaled)."""
    texts = [_text(text, "text")] + ([_text(contrast, "contrast")] if contrast is not None
                                     else [])
    rec = nla.reconstruct(texts).float()
    v = rec[0] - rec[1] if contrast is not None else rec[0]
    if not float(v.norm()) > 0:
        raise NLAError("the steering vector is zero (text and contrast read the same); "
                       "write two explanations that differ")
    return v


def unit(v: torch.Tensor) -> torch.Tensor:
    """[d] v / ||v|| in float32 (a zero vector is an NLAError: it has no direction)."""
    from .metrics import unit as unit_rows

    return unit_rows(v.float())[0]


def control_directions(d: int, mean_direction: torch.Tensor, empty: torch.Tensor,
                       n_random: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unit [d] directions of the controls: random_i (seeded Gaussian), mean_direction,
    ar_empty (the AR's reading of an empty explanation)."""
    out = {}
    for i in range(n_random):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        out[f"random_{i}"] = unit(torch.randn(d, generator=g))
    out["mean_direction"] = unit(mean_direction)
    out["ar_empty"] = unit(empty)
    return out


# ---- concept words -------------------------------------------------------------------------------


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


# ---- configuration -------------------------------------------------------------------------------


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
        _text(self.text, "text")
        if self.contrast is not None:
            _text(self.contrast, "contrast")
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
        return _text(text, "--ppl-text")


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


# ---- the measurements ----------------------------------------------------------------------------


@dataclass
class _Batch:
    """Left-padded prompts (every prompt ends at index width - 1) and their unsteered greedy
    continuations [b, T]."""

    enc: dict
    greedy: torch.Tensor

    @property
    def width(self) -> int:
        return self.enc["input_ids"].shape[1]


def _encode(tok, prompts: list[str], device) -> dict:
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    return {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def _prepare(model, tok, prompts: list[str], config: SteerConfig) -> list[_Batch]:
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), config.batch_size):
        enc = _encode(tok, prompts[i:i + config.batch_size], device)
        t = config.logprob_positions
        # min_new_tokens: every row has T tokens to read (an early EOS would leave padding)
        ids = model.generate(**enc, do_sample=False, max_new_tokens=t, min_new_tokens=t,
                             pad_token_id=tok.pad_token_id)
        out.append(_Batch(enc, ids[:, enc["input_ids"].shape[1]:]))
    return out


def _steered(model, layer, delta, start):
    return steer(model, delta, layer, 1.0, start=start) if delta is not None \
        else contextlib.nullcontext()


@torch.no_grad()
def concept_logp(model, layer: int, batch: _Batch, token_ids, delta, start) -> torch.Tensor:
    """[b] mean over T positions of log sum_{w} P(w): the first T next-token distributions
    after the prompt, on the unsteered greedy continuation (teacher-forced)."""
    t = batch.greedy.shape[1]
    ids = torch.cat([batch.enc["input_ids"], batch.greedy[:, :t - 1]], 1)
    mask = torch.cat([batch.enc["attention_mask"], torch.ones_like(batch.greedy[:, :t - 1])], 1)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate numbers left-padded rows
    with _steered(model, layer, delta, start):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                       use_cache=False).logits
    lp = logits[:, batch.width - 1:].float().log_softmax(-1)
    w = torch.as_tensor(list(token_ids), device=lp.device)
    return lp[..., w].logsumexp(-1).mean(-1).cpu()


@torch.no_grad()
def concept_hits(model, tok, layer: int, batch: _Batch, pattern: re.Pattern, delta, start,
                 config: SteerConfig, seed: int) -> torch.Tensor:
    """[b] fraction of `samples` sampled continuations per prompt that name a concept word."""
    n = config.samples
    with torch.random.fork_rng(devices=[]), _steered(model, layer, delta, start):
        torch.manual_seed(seed)  # the same draws for every condition
        ids = model.generate(**batch.enc, do_sample=True, temperature=config.temperature,
                             top_p=config.top_p, top_k=0, num_return_sequences=n,
                             max_new_tokens=config.max_new_tokens,
                             pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(ids[:, batch.width:], skip_special_tokens=True)
    hits = torch.tensor([bool(pattern.search(s)) for s in texts], dtype=torch.float32)
    return hits.reshape(-1, n).mean(1)


@torch.no_grad()
def perplexity(model, layer: int, ids: torch.Tensor, delta, start: int = 0) -> float:
    """exp(mean next-token NLL) of ids [1, t], the vector added at positions >= start."""
    with _steered(model, layer, delta, start):
        logits = model(input_ids=ids, use_cache=False).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    return float(nll.exp())


@torch.no_grad()
def prompt_mean_direction(model, tok, layer: int, texts: list[str]) -> torch.Tensor:
    """[d] mean block-K activation over the tokens of `texts` (position 0 left out: the first
    token's activation is an outlier, an attention sink, in many models)."""
    from .models import forward_to_layer

    device = next(model.parameters()).device
    total, count = None, 0
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"].to(device)
        h = forward_to_layer(model, ids, torch.ones_like(ids), layer)[0, 1:].float()
        total = h.sum(0) if total is None else total + h.sum(0)
        count += h.shape[0]
    if not count:
        raise NLAError("the prompts are too short to take a mean activation from")
    return (total / count).cpu()


# ---- the whole measurement -----------------------------------------------------------------------


@dataclass
class SteerReport:
    """The measured table: `rows` (one per vector and scale, plus the unsteered model), the
    paired comparisons of the steered vector with each control, a verdict per scale."""

    setup: dict
    rows: list[dict]
    comparisons: list[dict]
    verdicts: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Bench:
    """What every condition is measured on: the prompts' batches, the concept's tokens and
    pattern, the held-out text."""

    model: object
    tok: object
    layer: int
    batches: list[_Batch]
    token_ids: dict[int, str]
    pattern: re.Pattern
    ppl_ids: torch.Tensor
    config: SteerConfig

    @classmethod
    def build(cls, model, tok, layer, prompts, ppl_text, words, config) -> _Bench:
        ppl_ids = tok(ppl_text, return_tensors="pt")["input_ids"]
        return cls(model, tok, layer, _prepare(model, tok, prompts, config),
                   concept_token_ids(tok, words), concept_pattern(words),
                   ppl_ids.to(next(model.parameters()).device), config)

    @property
    def ppl_start(self) -> int:
        # prompt_end never steers a prompt's first token (the attention sink of many models),
        # so neither does its ppl: every token but the first; "all" steers every token
        return 1 if self.config.mode == "prompt_end" else 0

    def measure(self, delta: torch.Tensor | None, base: dict | None = None) -> dict:
        """Per-prompt logp and hit_rate [n], the paragraph's ppl, with `delta` [d] added
        (None: unsteered); delta_logp against `base` (the unsteered measurement)."""
        cfg = self.config
        starts = [b.width - 1 if cfg.mode == "prompt_end" else 0 for b in self.batches]
        logp = torch.cat([concept_logp(self.model, self.layer, b, self.token_ids, delta, t)
                          for b, t in zip(self.batches, starts)])
        hits = torch.cat([concept_hits(self.model, self.tok, self.layer, b, self.pattern, delta,
                                       t, cfg, cfg.seed + i)
                          for i, (b, t) in enumerate(zip(self.batches, starts))])
        return {"logp": logp, "delta_logp": logp - (logp if base is None else base["logp"]),
                "hit_rate": hits, "ppl": perplexity(self.model, self.layer, self.ppl_ids, delta,
                                                    self.ppl_start),
                "added_norm": 0.0 if delta is None else float(delta.norm())}


def _ci(values, config) -> dict:
    from .metrics import bootstrap_ci

    return bootstrap_ci(values, n_boot=config.n_boot, seed=config.seed)


def _verdict(metric: str, diffs: list[dict]) -> str:
    if not diffs:
        return f"{metric}: no controls"
    worst = min(diffs, key=lambda d: d["ci"][0])
    gap = f"{worst['mean']:+.3f} [{worst['ci'][0]:+.3f}, {worst['ci'][1]:+.3f}]"
    lost = [d["control"] for d in diffs if not d["ci"][0] > 0]
    if lost:
        return f"{metric}: does NOT beat {', '.join(lost)} (vs {worst['control']}: {gap})"
    return f"{metric}: beats every control (closest {worst['control']}: {gap})"


def _compare(per: dict, scales, controls, config) -> tuple[list[dict], list[str]]:
    """Paired bootstrap over prompts of steered minus each control, per scale and metric."""
    comparisons, verdicts = [], []
    for s in scales:
        line = []
        for metric in ("delta_logp", "hit_rate"):
            diffs = [{"scale": s, "metric": metric, "control": c,
                      **_ci(per[("steered", s)][metric] - per[(c, s)][metric], config)}
                     for c in controls]
            comparisons += diffs
            line.append(_verdict(metric, diffs))
        verdicts.append(f"scale {s:g}: " + "; ".join(line))
    return comparisons, verdicts


# The text the ar_empty control reads. On a bare ``{explanation}`` template with no BOS the AR
# reads it as one special token (`Reconstructor.encode`).
EMPTY_EXPLANATION = ""


def _directions(nla, config, steered, mean_direction) -> dict[str, torch.Tensor]:
    empty = nla.reconstruct([EMPTY_EXPLANATION])[0]
    return {"steered": unit(steered), **control_directions(
        nla.d_model, mean_direction, empty, config.random_controls, config.seed)}


def _norm_for(nla, config: SteerConfig, norm: float | None) -> float:
    if config.layer is not None and config.layer != nla.layer:
        raise NLAError(_layer_message(config.layer, nla.layer))
    norm = norm or config.norm or nla.dataset_stats.get("mean_norm")
    if not norm:
        raise NLAError(_NO_NORM)
    return float(norm)


def _given_vector(vector, d: int) -> torch.Tensor:
    v = torch.as_tensor(vector).detach().float().cpu()
    if v.shape != (d,) or not torch.isfinite(v).all() or not float(v.norm()) > 0:
        raise NLAError(f"vector= must be one finite, non-zero vector of d_model {d} numbers, "
                       f"got shape {tuple(v.shape)}")
    return v


def measure_steering(nla, config: SteerConfig, *, norm: float | None = None,
                     mean_direction: torch.Tensor | None = None, vector=None,
                     progress: bool = False) -> SteerReport:
    """Steer the NLA's target with AR(text) [- AR(contrast)] and every control at every scale
    and measure delta_logp, hit_rate and ppl_ratio (module doc) against the unsteered model.

    norm: the mean activation norm (None: config.norm, else the NLA's dataset_stats);
    mean_direction: [d] (None: the mean block-K activation over the prompts and paragraph);
    vector: [d] steer along this instead of the AR's reading (a reference to compare the AR's
    vector with, e.g. a difference of the target's own activations); the text then only
    names the concept words."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    norm = _norm_for(nla, config, norm)
    prompts, ppl_text = config.prompt_list(), config.held_out_text()
    words = config.concept_words or default_concept_words(config.text, config.contrast)
    model, tok = nla.target()
    steered = (text_vector(nla, config.text, config.contrast) if vector is None
               else _given_vector(vector, nla.d_model))
    given_mean = mean_direction is not None
    if not given_mean:
        mean_direction = prompt_mean_direction(model, tok, nla.layer, [*prompts, ppl_text])
    dirs = _directions(nla, config, steered, mean_direction)
    bench = _Bench.build(model, tok, nla.layer, prompts, ppl_text, words, config)

    per = {("unsteered", 0.0): bench.measure(None)}
    for name, s in tqdm([(k, s) for s in config.scale for k in dirs], desc="steer",
                        disable=not progress):
        per[(name, s)] = bench.measure(dirs[name] * (s * norm), per[("unsteered", 0.0)])
    base_ppl = per[("unsteered", 0.0)]["ppl"]
    rows = [_row(name, s, v, dirs, base_ppl, config) for (name, s), v in per.items()]
    comparisons, verdicts = _compare(per, config.scale, [k for k in dirs if k != "steered"],
                                     config)
    setup = {"model": nla.target_info.get("spec"), "layer": nla.layer, "text": config.text,
             "contrast": config.contrast, "vector": "AR" if vector is None else "given",
             "mode": config.mode, "mean_norm": norm,
             "concept_words": list(words), "concept_tokens": sorted(bench.token_ids.values()),
             "prompts": len(prompts), "unsteered_ppl": base_ppl,
             "ar_empty_reads": EMPTY_EXPLANATION,
             "mean_direction_from": "store" if given_mean else "prompts and paragraph",
             "steered_vector_norm_before_rescaling": float(steered.norm()),
             "config": asdict(config), "seconds": round(time.perf_counter() - t0, 1)}
    return SteerReport(setup, rows, comparisons, verdicts)


def _row(name, s, values, dirs, base_ppl, config) -> dict:
    cos = float(dirs[name] @ dirs["steered"]) if name in dirs else None
    return {"vector": name, "scale": s, "added_norm": values["added_norm"],
            "cos_to_steered": cos, "logp": _ci(values["logp"], config),
            "delta_logp": _ci(values["delta_logp"], config),
            "hit_rate": _ci(values["hit_rate"], config), "ppl": values["ppl"],
            "ppl_ratio": values["ppl"] / base_ppl}


# ---- output --------------------------------------------------------------------------------------


def format_steer(report: SteerReport | dict) -> str:
    """The report as Markdown: setup, the table, the verdicts."""
    r = report.to_dict() if isinstance(report, SteerReport) else report
    su = r["setup"]

    def cell(c):
        return f"{c['mean']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"

    contrast = f" minus AR({su['contrast']!r})" if su["contrast"] else ""
    along = (f"AR({su['text']!r}){contrast}" if su.get("vector", "AR") == "AR"
             else "a given vector")
    md = [f"Steering {su['model']} block {su['layer']} ({su['mode']}) along {along}; "
          f"scale x mean norm {su['mean_norm']:.1f}; {su['prompts']} prompts; "
          f"concept words {', '.join(su['concept_words'])} (tokens "
          f"{', '.join(repr(t) for t in su['concept_tokens'])}); 95% bootstrap CIs over prompts.",
          "", "| vector | scale | added norm | cos to steered | delta_logp (nats) [95% CI] | "
          "hit_rate [95% CI] | ppl_ratio |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        cos = "" if row["cos_to_steered"] is None else f"{row['cos_to_steered']:+.3f}"
        md.append(f"| {row['vector']} | {row['scale']:g} | {row['added_norm']:.1f} | {cos} | "
                  f"{cell(row['delta_logp'])} | {cell(row['hit_rate'])} | "
                  f"{row['ppl_ratio']:.3f} |")
    md += ["", f"Unsteered: log P(concept tokens) {r['rows'][0]['logp']['mean']:+.3f} per "
           f"position, perplexity {su['unsteered_ppl']:.2f}. Verdicts (paired bootstrap over "
           "prompts, steered minus control; beats = lower bound > 0):", ""]
    md += [f"- {v}" for v in r["verdicts"]]
    return "\n".join(md)


def write_report(report: SteerReport, out: str | Path) -> tuple[Path, Path]:
    """OUT/steer.json and OUT/steer.md, each written atomically."""
    from .fileio import write_json, write_text_atomic

    out = Path(out)
    write_json(out / "steer.json", report.to_dict())
    write_text_atomic(out / "steer.md", format_steer(report) + "\n")
    return out / "steer.json", out / "steer.md"


def _store_facts(acts: str) -> tuple[float, torch.Tensor, int]:
    from .store import ActivationStore

    store = ActivationStore(acts)
    return float(store.stats("all")["mean_norm"]), store.mean_unit_direction("all"), store.layer


def _check_before_loading(config: SteerConfig, inputs: SteerInputs, has_norm: bool) -> None:
    """The layer and the norm, read from the AR's nla_meta.yaml before any model is loaded
    (a malformed directory is left to NLA.load, which says what is wrong)."""
    from .checkpoint import read_meta
    from .shipped import resolve

    try:
        meta = read_meta((resolve(inputs.nla) or Path(inputs.nla)) / "ar", "ar")
    except NLAError:
        return
    layer = meta.get("extraction", {}).get("layer")
    if config.layer is not None and layer is not None and int(layer) != config.layer:
        raise NLAError(_layer_message(config.layer, int(layer)))
    stats = meta.get("nlakit", {}).get("dataset_stats", {}) or {}
    if not has_norm and not stats.get("mean_norm"):
        raise NLAError(_NO_NORM)


def _layer_message(asked: int, layer: int) -> str:
    return (f"--layer {asked}: this NLA's AR rebuilds block {layer} only, so its vectors "
            f"belong there; drop --layer or use an NLA of block {asked} (a raw vector can go "
            "to any block with nlakit.steer)")


_NO_NORM = ("this NLA records no mean activation norm (dataset_stats.mean_norm); pass --norm "
            "or --acts")


def run_steer(config: SteerConfig, inputs: SteerInputs) -> SteerReport:
    """``nlakit steer``: load the NLA (and the store), measure, write OUT/steer.json and .md."""
    from .nla import NLA

    config.prompt_list(), config.held_out_text()  # a missing file fails before any loading
    norm, mean_direction, store_layer = config.norm, None, None
    if inputs.acts:
        store_norm, mean_direction, store_layer = _store_facts(inputs.acts)
        norm = norm or store_norm
    _check_before_loading(config, inputs, norm is not None)
    nla = NLA.load(inputs.nla, device=inputs.device)
    if store_layer is not None and store_layer != nla.layer:
        raise NLAError(f"--acts {inputs.acts} holds block {store_layer}, the NLA reads block "
                       f"{nla.layer}; pass the store of the NLA's layer")
    report = measure_steering(nla, config, norm=norm, mean_direction=mean_direction,
                              progress=inputs.progress)
    if inputs.out:
        write_report(report, inputs.out)
    return report


__all__ = ["DEFAULT_PPL_TEXT", "DEFAULT_PROMPTS", "SteerConfig", "SteerInputs", "SteerReport",
           "concept_pattern", "concept_token_ids", "control_directions",
           "default_concept_words", "format_steer", "measure_steering", "run_steer", "steer",
           "text_vector", "write_report"]
