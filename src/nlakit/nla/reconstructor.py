"""The activation reconstructor (AR): the target truncated after block K plus a linear head.

It reads only an explanation, placed in a fixed raw-text prompt (not chat-templated, tokenized
with the tokenizer's own special tokens, so BOS appears exactly once where the model uses one),
and predicts the block-K activation from the block-K output at the prompt's last real token.
The body keeps its final-norm weights on disk for compatibility, but the norm never runs: the
forward pass stops after block K (`models.forward_to_layer`), which is "final norm = identity".
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from nlakit.errors import NLAError
from nlakit.metrics import mse_nrm
from nlakit.model.arch import decoder_layers
from nlakit.model.hooks import forward_to_layer

DEFAULT_AR_TEMPLATE = "Summary of the following text: <text>{explanation}</text> <summary>"


def truncate_model(model: nn.Module, layer: int) -> nn.Module:
    """A deep copy of `model` keeping blocks 0..layer (config.num_hidden_layers = layer + 1)."""
    body = copy.deepcopy(model)
    layers = decoder_layers(body)
    if not 0 <= layer < len(layers):
        raise NLAError(f"layer {layer} out of range for a model with {len(layers)} blocks")
    del layers[layer + 1 :]
    cfg = body.config
    cfg.num_hidden_layers = layer + 1
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: layer + 1]
    body.requires_grad_(False)
    return body


class Reconstructor(nn.Module):
    """text -> [d] vector. `body` is a causal LM with exactly K+1 blocks; `head` is Linear(d, d)."""

    def __init__(self, body: nn.Module, head: nn.Linear, tokenizer,
                 template: str = DEFAULT_AR_TEMPLATE, max_length: int = 512):
        super().__init__()
        if "{explanation}" not in template:
            raise NLAError("the AR prompt template must contain the placeholder {explanation}")
        self.body, self.head, self.tokenizer = body, head, tokenizer
        self.template, self.max_length = template, max_length
        self.layer = len(decoder_layers(body)) - 1
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_target(cls, model: nn.Module, tokenizer, layer: int,
                    template: str = DEFAULT_AR_TEMPLATE) -> Reconstructor:
        body = truncate_model(model, layer)
        d = model.get_input_embeddings().weight.shape[1]
        head = nn.Linear(d, d, bias=False)
        with torch.no_grad():
            head.weight.copy_(torch.eye(d))  # identity init: start from the raw block-K state
        return cls(body, head.to(next(body.parameters()).device), tokenizer, template)

    @property
    def d_model(self) -> int:
        return self.head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def encode(self, texts: list[str]) -> dict:
        """Right-padded prompt ids; NLAError for non-text or prompts beyond max_length.
        An empty explanation is legal (the prompt still has tokens): it carries no information,
        and scoring it is how a missing explanation gets its (poor) score."""
        if isinstance(texts, str):
            texts = [texts]
        prompts = []
        for t in texts:
            if not isinstance(t, str):
                raise NLAError(f"explanations must be strings, got {type(t).__name__}")
            prompts.append(self.template.format(explanation=t.strip()))
        enc = self.tokenizer(prompts, add_special_tokens=True, padding=True,
                             padding_side="right", return_tensors="pt")
        enc = self._fill_empty(enc)
        if enc["input_ids"].shape[1] > self.max_length:
            raise NLAError(f"an AR prompt is {enc['input_ids'].shape[1]} tokens, over the limit "
                           f"of {self.max_length}; shorten the explanation")
        return enc

    def _fill_empty(self, enc) -> dict:
        """A raw template (`{explanation}`) with a tokenizer that adds no BOS turns an empty
        explanation into no tokens at all: give such rows one special token (BOS, else EOS) so
        they still get a (poor) prediction instead of a shape error."""
        ids, mask = enc["input_ids"], enc["attention_mask"]
        empty = mask.sum(1) == 0
        if not empty.any():
            return enc
        tok = self.tokenizer
        fill = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if ids.shape[1] == 0:
            ids = torch.full((ids.shape[0], 1), tok.pad_token_id or 0, dtype=ids.dtype)
            mask = torch.zeros_like(ids)
        ids[empty, 0], mask[empty, 0] = fill, 1
        return {**enc, "input_ids": ids, "attention_mask": mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[b, d] predictions from the block-K state at each row's last real token."""
        hidden = forward_to_layer(self.body, input_ids, attention_mask, self.layer,
                                  grad=torch.is_grad_enabled())
        last = attention_mask.sum(1) - 1  # right padding: the last real token, from the mask
        if (last < 0).any():
            raise NLAError("an AR input row has no real tokens")
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h.to(self.head.weight.dtype))

    def loss(self, texts: list[str], targets: torch.Tensor) -> torch.Tensor:
        """Mean mse_nrm between predictions and true activations (the AR training loss)."""
        enc = self.encode(texts)
        pred = self(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        return mse_nrm(pred, targets.to(pred.device, pred.dtype)).mean()

    @torch.no_grad()
    def reconstruct(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """[n, d] float32 reconstructions, batched."""
        if isinstance(texts, str):
            texts = [texts]
        outs = []
        for start in range(0, len(texts), batch_size):
            enc = self.encode(texts[start : start + batch_size])
            outs.append(self(enc["input_ids"].to(self.device),
                             enc["attention_mask"].to(self.device)).float().cpu())
        if not outs:
            return torch.zeros(0, self.d_model)
        return torch.cat(outs)
