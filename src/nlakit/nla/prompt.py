"""The AV's prompt and the explanation format: the chat template holding the marker, the marker's
neighbour tokens, the injection hook that overwrites the marker's embedding with the scaled
vector, and the ``<explanation>`` tags an AV writes between.

The hook sits on the embedding module's *output*, after any architecture embed scale (Gemma
multiplies by sqrt(d) inside that module), so the injected vector is in residual-stream units.
The marker is injected only where both neighbour tokens match the stored ids: a template or
tokenizer drift fails loudly instead of silently describing the marker.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from nlakit.errors import NLAError

DEFAULT_AV_TEMPLATE = (
    "Here is an internal activation of a language model: <concept>{injection_char}</concept>\n"
    "Explain what the model is thinking about at this point, inside <explanation> tags."
)
OPEN_TAG, CLOSE_TAG = "<explanation>", "</explanation>"
# Candidate marker characters, tried rarest-first (highest token id); any single-token one works.
# ASCII symbols come last: byte-level vocabularies always have them as single tokens.
MARKER_CANDIDATES = "µ±ß¬ðøæ§†®©™°•¤¶‡※◈⁂∴¢¥~^`|@$"


@dataclass(frozen=True)
class MarkerTokens:
    """The injection marker and the ids of its neighbours inside the canonical AV prompt."""

    char: str
    token_id: int
    left_id: int
    right_id: int


def render_av_prompt(tokenizer, template: str, char: str) -> list[int]:
    """Token ids of the AV prompt: the template as one user turn, chat-templated with the
    generation prompt, tokenized in one step (the template supplies BOS, never twice)."""
    if "{injection_char}" not in template:
        raise NLAError("the AV prompt template must contain the placeholder {injection_char}")
    content = template.format(injection_char=char)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(content + "\n", add_special_tokens=True)["input_ids"]


def locate_marker(ids: list[int], marker: MarkerTokens) -> int:
    """Index of the single marker in `ids` with both neighbours matching; NLAError otherwise."""
    hits = [i for i, t in enumerate(ids) if t == marker.token_id]
    if len(hits) != 1:
        raise NLAError(f"marker {marker.char!r} (id {marker.token_id}) appears {len(hits)} times "
                       "in the AV prompt; expected exactly once")
    i = hits[0]
    if i == 0 or i + 1 >= len(ids) or ids[i - 1] != marker.left_id or ids[i + 1] != marker.right_id:
        found = (ids[i - 1] if i > 0 else None, ids[i + 1] if i + 1 < len(ids) else None)
        raise NLAError(f"marker neighbours are {found}, expected ({marker.left_id}, "
                       f"{marker.right_id}): the template or tokenizer differs from the one the "
                       "AV was trained with")
    return i


def marker_for(tokenizer, template: str, char: str) -> MarkerTokens:
    """Measure a marker character's ids in the canonical prompt; NLAError if it is unusable."""
    ids = tokenizer(char, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise NLAError(f"marker {char!r} is {len(ids)} tokens in this tokenizer; it must be one")
    prompt = render_av_prompt(tokenizer, template, char)
    hits = [i for i, t in enumerate(prompt) if t == ids[0]]
    if len(hits) != 1:
        raise NLAError(f"marker {char!r} appears {len(hits)} times in the prompt; must be once")
    i = hits[0]
    left, right = tokenizer.decode([prompt[i - 1]]), tokenizer.decode([prompt[i + 1]])
    if not left.endswith(">") or not right.startswith("<"):
        raise NLAError(f"marker {char!r} merges with its neighbours ({left!r}, {right!r}); "
                       "choose another character")
    return MarkerTokens(char, ids[0], prompt[i - 1], prompt[i + 1])


def choose_marker(tokenizer, template: str = DEFAULT_AV_TEMPLATE,
                  override: str | None = None) -> MarkerTokens:
    """The rarest candidate character that is one token with stable neighbours (or `override`)."""
    if override is not None:
        return marker_for(tokenizer, template, override)
    usable = []
    for char in MARKER_CANDIDATES:
        if char in template.replace("{injection_char}", ""):
            continue  # the marker must appear once: not a character the template already uses
        try:
            usable.append(marker_for(tokenizer, template, char))
        except NLAError:
            continue
    if not usable:
        raise NLAError("no candidate marker character is a single stable token in this "
                       "tokenizer; pass a marker override")
    return max(usable, key=lambda m: m.token_id)  # highest BPE id ~ rarest merge


def nice_injection_scale(mean_norm: float) -> float:
    """A round number a bit above the mean norm (233 -> 250, 140 -> 150, 71000 -> 80000)."""
    if not mean_norm > 0:
        raise NLAError(f"mean norm must be positive, got {mean_norm}")
    target = mean_norm * 1.05
    step = 10 ** math.floor(math.log10(target)) / 2
    return float(math.ceil(target / step) * step)


def check_vectors(vectors, d_model: int) -> torch.Tensor:
    """[n, d] float32 vectors, or NLAError for wrong size, NaN/inf or zero vectors."""
    v = torch.as_tensor(vectors)
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[1] != d_model:
        raise NLAError(f"expected vectors of size {d_model} (shape [n, {d_model}]), got shape "
                       f"{tuple(v.shape)}")
    v = v.float()
    if not torch.isfinite(v).all():
        raise NLAError("vectors hold NaN or inf values")
    if (v.norm(dim=-1) == 0).any():
        raise NLAError("a vector is all zeros; it has no direction to explain")
    return v


class Injection:
    """A forward hook on the input embeddings that writes `vectors` at each row's marker."""

    def __init__(self, model: nn.Module, marker: MarkerTokens, scale: float):
        self.model, self.marker, self.scale = model, marker, float(scale)
        self.vectors: torch.Tensor | None = None

    def _hook(self, _module, args, output):
        if self.vectors is None:
            return None
        ids = args[0] if args else None
        if ids is None or ids.ndim != 2 or ids.shape[1] < 3:
            return None  # a decoding step: the prompt (and marker) is already in the KV cache
        m = self.marker
        hit = (ids[:, 1:-1] == m.token_id) & (ids[:, :-2] == m.left_id) & (ids[:, 2:] == m.right_id)
        counts = hit.sum(1)
        if not bool((counts == 1).all()):
            raise NLAError(f"injection marker with matching neighbours found {counts.tolist()} "
                           "times per row; expected exactly once in every row")
        if self.vectors.shape[0] != ids.shape[0]:
            raise NLAError(f"{self.vectors.shape[0]} vectors for a batch of {ids.shape[0]} rows")
        rows, cols = hit.nonzero(as_tuple=True)
        v = self.vectors.to(device=output.device, dtype=torch.float32)
        v = v / v.norm(dim=-1, keepdim=True) * self.scale
        output = output.clone()
        output[rows, cols + 1] = v[rows].to(output.dtype)
        return output

    @contextlib.contextmanager
    def active(self, vectors: torch.Tensor) -> Iterator[None]:
        handle = self.model.get_input_embeddings().register_forward_hook(self._hook)
        self.vectors = vectors
        try:
            yield
        finally:
            self.vectors = None
            handle.remove()


@dataclass
class Explanation:
    text: str  # the explanation body (inside the tags)
    complete: bool  # the closing tag was written
    raw: str  # everything the AV generated
    n_tokens: int  # generated tokens
    hit_cap: bool = False  # stopped by max_new_tokens
    token_ids: list[int] | None = None  # the generated ids (incl. a final EOS), for RL


def parse_explanation(raw: str) -> tuple[str, bool]:
    """(body, complete): text between <explanation> and </explanation>; complete iff closed."""
    start = raw.find(OPEN_TAG)
    body_start = start + len(OPEN_TAG) if start >= 0 else 0
    end = raw.find(CLOSE_TAG, body_start)
    if end < 0:
        return raw[body_start:].strip(), False
    return raw[body_start:end].strip(), True


def format_target(explanation: str) -> str:
    """The response text the AV is trained to write for a label."""
    return f"{OPEN_TAG}\n{explanation.strip()}\n{CLOSE_TAG}"
