"""Hooks on block K: run a model only up to block K and read its output."""
from __future__ import annotations

import torch
from torch import nn

from nlakit.errors import NLAError
from nlakit.model.arch import decoder_layers, decoder_stack


class _StopForward(Exception):
    """Raised by a hook after block K so later blocks are never computed."""


def forward_to_layer(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int,
    *, grad: bool = False,
) -> torch.Tensor:
    """Output of decoder block ``layer`` (= ``hidden_states[layer + 1]``), shape [b, t, d].

    Only blocks 0..layer run: a forward hook on block ``layer`` captures its output and stops
    the forward pass, so neither later blocks nor the LM head cost anything.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        with torch.set_grad_enabled(grad):
            decoder_stack(model)(input_ids=input_ids, attention_mask=attention_mask,
                                 use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise NLAError(f"block {layer} never ran; the model's forward skipped it")
    return captured["h"]
