"""The activation verbalizer (AV): a copy of the target that reads one injected vector and writes.

The prompt is one chat user turn holding ``<concept>MARKER</concept>``; a forward hook on the
input-embedding module overwrites the marker's embedding with ``v * s / ||v||`` (s = injection
scale, norm in fp32). The hook sits on the embedding module's *output*, after any architecture
embed scale (Gemma multiplies by sqrt(d) inside that module), so the injected vector is in
residual-stream units. The marker is injected only where both neighbour tokens match the stored
ids: a template or tokenizer drift fails loudly instead of silently describing the marker.
"""

from __future__ import annotations

import contextlib
import math
import warnings
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


class Verbalizer:
    """AV model + tokenizer + marker + scale: builds batches, computes SFT loss, generates."""

    def __init__(self, model: nn.Module, tokenizer, marker: MarkerTokens, injection_scale: float,
                 template: str = DEFAULT_AV_TEMPLATE):
        self.model, self.tokenizer, self.marker = model, tokenizer, marker
        self.template, self.injection_scale = template, float(injection_scale)
        self.prompt_ids = render_av_prompt(tokenizer, template, marker.char)
        locate_marker(self.prompt_ids, marker)  # verify against the live tokenizer
        self.injection = Injection(model, marker, injection_scale)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        # The checkpoint's own decoding settings (nla_meta.yaml `decoding:`), used unless a call
        # overrides them: a small AV can fall into repetition loops under plain greedy decoding.
        self.decoding = {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0}

    @property
    def d_model(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def sft_batch(self, explanations: list[str], max_response_tokens: int = 128) -> dict:
        """Prompt + target ids, right-padded; labels are -100 except on response tokens."""
        seqs, labels = [], []
        for text in explanations:
            resp = self.tokenizer(format_target(text), add_special_tokens=False)["input_ids"]
            resp = resp[: max_response_tokens - 1] + [self.eos_id]
            seqs.append(self.prompt_ids + resp)
            labels.append([-100] * len(self.prompt_ids) + resp)
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, lb) in enumerate(zip(seqs, labels)):
            ids[i, : len(s)] = torch.tensor(s)
            lab[i, : len(lb)] = torch.tensor(lb)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}

    def sft_loss(self, vectors: torch.Tensor, batch: dict, model: nn.Module | None = None):
        """Mean response-token cross-entropy with `vectors` injected. `model` may be a wrapper
        (DDP/peft) of self.model."""
        model = model or self.model
        dev = self.device
        with self.injection.active(vectors.to(dev)):
            out = model(input_ids=batch["input_ids"].to(dev),
                        attention_mask=batch["attention_mask"].to(dev),
                        labels=batch["labels"].to(dev), use_cache=False)
        return out.loss

    def decoding_settings(self, no_repeat_ngram_size: int | None = None,
                          repetition_penalty: float | None = None) -> dict:
        """The decoding settings a call uses: its own where given, else the checkpoint's."""
        ngram = self.decoding["no_repeat_ngram_size"] if no_repeat_ngram_size is None \
            else no_repeat_ngram_size
        penalty = self.decoding["repetition_penalty"] if repetition_penalty is None \
            else repetition_penalty
        if int(ngram) < 0 or float(penalty) <= 0:
            raise NLAError(f"need no_repeat_ngram_size >= 0 and repetition_penalty > 0, "
                           f"got {ngram}, {penalty}")
        return {"no_repeat_ngram_size": int(ngram), "repetition_penalty": float(penalty)}

    def plain_greedy(self, decoding: dict) -> bool:
        """Whether HF's greedy decoding here is argmax with at most the n-gram ban: then the
        faster loop of `fast_generate` writes the same tokens. A model whose generation_config
        adds other processors (a repetition penalty, beams, banned words...) keeps HF's path."""
        if decoding["repetition_penalty"] != 1.0:
            return False
        gc = getattr(self.model, "generation_config", None)
        if gc is None:
            return True
        neutral = {"repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
                   "num_beams": (None, 1), "penalty_alpha": (None,), "bad_words_ids": (None,),
                   "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
                   "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
                   "min_new_tokens": (None, 0), "min_length": (None, 0),
                   "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0),
                   "exponential_decay_length_penalty": (None,), "dola_layers": (None,)}
        return all(getattr(gc, key, None) in ok for key, ok in neutral.items())

    @torch.no_grad()
    def generate(self, vectors, *, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 max_new_tokens: int = 150, batch_size: int = 32,
                 seed: int | None = None, no_repeat_ngram_size: int | None = None,
                 repetition_penalty: float | None = None,
                 sampler: str = "auto") -> list[Explanation]:
        """Explanations for each vector, n samples each (row-major: vector 0's n samples first).

        temperature 0 means greedy. All prompts have the same length (only the injected vector
        differs), so batches need no padding; generation uses the KV cache from inputs_embeds.
        no_repeat_ngram_size / repetition_penalty default to `self.decoding` (0 / 1.0 = off);
        both see only the response tokens (the prompt goes in as embeddings).
        sampler "auto": greedy runs `fast_generate`'s loop (shared prompt prefix once, finished
        rows leave the batch; the same tokens) where `plain_greedy` holds, else and for sampling
        HF `generate`; "hf": always HF `generate`.
        """
        v = check_vectors(vectors, self.d_model)
        if n < 1 or max_new_tokens < 1 or batch_size < 1:
            raise NLAError("n, max_new_tokens and batch_size must be >= 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise NLAError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
        if sampler not in ("auto", "hf"):
            raise NLAError(f"sampler must be 'auto' or 'hf', got {sampler!r}")
        decoding = self.decoding_settings(no_repeat_ngram_size, repetition_penalty)
        if sampler == "auto" and temperature == 0 and self.plain_greedy(decoding):
            from nlakit.nla.sampling import fast_generate  # it builds on this module

            return fast_generate(self, v, n=n, temperature=0.0, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size,
                                 no_repeat_ngram_size=decoding["no_repeat_ngram_size"])
        v = v.repeat_interleave(n, dim=0)
        if seed is not None:
            torch.manual_seed(seed)
        embed = self.model.get_input_embeddings()
        results: list[Explanation] = []
        for start in range(0, v.shape[0], batch_size):
            chunk = v[start : start + batch_size]
            ids = torch.tensor([self.prompt_ids] * chunk.shape[0], device=self.device)
            mask = torch.ones_like(ids)
            with self.injection.active(chunk):
                embeds = embed(ids)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) \
                if temperature > 0 else dict(do_sample=False)
            with warnings.catch_warnings():  # "n-gram constraints only on new tokens": wanted
                warnings.filterwarnings("ignore", message=".*no_repeat_ngram_size.*")
                out = self.model.generate(
                    inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                    eos_token_id=self.eos_id, pad_token_id=self.pad_id, **sampling, **decoding,
                )
            for row in out.tolist():
                n_tok = next((i + 1 for i, t in enumerate(row) if t == self.eos_id), len(row))
                raw = self.tokenizer.decode(row[:n_tok], skip_special_tokens=True)
                text, complete = parse_explanation(raw)
                hit_cap = n_tok >= max_new_tokens and row[n_tok - 1] != self.eos_id
                results.append(Explanation(text, complete, raw, n_tok, hit_cap, row[:n_tok]))
        return results
