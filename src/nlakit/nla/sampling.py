"""Rollouts and their log-probabilities for RL: sampling G explanations per activation from the
AV, and the teacher-forced log-probs of those tokens under the policy or the reference.

There is one rollout path, `sample_rollouts` (= `fast_generate`): it samples exactly from
softmax(logits / temperature) restricted to the top-p nucleus, the distribution whose log-probs
`response_logprobs` computes for the policy loss. `Verbalizer.generate` (HF `generate`) is not
used for rollouts: it also applies the model's own ``generation_config`` (e.g. Qwen2.5-Instruct
ships top_k 20 and a repetition penalty), so its samples would come from another distribution
than the one the ratio and the KL assume. Its greedy output is the same token for token (tested).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from nlakit.errors import NLAError
from nlakit.model.arch import returned_cache, with_cache
from nlakit.nla.prompt import Explanation, check_vectors, locate_marker, parse_explanation

if TYPE_CHECKING:
    from nlakit.nla.verbalizer import Verbalizer


def token_prefixes(tokenizer, texts: list[str], lengths: torch.Tensor) -> list[str]:
    """The first lengths[i] tokens of each text (matryoshka truncation)."""
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(ids[: int(n)]) for ids, n in zip(enc, lengths)]


def shared_prefix_len(av: Verbalizer) -> int:
    """Prompt tokens before the marker's left neighbour. They are the same in every row and,
    under causal attention, never see the injected vector: computing them once for the whole
    batch (and repeating their KV cache) gives exactly the per-row result."""
    return max(0, locate_marker(av.prompt_ids, av.marker) - 1)


def _prefix_cache(model, av: Verbalizer, rows: int):
    """(KV cache of the shared prompt prefix repeated for `rows` rows, prefix length); gradients
    flow through it when enabled."""
    k = shared_prefix_len(av)
    if k == 0:
        return None, 0
    prompt = torch.tensor(av.prompt_ids[:k], device=av.device)[None]
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    cache = returned_cache(out)
    cache.batch_repeat_interleave(rows)
    return cache, k


def response_logprobs(model, av: Verbalizer, vectors: torch.Tensor, resp: torch.Tensor,
                      resp_mask: torch.Tensor, temperature: float = 1.0,
                      shared_prefix: bool = True) -> torch.Tensor:
    """Log-probabilities [n, T] of the response tokens under `model` (the AV or a wrapper of
    it) with `vectors` [n, d] injected: a teacher-forced pass over prompt + response. All
    prompts are the same length, responses are right-padded; padding gets log-prob 0. Only the
    T + 1 last positions go through the LM head; with `shared_prefix` the prompt tokens before
    the marker run once for the whole batch."""
    dev = av.device
    n, width = resp.shape
    cache, k = _prefix_cache(model, av, n) if shared_prefix else (None, 0)
    prompt = torch.tensor(av.prompt_ids, device=dev).expand(n, -1)
    ids = torch.cat([prompt[:, k:], resp.to(dev)], 1)
    mask = torch.cat([torch.ones_like(prompt), resp_mask.to(dev)], 1)  # covers the prefix too
    extra = {**with_cache(cache), "use_cache": True} if cache is not None \
        else {"use_cache": False}
    with av.injection.active(vectors.to(dev)):
        out = model(input_ids=ids, attention_mask=mask, logits_to_keep=width + 1, **extra)
    logits = out.logits[:, -(width + 1) : -1].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), resp.to(dev).reshape(-1),
                            reduction="none").view(n, width)
    return logp * resp_mask.to(dev)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                 gen: torch.Generator) -> torch.Tensor:
    """One token per row from [a, V] logits: greedy for temperature 0, else softmax(logits/T)
    restricted to the top-p nucleus."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        srt, idx = logits.sort(-1, descending=True)
        probs = srt.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        logits = torch.full_like(logits, float("-inf")).scatter(
            -1, idx, srt.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)


def repeated_ngram_bans(written: list[int], n: int) -> list[int]:
    """The tokens that would complete an n-gram this row has already written (HF's
    `no_repeat_ngram_size` over the generated tokens; the prompt goes in as embeddings)."""
    if n <= 0 or len(written) + 1 < n:
        return []
    prefix = written[len(written) - n + 1:]
    return [written[i + n - 1] for i in range(len(written) - n + 1)
            if written[i : i + n - 1] == prefix]


def _ban_repeats(logits: torch.Tensor, written: list[list[int]], alive: torch.Tensor,
                 n: int) -> None:
    for i, row in enumerate(alive.tolist()):
        bans = repeated_ngram_bans(written[row], n)
        if bans:
            logits[i, bans] = float("-inf")


@torch.no_grad()
def fast_generate(av: Verbalizer, vectors, *, n: int = 1, temperature: float = 1.0,
                  top_p: float = 1.0, max_new_tokens: int = 150, batch_size: int = 64,
                  seed: int = 0, no_repeat_ngram_size: int = 0) -> list[Explanation]:
    """`Verbalizer.generate`'s output (with token ids) with less work; RL's rollouts and every
    plain greedy `Verbalizer.generate` call run it:
    the shared prompt prefix runs once per call; the prompt prefill computes logits for the
    last position only; decoding is a plain loop over the model with a KV cache and no
    attention mask (every live row has the same length); rows that wrote EOS leave the batch
    (their cache rows are dropped), so finished samples cost nothing. Sampling uses its own
    seeded generator (a different random stream from `generate`'s). `no_repeat_ngram_size`
    bans repeated n-grams of the response as HF's processor does."""
    v = check_vectors(vectors, av.d_model).repeat_interleave(n, 0)
    if max_new_tokens < 1 or batch_size < 1 or no_repeat_ngram_size < 0:
        raise NLAError("max_new_tokens and batch_size must be >= 1, no_repeat_ngram_size >= 0")
    model, dev, eos = av.model, av.device, av.eos_id
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    k = shared_prefix_len(av)
    prompt = torch.tensor(av.prompt_ids, device=dev)
    results: list[Explanation] = []
    for start in range(0, v.shape[0], batch_size):
        chunk = v[start : start + batch_size]
        b = chunk.shape[0]
        cache, _ = _prefix_cache(model, av, b)
        with av.injection.active(chunk):
            out = model(input_ids=prompt[k:].expand(b, -1), **with_cache(cache),
                        use_cache=True, logits_to_keep=1)
        cache = returned_cache(out)
        logits = out.logits[:, -1]
        tokens = torch.full((b, max_new_tokens), av.pad_id, dtype=torch.long)
        lengths = torch.full((b,), max_new_tokens, dtype=torch.long)
        alive = torch.arange(b)
        written: list[list[int]] = [[] for _ in range(b)]
        for t in range(max_new_tokens):
            if no_repeat_ngram_size:
                _ban_repeats(logits, written, alive, no_repeat_ngram_size)
            nxt = sample_next(logits, temperature, top_p, gen)
            tokens[alive, t] = nxt.cpu()
            if no_repeat_ngram_size:
                for row, tok in zip(alive.tolist(), nxt.tolist()):
                    written[row].append(tok)
            if t == max_new_tokens - 1:
                break
            done = (nxt == eos).cpu()
            if bool(done.any()):
                lengths[alive[done]] = t + 1
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                alive, nxt = alive[keep], nxt[keep.to(dev)]
                cache.batch_select_indices(keep.to(dev))
            out = model(input_ids=nxt[:, None], **with_cache(cache), use_cache=True)
            logits = out.logits[:, -1]
        for row, n_tok in zip(tokens.tolist(), lengths.tolist()):
            ids = row[:n_tok]
            raw = av.tokenizer.decode(ids, skip_special_tokens=True)
            text, complete = parse_explanation(raw)
            hit_cap = n_tok >= max_new_tokens and ids[-1] != eos
            results.append(Explanation(text, complete, raw, n_tok, hit_cap, ids))
    return results


def sample_rollouts(av: Verbalizer, vectors: torch.Tensor, group_size: int, temperature: float,
                    top_p: float, max_new_tokens: int, batch_size: int, *,
                    seed: int) -> list[Explanation]:
    """G explanations per vector (activation-major), with their generated token ids."""
    return fast_generate(av, vectors, n=group_size, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
