"""Greedy or sampled chat continuations from a target model."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate_continuations(model: nn.Module, tokenizer, prompts: list[str], *,
                           max_new_tokens: int, sampling: dict | None = None,
                           stop_strings: list[str] | None = None) -> list[str]:
    """Batched generation from already-rendered prompts: left-padded (every row continues from
    its last real token), one `generate` call, the new tokens of each row decoded."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    extra = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad,
                         max_length=None, **(sampling or {"do_sample": False}), **extra)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(seq, skip_special_tokens=True) for seq in new]
