"""The activation verbalizer (AV): a copy of the target that reads one injected vector and writes.

The prompt is one chat user turn holding ``<concept>MARKER</concept>``; a forward hook on the
input-embedding module overwrites the marker's embedding with ``v * s / ||v||`` (s = injection
scale, norm in fp32): see `nlakit.nla.prompt`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from nlakit.errors import NLAError
from nlakit.model.batching import right_pad
from nlakit.nla.prompt import (
    DEFAULT_AV_TEMPLATE,
    Explanation,
    Injection,
    MarkerTokens,
    check_vectors,
    format_target,
    locate_marker,
    parse_explanation,
    render_av_prompt,
)
from nlakit.nla.sampling import fast_generate


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
        self.hedge = 0.0  # `decoding: hedge:`: NLA.explain leaves out claims below it

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
        ids, mask = right_pad(seqs, self.pad_id)
        lab, _ = right_pad(labels, -100)  # -100: no loss on the prompt and the padding
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
