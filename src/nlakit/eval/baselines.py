"""Reference points of the quality ladder that `nlakit eval` shows next to every NLA.

- ``reread_N``: the *frozen* target re-reading the raw last N tokens of the context (BOS + the
  tokens, block-K state at the last one, no head, no training). How local the layer is: an
  explanation that scores below reread_N carries less than N verbatim tokens would.
- ``quote_N_fit``: an AR trained on quotes of *training* rows with the same budget as the NLA's
  AR, then fed the quotes of the evaluated rows. The fair version of ``quote_N`` (read by the
  NLA's own AR, which was never trained on raw quotes): a baseline gets its best shot.
Claim checks live in `nlakit.nla.claims`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nlakit.errors import NLAError
from nlakit.model.hooks import forward_to_layer

# ---- reread_N -------------------------------------------------------------------------------


def tail_ids(prefix: str, tokenizer, n: int) -> list[int]:
    """The last ``n`` token ids of a stored prefix (tokenised as extraction does, BOS dropped)."""
    if n < 1:
        raise NLAError(f"reread length must be >= 1 token, got {n}")
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:1] == [bos]:
        ids = ids[1:]
    return ids[-n:]


@torch.no_grad()
def reread_predictions(model, tokenizer, layer: int, prefixes: list[str], n: int,
                       batch_size: int = 32) -> torch.Tensor:
    """[rows, d] block-``layer`` states of the frozen target at the last of the raw last ``n``
    tokens of each prefix (preceded by BOS where the tokenizer has one)."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    seqs = [bos + tail_ids(p, tokenizer, n) for p in prefixes]
    outs = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(chunk):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        hidden = forward_to_layer(model, ids.to(device), mask.to(device), layer)
        last = mask.sum(1) - 1
        outs.append(hidden[torch.arange(len(chunk)), last.to(device)].float().cpu())
    if not outs:
        return torch.zeros(0, model.get_input_embeddings().weight.shape[1])
    return torch.cat(outs)


# ---- quote_N_fit ------------------------------------------------------------------------------


@dataclass
class FitBudget:
    """The training budget of an AR (the NLA's own, read from its training summary)."""

    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-4
    lora_rank: int = 16
    seed: int = 0


def fit_reconstructor(ar, texts: list[str], vectors: torch.Tensor, budget: FitBudget):
    """Train a *fresh* AR (``ar``: an untrained Reconstructor, changed in place) on
    (text, vector) pairs of training rows with the given budget; returns it in eval mode.
    A plain loop rather than the SFT trainer: the pairs are made in memory at eval time and
    the baseline needs no label set, checkpoint or resume."""
    if len(texts) != vectors.shape[0] or not texts:
        raise NLAError(f"{len(texts)} texts for {vectors.shape[0]} vectors")
    if budget.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        ar.body = get_peft_model(ar.body, LoraConfig(
            r=budget.lora_rank, lora_alpha=2 * budget.lora_rank, target_modules="all-linear"))
    else:
        ar.body.requires_grad_(True)
    ar.head.requires_grad_(True)
    ar.train()
    opt = torch.optim.AdamW([p for p in ar.parameters() if p.requires_grad], lr=budget.lr)
    rng = np.random.default_rng(budget.seed)
    for _ in range(budget.steps):
        batch = rng.choice(len(texts), min(budget.batch_size, len(texts)), replace=False)
        loss = ar.loss([texts[i] for i in batch], vectors[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ar.eval()
