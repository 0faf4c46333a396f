"""The target's LM head on hidden states (final norm, head, softcapping), and next-token
probabilities and top-k predictions of token sequences: every reading of the target's
next-token distribution in nlakit (labels, claim checks, the viewer) comes from here."""
from __future__ import annotations

import torch
from torch import nn

from nlakit.errors import NLAError
from nlakit.model.arch import decoder_stack
from nlakit.model.batching import right_pad


def lm_logits(model: nn.Module, hidden: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The LM head on final-norm hidden states, in `dtype`, with final-logit soft-capping where
    the architecture has it (Gemma-2/3): the target's own next-token logits."""
    logits = model.get_output_embeddings()(hidden).to(dtype)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def next_token_probs(model: nn.Module, batch_ids, pad_id: int = 0,
                     read_at=None) -> torch.Tensor:
    """The target's next-token distribution [rows, vocab] (float32 softmax over the whole
    vocabulary) after each sequence of token ids, read at its last token or, with `read_at`
    (per sequence, token indices), at each listed index in order: one forward serves every
    position of a document. Right-pads the batch; the real last token comes from the mask."""
    if any(len(ids) == 0 for ids in batch_ids):
        raise NLAError("next_token_probs got an empty token sequence")
    device = next(model.parameters()).device
    ids, mask = right_pad(batch_ids, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    hidden = decoder_stack(model)(input_ids=ids, attention_mask=mask,
                                  use_cache=False).last_hidden_state
    if read_at is None:
        rows = torch.arange(len(batch_ids), device=device)
        cols = mask.sum(dim=1) - 1
    else:
        pairs = [(i, p) for i, ps in enumerate(read_at) for p in ps]
        if any(not 0 <= p < len(batch_ids[i]) for i, p in pairs):
            raise NLAError("next_token_probs: a read position lies outside its sequence")
        rows = torch.tensor([i for i, _ in pairs], device=device, dtype=torch.long)
        cols = torch.tensor([p for _, p in pairs], device=device, dtype=torch.long)
    return torch.softmax(lm_logits(model, hidden[rows, cols]), dim=-1).cpu()


@torch.no_grad()
def top_next_tokens(model: nn.Module, batch_ids, k: int = 3, pad_id: int = 0,
                    read_at=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's top-k next-token predictions after each sequence of token ids.

    Right-pads the batch, runs the decoder, takes each row's last real token (from the
    attention mask) and applies the LM head (with final-logit soft-capping where the
    architecture has it). Returns (probs [b, k] float32, ids [b, k] int64), probabilities from a
    float32 softmax over the whole vocabulary.
    read_at: per sequence, the token indices to predict after (default: its last token); the
    results are then one row per index, in order — one forward serves every sampled position
    of a document.
    """
    if any(len(ids) == 0 for ids in batch_ids):
        raise NLAError("top_next_tokens got an empty token sequence")
    top = next_token_probs(model, batch_ids, pad_id, read_at).topk(k, dim=-1)
    return top.values.cpu(), top.indices.cpu()
