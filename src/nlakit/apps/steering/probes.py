"""The per-prompt measurements of one steering direction: concept log-probability, concept
hits in sampled continuations, and held-out perplexity."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

from nlakit.apps.steering.config import SteerConfig
from nlakit.apps.steering.hook import steer
from nlakit.errors import NLAError


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
    from nlakit.model.hooks import forward_to_layer

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
