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

import torch

from nlakit.errors import NLAError
from nlakit.model.batching import right_pad
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
        ids, mask = right_pad(chunk, pad)
        hidden = forward_to_layer(model, ids.to(device), mask.to(device), layer)
        last = mask.sum(1) - 1
        outs.append(hidden[torch.arange(len(chunk)), last.to(device)].float().cpu())
    if not outs:
        return torch.zeros(0, model.get_input_embeddings().weight.shape[1])
    return torch.cat(outs)


# ---- quote_N_fit ------------------------------------------------------------------------------


@dataclass
class FitBudget:
    """The training budget and settings of an AR (the NLA's own, read from its provenance:
    `nlakit.eval.evaluate.ar_budget`); `nlakit.train.sft.fit_reconstructor` trains with it."""

    steps: int = 150
    batch_size: int = 8
    lr: float = 2e-4
    lora_rank: int = 16
    lora_alpha: int | None = None  # None: 2 x rank, as make_trainable
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"
    seed: int = 0
